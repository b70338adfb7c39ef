"""The main job's local demo: an emulated SGLang cluster, the router, a short trace replay,
and a printed comparison of routing policies.

Starts 2 real SGLang servers on this machine (tiny model; H100 + Llama-2-7B step times
emulated at a 4x time scale; each streaming its state to block_sgl), then, for each policy, a
block_sgl router in front of them, and replays the same short workload through it: a few
groups of requests sharing a long system prompt (as sglang.bench_serving's
generated-shared-prefix) mixed with unrelated prompts, Poisson arrivals. Prints TTFT / E2E
percentiles and the prefix-cache hit ratio per policy, then tears everything down.

    python -m block_sgl.demo [--instances 2] [--policies round_robin cache_aware block]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import urllib.request

import numpy as np

from block_sgl.testing.cluster import ClusterConfig, ClusterError, LocalCluster, free_port


def make_workload(n: int, seed: int, groups: int = 4, system_words: int = 600,
                  question_words: int = 40, output_tokens: int = 24) -> list[dict]:
    """``n`` requests: 3/4 share one of ``groups`` long system prompts, 1/4 are unrelated."""
    rng = random.Random(seed)
    systems = [" ".join(f"rule{g}_{k}" for k in range(system_words)) for g in range(groups)]
    out = []
    for i in range(n):
        question = " ".join(f"q{i}w{k}" for k in range(question_words))
        text = f"{rng.choice(systems)}\nQuestion: {question}" if rng.random() < 0.75 else question
        out.append({"text": text, "sampling_params": {
            "max_new_tokens": output_tokens, "ignore_eos": True, "temperature": 0},
            "stream": True})
    return out


async def _replay(url: str, bodies: list[dict], rate: float, seed: int) -> list[dict]:
    import aiohttp

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, len(bodies))
    results: list[dict] = []

    async def one(session, body, delay):
        await asyncio.sleep(delay)
        start = time.perf_counter()
        ttft = None
        last = b""
        async with session.post(f"{url}/generate", json=body) as r:
            if r.status != 200:
                results.append({"error": f"HTTP {r.status}: {(await r.read())[:300]!r}"})
                return
            async for line in r.content:
                if line.startswith(b"data:") and b"[DONE]" not in line:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    last = line
        try:
            meta = json.loads(last[5:])["meta_info"]
        except (ValueError, KeyError):
            results.append({"error": f"unexpected stream end: {last[:300]!r}"})
            return
        results.append({"ttft": ttft, "e2e": time.perf_counter() - start,
                        "prompt": meta["prompt_tokens"], "cached": meta.get("cached_tokens", 0),
                        "instance": r.headers.get("X-Block-Instance")})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, b, d) for b, d in zip(bodies, np.cumsum(gaps))))
    return results


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"the router exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise ClusterError(f"the router at {url} did not become ready")


def _flush(urls: list[str]) -> None:
    for u in urls:
        urllib.request.urlopen(urllib.request.Request(f"{u}/flush_cache", method="POST"),
                               timeout=30).read()


def run_policy(policy: str, workers: list[str], bodies: list[dict], rate: float,
               seed: int, flush: bool = True) -> dict:
    if flush:
        _flush(workers)  # every policy starts from cold caches
    print(f"replaying {len(bodies)} requests at {rate:g}/s through the router "
          f"(--policy {policy}) ...", flush=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "block_sgl.launch_router", "--worker-urls",
                             *workers, "--port", str(port), "--policy", policy,
                             "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        results = asyncio.run(_replay(url, bodies, rate, seed))
    finally:
        proc.terminate()
        proc.wait(15)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        print(f"  {len(errors)} of {len(results)} requests failed; first: {errors[0]}")
    results = [r for r in results if "error" not in r]
    if not results:
        raise ClusterError(f"every request through --policy {policy} failed")
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    e2e = np.array([r["e2e"] for r in results]) * 1e3
    share = {u: sum(r["instance"] == u for r in results) for u in workers}
    return {"policy": policy, "requests": len(results), "errors": len(errors),
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "e2e_p50_ms": float(np.percentile(e2e, 50)), "e2e_p99_ms": float(np.percentile(e2e, 99)),
            "prefix_hit": sum(r["cached"] for r in results) / max(1, sum(r["prompt"] for r in results)),
            "share": [share[u] for u in workers]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--instances", type=int, default=2, help="SGLang servers to start")
    p.add_argument("--emulate", default="h100-llama2-7b", help="GPU profile to emulate")
    p.add_argument("--time-scale", type=float, default=4.0, help="emulated-time stretch factor")
    p.add_argument("--policies", nargs="+", default=["round_robin", "cache_aware", "block"])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-urls", nargs="+", metavar="URL",
                   help="use these running SGLang instances (started with --block-publish) "
                        "instead of starting a local cluster")
    args = p.parse_args(argv)
    from block_sgl.router.policies import POLICY_NAMES

    unknown = [x for x in args.policies if x not in POLICY_NAMES]
    if unknown:
        raise SystemExit(f"error: unknown policies {unknown}; valid: {', '.join(POLICY_NAMES)}")
    bodies = make_workload(args.requests, args.seed)
    if args.worker_urls:
        rows = [run_policy(policy, args.worker_urls, bodies, args.rate, args.seed, flush=True)
                for policy in args.policies]
        _print_table(rows, args.time_scale)
        return
    from block_sgl.testing.cluster import port_in_use

    publish = []
    while len(publish) < args.instances:
        port = free_port()
        if port + 1000 < 65536 and not port_in_use(port + 1000):
            publish.append(f"tcp://127.0.0.1:{port}")
    config = ClusterConfig(instances=args.instances, emulate=args.emulate,
                           time_scale=args.time_scale,
                           per_instance_env=tuple((("BLOCK_SGL_PUBLISH", e),) for e in publish))
    print(f"starting {args.instances} SGLang instances (emulating {args.emulate}, "
          f"time scale {args.time_scale}x) ...", flush=True)
    started = time.monotonic()
    rows = []
    try:
        with LocalCluster(config) as cluster:
            print(f"ready in {time.monotonic() - started:.0f} s: {', '.join(cluster.urls)}")
            for policy in args.policies:
                rows.append(run_policy(policy, cluster.urls, bodies, args.rate, args.seed,
                                       flush=True))
    except ClusterError as e:
        raise SystemExit(f"error: {e}") from None
    _print_table(rows, args.time_scale)


def _print_table(rows: list[dict], time_scale: float) -> None:
    print(f"\n{'policy':<14}{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p50':>10}{'E2E p99':>10}"
          f"{'prefix hit':>12}  requests per instance")
    for r in rows:
        print(f"{r['policy']:<14}{r['ttft_p50_ms']:>8.0f}ms{r['ttft_p99_ms']:>8.0f}ms"
              f"{r['e2e_p50_ms']:>8.0f}ms{r['e2e_p99_ms']:>8.0f}ms{r['prefix_hit']:>11.0%}  "
              f"{r['share']}" + (f"  ({r['errors']} failed)" if r["errors"] else ""))
    print(f"\n(wall-clock on this machine; emulated GPU time = these / {time_scale:g}; "
          "one short run, one seed: see benchmarks/e2e for the real comparison)")


if __name__ == "__main__":
    main()
