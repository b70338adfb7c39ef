"""In-engine DP routing benchmark: one SGLang server with ``--dp-size 2``, SGLang's own
dispatch (``round_robin``, ``total_tokens``) vs block_sgl's policy inside the
DataParallelController (``--block-dp-policy block``), on the same workload and seeds.

    python benchmarks/dp/bench_dp.py        # aimed at ≈ 10 min on an idle 2-core box (28 min with the CPUs shared)
    python benchmarks/dp/bench_dp.py --configs round_robin total_tokens block cache_aware \\
        --seeds 0 1 2 3 4 --requests 120 --rate 3

Per configuration the server is started once (tiny model on CPU, ``--emulate`` GPU profile at
``--time-scale``, every rank streaming its state), then every seed replays its own workload
from flushed radix caches: groups of requests sharing a long system prompt (as
sglang.bench_serving's generated-shared-prefix) mixed with unrelated prompts, output lengths
drawn per request (``ignore_eos``), Poisson arrivals at ``--rate``. Per seed: TTFT P50 / P99
(first streamed chunk), E2E P50 / P99, throughput (output tokens / s from the first arrival to
the last completion), prefix-hit ratio (SGLang's cached_tokens / prompt_tokens) and requests
per DP rank (``meta_info.dp_rank``). Results: ``benchmarks/results/dp_policy.json``. Times are
wall-clock on this machine; emulated GPU time = these / time scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from block_sgl.testing.cluster import ClusterConfig, ClusterError, LocalCluster, free_port, port_in_use  # noqa: E402
from block_sgl.hooks.emulate import overshoot_from_log  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dp_policy.json"
STOCK = ("round_robin", "total_tokens")
"""SGLang's own --load-balance-method values; any other name is a --block-dp-policy."""


def workload(n: int, seed: int, groups: int = 4, system_tokens: int = 512,
             question_tokens: tuple[int, int] = (16, 128), output_tokens: tuple[int, int] = (16, 128),
             shared_fraction: float = 0.8) -> list[dict]:
    """``n`` /generate bodies (token ids): ``shared_fraction`` of them start with one of
    ``groups`` long system prompts, the rest are unrelated; lengths uniform in the ranges."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(100, 30000, system_tokens).tolist() for _ in range(groups)]
    bodies = []
    for _ in range(n):
        q = rng.integers(100, 30000, int(rng.integers(*question_tokens))).tolist()
        ids = systems[int(rng.integers(groups))] + q if rng.random() < shared_fraction else \
            rng.integers(100, 30000, int(rng.integers(128, 512))).tolist() + q
        bodies.append({"input_ids": ids, "stream": True, "sampling_params": {
            "max_new_tokens": int(rng.integers(*output_tokens)), "ignore_eos": True,
            "temperature": 0}})
    return bodies


async def replay(url: str, bodies: list[dict], rate: float, seed: int) -> tuple[list[dict], float]:
    import aiohttp

    gaps = np.random.default_rng(seed + 10_000).exponential(1 / rate, len(bodies))
    results: list[dict] = []
    t0 = time.perf_counter()

    async def one(session, body, at):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
        start = time.perf_counter()
        ttft, last = None, b""
        try:
            async with session.post(f"{url}/generate", json=body) as r:
                if r.status != 200:
                    results.append({"error": f"HTTP {r.status}: {(await r.read())[:200]!r}"})
                    return
                async for line in r.content:
                    if line.startswith(b"data:") and b"[DONE]" not in line:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        last = line
            meta = json.loads(last[5:])["meta_info"]
        except Exception as e:  # counted and reported, never silent
            results.append({"error": repr(e)[:200]})
            return
        results.append({"ttft": ttft, "e2e": time.perf_counter() - start, "end": time.perf_counter() - t0,
                        "prompt": meta["prompt_tokens"], "cached": meta.get("cached_tokens", 0),
                        "output": meta["completion_tokens"], "rank": meta.get("dp_rank")})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await asyncio.gather(*(one(session, b, at) for b, at in zip(bodies, np.cumsum(gaps))))
    return results, float(np.cumsum(gaps)[0])


def summarise(results: list[dict], first_arrival: float, ranks: int) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    if not ok:
        return {"requests": 0, "errors": len(errors), "first_error": errors[0] if errors else None}
    ttft = np.array([r["ttft"] for r in ok]) * 1e3
    e2e = np.array([r["e2e"] for r in ok]) * 1e3
    span = max(r["end"] for r in ok) - first_arrival
    out_tokens = sum(r["output"] for r in ok)
    return {"requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "e2e_p50_ms": float(np.percentile(e2e, 50)), "e2e_p99_ms": float(np.percentile(e2e, 99)),
            "throughput_tok_s": out_tokens / span, "throughput_req_s": len(ok) / span,
            "prefix_hit": sum(r["cached"] for r in ok) / max(1, sum(r["prompt"] for r in ok)),
            "per_rank": [sum(r["rank"] == k for r in ok) for k in range(ranks)]}


def publish_endpoint(ranks: int) -> str:
    while True:
        port = free_port()
        ports = [port + r for r in range(ranks)] + [port + 1000 + r for r in range(ranks)]
        if max(ports) < 65536 and not any(port_in_use(q) for q in ports[1:]):
            return f"tcp://127.0.0.1:{port}"


def flush(url: str) -> None:
    for _ in range(60):  # SGLang refuses to flush while requests are still running
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", method="POST"),
                                        timeout=30):
                return
        except urllib.error.HTTPError:
            time.sleep(1)
    raise RuntimeError(f"{url}/flush_cache kept failing")


def run_config(name: str, args, log_dir: Path) -> dict:
    extra = ["--dp-size", str(args.dp_size)]
    if name in STOCK:
        extra += ["--load-balance-method", name]
    else:
        extra += ["--block-dp-policy", name]
    config = ClusterConfig(instances=1, emulate=args.emulate, time_scale=args.time_scale,
                           extra_args=tuple(extra),
                           env=(("BLOCK_SGL_PUBLISH", publish_endpoint(args.dp_size)),),
                           log_dir=str(log_dir / name), start_timeout_s=args.start_timeout)
    print(f"[{name}] starting the --dp-size {args.dp_size} server ...", flush=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    seeds = {}
    with LocalCluster(config) as cluster:
        url = cluster.urls[0]
        startup = time.monotonic() - started
        print(f"[{name}] ready in {startup:.0f} s", flush=True)
        for seed in args.seeds:
            flush(url)
            bodies = workload(args.requests, seed)
            results, first = asyncio.run(replay(url, bodies, args.rate, seed))
            seeds[str(seed)] = s = summarise(results, first, args.dp_size)
            print(f"[{name}] seed {seed}: TTFT p99 {s.get('ttft_p99_ms', float('nan')):.0f} ms, "
                  f"{s.get('throughput_tok_s', float('nan')):.0f} tok/s, prefix hit "
                  f"{s.get('prefix_hit', float('nan')):.0%}, per rank {s.get('per_rank')}"
                  + (f", {s['errors']} errors (first: {s['first_error']})" if s["errors"] else ""),
                  flush=True)
        log = cluster.instances[0].log_path.read_text(errors="replace")
    ok = [s for s in seeds.values() if s["requests"]]

    def med(key):
        return statistics.median(s[key] for s in ok) if ok else None
    return {"config": name, "kind": "sglang" if name in STOCK else "block_sgl",
            "server_args": extra, "startup_s": startup, "seeds": seeds,
            "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
            "median": {k: med(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms",
                                           "e2e_p99_ms", "throughput_tok_s", "throughput_req_s",
                                           "prefix_hit")},
            "block_sgl_fallbacks_logged": log.count("block_sgl DP routing failed"),
            # per DP rank: (steps whose real CPU forward outlasted the emulated GPU step, steps)
            # at the emulator's last WARNING; a large share means CPU-bound timings
            "emulation_overshoot": {k: list(v) for k, v in overshoot_from_log(log).items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["round_robin", "total_tokens", "block"],
                   help="round_robin / total_tokens: SGLang's --load-balance-method; any other: "
                        "--block-dp-policy NAME")
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--requests", type=int, default=60, help="per seed")
    p.add_argument("--rate", type=float, default=2.5, help="mean arrivals per second (Poisson)")
    p.add_argument("--emulate", default="h100-llama2-7b")
    p.add_argument("--time-scale", type=float, default=4.0)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/block_sgl_bench_dp"))
    args = p.parse_args(argv)
    from block_sgl.hooks.flags import DP_POLICIES

    bad = [c for c in args.configs if c not in STOCK and c not in DP_POLICIES]
    if bad:
        p.error(f"unknown configs {bad}; valid: {', '.join(STOCK + DP_POLICIES)}")
    started = time.time()
    rows = []
    for name in args.configs:
        try:
            rows.append(run_config(name, args, args.log_dir))
        except ClusterError as e:
            print(f"[{name}] failed to start: {e}", flush=True)
            rows.append({"config": name, "error": str(e)[-2000:]})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    result = {"benchmark": "in-engine DP routing (benchmarks/dp/bench_dp.py)",
              "command": "python benchmarks/dp/bench_dp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": commit, "dirty": dirty, "machine": {"cpus": os.cpu_count(),
                                                            "platform": platform.platform()},
              "workload": {"requests_per_seed": args.requests, "rate_per_s": args.rate,
                           "seeds": args.seeds, "shape": "4 shared 512-token system prompts (80 %) "
                           "or 128-512 unrelated tokens, + 16-128-token question; 16-128 output "
                           "tokens, ignore_eos"},
              "emulate": args.emulate, "time_scale": args.time_scale, "dp_size": args.dp_size,
              "wall_s": time.time() - started, "results": rows,
              "note": "wall-clock milliseconds on this machine; emulated GPU time = these / "
                      "time_scale. A load average above the core count means other work shared "
                      "the CPUs: the figures then measure CPU contention as much as routing."}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'config':<14}{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p99':>10}{'tok/s':>8}{'hit':>6}   (medians over seeds)")
    for r in rows:
        m = r.get("median")
        if not m or m["ttft_p99_ms"] is None:
            print(f"{r['config']:<14} failed")
            continue
        print(f"{r['config']:<14}{m['ttft_p50_ms']:>8.0f}ms{m['ttft_p99_ms']:>8.0f}ms"
              f"{m['e2e_p99_ms']:>8.0f}ms{m['throughput_tok_s']:>8.0f}{m['prefix_hit']:>6.0%}")
    for r in rows:
        for rank, (n, m) in r.get("emulation_overshoot", {}).items():
            if n > 0.1 * m:
                print(f"WARNING [{r['config']}] {rank or 'scheduler'}: {n} of {m} steps outlasted the "
                      f"emulated GPU step: these timings are the CPU's, not the emulated GPU's "
                      f"(raise --time-scale or lower --rate)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
