"""block_sgl's router: predictive, cache- and load-aware routing in front of SGLang instances.

    python -m block_sgl.launch_router --worker-urls http://a:30000 http://b:30000 \\
        --policy block --host 0.0.0.0 --port 8000

Each instance must run the block_sgl plugin with publishing on (``--block-publish
tcp://HOST:PORT`` or ``BLOCK_SGL_PUBLISH``); the router finds each stream in the instance's
``/server_info`` unless ``--publish-endpoints`` lists them. Run several replicas for
availability: they need no coordination.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from block_sgl.router.config import (LENGTH_ESTIMATES, CacheAwareSettings, ConfigError,
                                     HealthSettings, RouterConfig)
from block_sgl.router.policies import POLICY_NAMES

logger = logging.getLogger("block_sgl.router")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m block_sgl.launch_router", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("instances")
    g.add_argument("--worker-urls", nargs="+", required=True, metavar="URL",
                   help="SGLang instances (http://host:port)")
    g.add_argument("--publish-endpoints", nargs="+", metavar="TCP",
                   help="their block_sgl streams (tcp://host:port, same order); default: read "
                        "from each instance's /server_info")
    g.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds to wait for the instances to answer at start")
    g = p.add_argument_group("routing")
    g.add_argument("--policy", default="block", choices=POLICY_NAMES,
                   help="block / block_ttft: lowest predicted E2E / TTFT (fastsim); the others "
                        "are baselines (see block_sgl/router/policies/README.md)")
    g.add_argument("--power-of-k", type=int, default=0,
                   help="predict on k random instances (+ the best cached prefix) instead of all")
    g.add_argument("--tokenizer-path",
                   help="local tokenizer folder; default: the instances' /model_info")
    g.add_argument("--length-model", help="response-length model file (predictor.train_length); "
                   "default: the running mean of completed outputs")
    g.add_argument("--length-estimate", choices=LENGTH_ESTIMATES, default="p50",
                   help="with --length-model: simulate each request with the model's P50, or "
                        "with the mean its P50 and P90 imply for a log-normal length (the "
                        "expected work, which the median under-states)")
    g.add_argument("--no-ignore-eos-hint", action="store_true",
                   help="do not assume ignore_eos requests run to max tokens (benchmarks that "
                        "hide output lengths from the router)")
    g.add_argument("--stale-after", type=float, default=2.0, metavar="S",
                   help="stream silence after which an instance is routed on the router's own "
                        "accounting")
    g.add_argument("--calibration-refit-interval", type=float, default=10.0, metavar="S",
                   help="refit each instance's step model from its step records at most every "
                   "S seconds, after a drift at most once more (drift is still checked, and "
                   "rescaled for, every 64 records); a fit costs 30-200 ms of router CPU")
    g.add_argument("--seed", type=int, help="seed for random choices (random, power_of_two, k)")
    g = p.add_argument_group("SLO admission (block policies)")
    g.add_argument("--slo-ttft-ms", type=float, help="TTFT objective; enables admission")
    g.add_argument("--slo-factor", type=float, default=1.0,
                   help="act when every predicted TTFT exceeds factor x SLO")
    g.add_argument("--slo-action", choices=("reject", "queue"), default="reject",
                   help="reject: 429 + Retry-After; queue: hold until a prediction fits")
    g = p.add_argument_group("cache_aware (sglang-router's thresholds)")
    d = CacheAwareSettings()
    g.add_argument("--cache-threshold", type=float, default=d.cache_threshold)
    g.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold)
    g.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, "
                   "/metrics); forwarded to the instances unchanged")
    g.add_argument("--max-retries", type=int, default=2,
                   help="other instances tried when one fails before answering")
    g.add_argument("--upstream-keepalive", type=float, default=4.0, metavar="S",
                   help="idle time after which a pooled connection to an instance is closed; "
                   "keep it below the instances' keep-alive timeout (SGLang: "
                   "SGLANG_TIMEOUT_KEEP_ALIVE, 5 s)")
    g.add_argument("--health-interval", type=float, default=1.0, metavar="S")
    g.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    g.add_argument("--event-loop", default="uvloop", choices=("uvloop", "asyncio"),
                   help="uvloop (default; the loop SGLang's own HTTP server runs on, pinned "
                   "by SGLang) or asyncio (the standard library loop)")
    return p


def run_event_loop(kind: str, coro) -> None:
    """Run ``coro`` on the chosen event loop; a missing uvloop is an error, not a fallback."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            coro.close()
            raise SystemExit("error: --event-loop uvloop needs the uvloop package "
                             "(pip install uvloop), or pass --event-loop asyncio") from None
        uvloop.run(coro)
    else:
        asyncio.run(coro)


def config_from_args(args) -> RouterConfig:
    return RouterConfig(
        worker_urls=tuple(u.rstrip("/") for u in args.worker_urls),
        publish_endpoints=tuple(args.publish_endpoints) if args.publish_endpoints else None,
        policy=args.policy, host=args.host, port=args.port, tokenizer_path=args.tokenizer_path,
        length_model=args.length_model, length_estimate=args.length_estimate,
        slo_ttft_ms=args.slo_ttft_ms, slo_factor=args.slo_factor,
        slo_action=args.slo_action, api_key=args.api_key, power_of_k=args.power_of_k,
        stale_after_s=args.stale_after,
        calibration_refit_interval_s=args.calibration_refit_interval,
        use_ignore_eos_hint=not args.no_ignore_eos_hint,
        max_retries=args.max_retries, upstream_keepalive_s=args.upstream_keepalive,
        seed=args.seed, log_level=args.log_level,
        health=HealthSettings(interval_s=args.health_interval),
        cache_aware=CacheAwareSettings(cache_threshold=args.cache_threshold,
                                       balance_abs_threshold=args.balance_abs_threshold,
                                       balance_rel_threshold=args.balance_rel_threshold))


class StartupError(RuntimeError):
    pass


def _get_json(url: str, api_key: str | None, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for_instances(config: RouterConfig, timeout_s: float) -> list[dict]:
    """``/server_info`` of every instance, waiting up to ``timeout_s`` for them to answer."""
    deadline = time.monotonic() + timeout_s
    infos: dict[str, dict] = {}
    last: dict[str, str] = {}
    while True:
        for url in config.worker_urls:
            if url in infos:
                continue
            try:
                infos[url] = _get_json(f"{url}/server_info", config.api_key)
            except (urllib.error.URLError, OSError, ValueError) as e:
                last[url] = f"{type(e).__name__}: {e}"
        if len(infos) == len(config.worker_urls):
            return [infos[u] for u in config.worker_urls]
        if time.monotonic() > deadline:
            missing = [f"{u} ({last.get(u)})" for u in config.worker_urls if u not in infos]
            raise StartupError(f"instances did not answer GET /server_info within "
                               f"{timeout_s:g} s: {', '.join(missing)}")
        time.sleep(0.5)


def discover_endpoint(url: str, info: dict) -> str:
    """The block_sgl publish endpoint an instance advertises in its ``kv_events_config``."""
    raw = info.get("kv_events_config")
    try:
        cfg = json.loads(raw) if raw else {}
    except ValueError:
        cfg = {}
    if cfg.get("publisher") != "block_sgl" or not cfg.get("endpoint"):
        raise StartupError(
            f"{url} does not publish a block_sgl stream (its kv_events_config is {raw!r}); start "
            "it with --block-publish tcp://HOST:PORT (or BLOCK_SGL_PUBLISH), or pass "
            "--publish-endpoints")
    if int(info.get("dp_size") or 1) > 1:
        raise StartupError(f"{url} runs --dp-size {info.get('dp_size')}: route among its ranks "
                           "in-engine (--block-dp-policy) or run one server per rank")
    endpoint = cfg["endpoint"]
    scheme_host, _, port = endpoint.rpartition(":")
    host = scheme_host.removeprefix("tcp://")
    if host in ("*", "0.0.0.0", "::", "[::]"):
        host = urlsplit(url).hostname  # a wildcard bind is reached at the worker's own host
    return f"tcp://{host}:{port}"


def build_app(config: RouterConfig, *, infos: list[dict] | None = None, startup_timeout_s=120.0):
    """Everything ``main`` starts, without serving: (RouterApp, Router)."""
    from block_sgl.router.core import Router
    from block_sgl.router.proxy import RouterApp
    from block_sgl.router.tokenize import PromptTokenizer, TokenizerError

    infos = infos if infos is not None else wait_for_instances(config, startup_timeout_s)
    endpoints = list(config.publish_endpoints or
                     [discover_endpoint(u, i) for u, i in zip(config.worker_urls, infos)])
    first = config.worker_urls[0]
    models = _get_json(f"{first}/v1/models", config.api_key)
    card = models["data"][0]
    served_model, context_len = card["id"], card.get("max_model_len")
    tokenizer_path = config.tokenizer_path
    if tokenizer_path is None:
        tokenizer_path = _get_json(f"{first}/model_info", config.api_key).get("tokenizer_path")
    try:
        tokenizer = PromptTokenizer(tokenizer_path)
    except (TokenizerError, OSError, Exception) as e:
        raise StartupError(f"cannot load the tokenizer from {tokenizer_path!r}: {e}; give a local "
                           "copy with --tokenizer-path") from None
    length_predictor = None
    if config.length_model:
        from block_sgl.predictor.length import LengthPredictor

        try:
            length_predictor = LengthPredictor.load(config.length_model)
        except Exception as e:
            raise StartupError(f"cannot load --length-model {config.length_model!r}: {e}") from None
    router = Router(config, length_predictor=length_predictor)
    router.attach_streams(endpoints)
    return RouterApp(config, router, tokenizer, served_model=served_model,
                     context_len=context_len), router


async def serve(config: RouterConfig, app_obj, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    from aiohttp import web

    runner = web.AppRunner(app_obj.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    logger.info("block_sgl router (%s) listening on http://%s:%d for %d instances",
                config.policy, config.host, config.port, len(config.worker_urls))
    if ready is not None:
        ready.set()
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app_obj, _ = build_app(config, startup_timeout_s=args.startup_timeout)
    except StartupError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        run_event_loop(args.event_loop, serve(config, app_obj))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {config.host}:{config.port}: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
