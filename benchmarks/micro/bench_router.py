"""Router micro-benchmarks (issue 6, item 10).

1. ``decision``: the routing core's decision latency (``Router.decide``: page hashing, prefix
   lookup, views, fastsim on every instance, pick) at 4 / 16 / 64 instances over synthetic
   snapshots (32 running + 8 waiting per instance, part of the prompt cached on one instance),
   and again with every instance's snapshot new at each decision (a busy instance publishes
   one every ~10 ms, so a live router rebuilds fastsim's view of most instances per decision);
   tokenisation of the same prompt is reported separately. No network.
2. ``fit``: one refit of the step model on a full calibration window (1024 records), mixed
   and repeated step shapes (the router's stream thread runs it at most twice per
   ``--calibration-refit-interval``).
3. ``proxy``: added latency of the block_sgl router vs a direct connection, vs sglang-router
   0.3.2 and vs the floor of any aiohttp proxy (``bare_proxy.py``), side by side in one run, in front of one real SGLang CPU instance (tiny model, no
   emulation: requests are short): non-streaming latency and streaming time to first byte on
   keep-alive connections, sequential and at concurrency 8 / 32; and each router's RSS.
   Sequential cells are measured twice: in blocks of ``--requests`` per target (with each
   router's CPU per request), and with the targets interleaved request by request
   (``paired_added_p50_ms``: the median per-request difference to the direct connection, with
   a 90 % bootstrap interval; drift between blocks cancels). In the paired pass a target's
   consecutive requests are ≈ 60–80 ms apart, not back to back: a stall that needs the previous
   response's delayed ACK outstanding (sglang-router's Nagle delay) shows only in the blocks.

    python benchmarks/micro/bench_router.py decision [--json]
    python benchmarks/micro/bench_router.py fit [--json]
    python benchmarks/micro/bench_router.py proxy --sglang-router-python /tmp/sgr/bin/python \
        [--length-model DIR] [--json]

Results: ``benchmarks/results/micro_router.json`` (written with ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


# -- 1. decision latency -----------------------------------------------------------------------

def bench_decision(n_instances: int, repeats: int, prompt_tokens: int = 2000) -> dict:
    from block_sgl import protocol as p
    from block_sgl.page_hash import PromptPages, page_hashes
    from block_sgl.page_hash import implementation as page_hash_implementation
    from block_sgl.router.config import RouterConfig
    from block_sgl.router.core import Router
    from block_sgl.router.ingest import InstanceState

    class Subscriber:
        def __init__(self, endpoints, stale_after_s, on_cache_event, on_steps):
            self.states = {e: InstanceState(endpoint=e) for e in endpoints}
            self.on_cache_event = on_cache_event

        def start(self):
            pass

        def stop(self):
            pass

    urls = tuple(f"http://10.0.0.{i}:30000" for i in range(n_instances))
    endpoints = [f"tcp://10.0.0.{i}:5600" for i in range(n_instances)]
    router = Router(RouterConfig(worker_urls=urls, policy="block", stale_after_s=3600),
                    subscriber_factory=Subscriber)
    router.attach_streams(endpoints)
    rng = np.random.default_rng(0)

    def columns(n, start):
        return p.RequestColumns(
            rid=[f"r{start + k}" for k in range(n)],
            input_len=[int(x) for x in rng.integers(100, 3000, n)], prefix_len=[0] * n,
            output_len=[int(x) for x in rng.integers(0, 300, n)],
            max_new_tokens=[1024] * n, ignore_eos=[False] * n)

    for i, e in enumerate(endpoints):
        st = router.subscriber.states[e]
        st.hello = p.Hello(instance_id=f"i{i}", url=urls[i], model="m", page_size=16,
                           max_total_num_tokens=400_000, max_running_requests=256,
                           chunked_prefill_size=8192, max_prefill_tokens=16384,
                           schedule_policy="fcfs", hardware_profile="h100-llama2-7b")
        st.snapshot = p.Snapshot(instance_id=f"i{i}", time=time.time(), forward_ct=1,
                                 running=columns(32, 1000 * i), waiting=columns(8, 1000 * i + 500),
                                 free_tokens=300_000, evictable_tokens=10_000,
                                 max_total_num_tokens=400_000, new_token_ratio=0.5)
        st.last_message_at = time.monotonic() + 1e6
    ids = [int(x) for x in rng.integers(100, 30000, prompt_tokens)]
    router.subscriber.on_cache_event(endpoints[0], p.CacheStored(
        instance_id="i0", block_hashes=page_hashes(ids, 16)[:60], parent_block_hash=None,
        block_size=16))
    rv = router.request_view(text="", token_ids=ids, max_new_tokens=512, ignore_eos=False)
    for _ in range(20):
        router.decide(rv, ids)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        router.decide(rv, ids)
        times.append(time.perf_counter() - t)
    # A busy instance publishes a snapshot every ~10 ms, so a live router rebuilds fastsim's
    # view of most instances at most decisions: the same, with every snapshot new each time.
    import msgspec

    states = [router.subscriber.states[e] for e in endpoints]
    fresh_times = []
    for _ in range(repeats):
        for st in states:
            st.snapshot = msgspec.structs.replace(st.snapshot, time=time.time())
        t = time.perf_counter()
        router.decide(rv, ids)
        fresh_times.append(time.perf_counter() - t)
    # The decision hashes the prompt's pages up to the longest cached prefix (+ 1); the whole
    # chain is hashed after the pick, off the decision path (Router.remember_prefix).
    held = set(page_hashes(ids, 16)[:60])
    matched_times, full_times = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        PromptPages(ids, 16).leading_in(held)
        matched_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        PromptPages(ids, 16).all()
        full_times.append(time.perf_counter() - t)
    us = np.array(times) * 1e6
    return {"instances": n_instances, "prompt_tokens": prompt_tokens,
            "page_hash_implementation": page_hash_implementation(),
            "decision_p50_us": float(np.median(us)), "decision_p99_us": float(np.percentile(us, 99)),
            "decision_new_snapshots_p50_us": float(np.median(fresh_times) * 1e6),
            "of_which_page_hashing_p50_us": float(np.median(matched_times) * 1e6),
            "full_chain_page_hashing_p50_us": float(np.median(full_times) * 1e6)}


def bench_fit(repeats: int) -> list[dict]:
    """``perf_model.fit`` on a full calibration window (1024 records), as the router's stream
    thread runs it at most twice per ``--calibration-refit-interval``: random mixed step
    shapes, and the few repeated shapes of an instance serving equal short requests (its
    systems are singular at most knees)."""
    from block_sgl.predictor import perf_model as pm
    from block_sgl.predictor.step_model import DEFAULT_H100_LLAMA2_7B

    rng = np.random.default_rng(0)
    n = 1024
    prefill = np.where(rng.random(n) < 0.2, rng.integers(1, 2000, n), 0).astype(float)
    decode = rng.integers(0, 32, n).astype(float)
    decode[prefill + decode == 0] = 1
    shapes = pm.StepRecords(prefill, prefill * rng.integers(0, 3000, n), decode,
                            decode * rng.integers(100, 2000, n), np.ones(n))
    mixed = pm.StepRecords(*dataclasses.astuple(shapes)[:4], pm.predict_seconds(
        DEFAULT_H100_LLAMA2_7B, shapes) * rng.lognormal(0, 0.1, n))
    # equal 4-token prompts, 4 output tokens: a prefill step then decode steps of one sequence
    phase = np.arange(n) % 5
    prefill = np.where(phase == 0, 4.0, 0.0)
    decode = np.where(phase == 0, 0.0, 1.0)
    seconds = np.where(phase == 0, 0.012, 0.006) * rng.lognormal(0, 0.05, n)
    repeated = pm.StepRecords(prefill, prefill * 2.5, decode, decode * (4 + phase), seconds)
    rows = []
    for kind, records in (("mixed-shape", mixed), ("repeated-shape", repeated)):
        pm.fit(records, prior=DEFAULT_H100_LLAMA2_7B)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            pm.fit(records, prior=DEFAULT_H100_LLAMA2_7B)
            times.append(time.perf_counter() - t)
        rows.append({"records": n, "records_kind": kind,
                     "fit_p50_ms": float(np.median(times) * 1e3)})
    return rows


def bench_tokenize(repeats: int) -> dict:
    from block_sgl.router.tokenize import PromptTokenizer
    from block_sgl.testing.tiny_model import make_tiny_model

    tok = PromptTokenizer(make_tiny_model())
    text = (ROOT / "README.md").read_text()[:8000]
    n = len(tok.encode(text))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        tok.encode(text)
        times.append(time.perf_counter() - t)
    return {"prompt_chars": len(text), "prompt_tokens": n,
            "tokenize_p50_us": float(np.median(times) * 1e6)}


# -- 2. proxy overhead -------------------------------------------------------------------------

async def _measure(url: str, n: int, concurrency: int, stream: bool) -> list[float]:
    """Per request: seconds to the full body (non-streaming) or to the first byte (streaming),
    over keep-alive connections (one aiohttp session, as a client library would)."""
    import aiohttp

    body = _request_body(stream)
    out: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one():
            async with sem:
                t = time.perf_counter()
                async with s.post(f"{url}/generate", json=body) as r:
                    if stream:
                        await r.content.readany()
                        out.append(time.perf_counter() - t)
                        await r.read()
                    else:
                        await r.read()
                        out.append(time.perf_counter() - t)
                    assert r.status == 200, r.status
        for _ in range(min(concurrency, 8)):  # warm the connections
            await one()
        out.clear()
        await asyncio.gather(*(one() for _ in range(n)))
    return out


def _request_body(stream: bool) -> dict:
    return {"text": "The quick brown fox", "sampling_params": {
        "max_new_tokens": 4 if stream else 1, "temperature": 0, "ignore_eos": True},
        "stream": stream}


async def _measure_paired(targets: dict[str, str], n: int, stream: bool,
                          seed: int = 0) -> dict[str, list[float]]:
    """Sequential requests, the targets interleaved request by request (in a fresh random
    order for every request index), each over its own keep-alive connection. Request ``i`` of
    every target then ran within a few tens of ms of the others, so the per-index differences
    to ``direct`` cancel the machine's drift, which moves a block of 100 requests by ±1–2 ms
    on this VM (what limits the block-interleaved cells)."""
    import random

    import aiohttp

    body = _request_body(stream)
    sessions = {k: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                for k in targets}
    out: dict[str, list[float]] = {k: [] for k in targets}

    async def one(name: str) -> float:
        t = time.perf_counter()
        async with sessions[name].post(f"{targets[name]}/generate", json=body) as r:
            if stream:
                await r.content.readany()
                elapsed = time.perf_counter() - t
                await r.read()
            else:
                await r.read()
                elapsed = time.perf_counter() - t
            assert r.status == 200, r.status
        return elapsed

    try:
        for name in targets:  # warm each connection
            for _ in range(4):
                await one(name)
        rng = random.Random(seed)
        order = list(targets)
        for _ in range(n):
            rng.shuffle(order)
            for name in order:
                out[name].append(await one(name))
    finally:
        for s in sessions.values():
            await s.close()
    return out


def paired_added(xs: list[float], direct: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median of the per-request differences to ``direct`` (ms) and its 90 % bootstrap
    interval."""
    diff = (np.asarray(xs) - np.asarray(direct)) * 1e3
    if len(diff) == 0:
        raise ValueError("no paired samples")
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(diff, size=(1000, len(diff))), axis=1)
    lo, hi = np.percentile(boots, [5, 95])
    return float(np.median(diff)), float(lo), float(hi)


def _rss_mb(pid: int) -> float:
    total = 0
    for child in [pid] + _children(pid):
        try:
            for line in open(f"/proc/{child}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children, from /proc."""
    total = 0
    for p in [pid] + _children(pid):
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += _children(k)
    return out


def _wait_http(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def bench_proxy(args) -> dict:
    from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port

    publish = f"tcp://127.0.0.1:{free_port()}"
    config = ClusterConfig(instances=1, env=(("BLOCK_SGL_PUBLISH", publish),),
                           log_dir=args.log_dir)
    rows = []
    with LocalCluster(config) as cluster:
        worker = cluster.urls[0]
        routers = {}
        procs = []
        try:
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "block_sgl.launch_router", "--worker-urls", worker,
                 "--port", str(port), "--policy", "block", "--log-level", "warning"]
                + (["--length-model", args.length_model] if args.length_model else [])))
            routers["block_sgl"] = (f"http://127.0.0.1:{port}", procs[-1])
            # The floor of any aiohttp proxy here (no routing, no parsing): see bare_proxy.py.
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("bare_proxy.py")),
                 "--upstream", worker, "--port", str(port)]))
            routers["bare_aiohttp_proxy"] = (f"http://127.0.0.1:{port}", procs[-1])
            if args.sglang_router_python:
                port = free_port()
                procs.append(subprocess.Popen(
                    [args.sglang_router_python, "-m", "sglang_router.launch_router",
                     "--worker-urls", worker, "--port", str(port), "--policy", "cache_aware",
                     "--log-level", "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                routers["sglang_router_0.3.2"] = (f"http://127.0.0.1:{port}", procs[-1])
            for url, _ in routers.values():
                _wait_http(f"{url}/health")
            targets = {"direct": worker, **{k: v[0] for k, v in routers.items()}}
            for stream in (False, True):
                for conc in (1, 8, 32):
                    n = args.requests if conc == 1 else args.requests * 2
                    # Interleave targets, several rounds, so drift hits all alike.
                    samples = {k: [] for k in targets}
                    cpu_s = dict.fromkeys(targets, 0.0)  # the router process's CPU (user + sys)
                    requests = dict.fromkeys(targets, 0)
                    for _ in range(args.rounds):
                        for name, url in targets.items():
                            pid = routers[name][1].pid if name in routers else None
                            before = _cpu_seconds(pid) if pid else 0.0
                            samples[name] += asyncio.run(_measure(url, n, conc, stream))
                            cpu_s[name] += (_cpu_seconds(pid) - before) if pid else 0.0
                            requests[name] += n + min(conc, 8)  # + the warm-up requests
                    direct = statistics.median(samples["direct"])
                    paired = {}
                    if conc == 1:
                        paired = asyncio.run(_measure_paired(targets, args.requests * args.rounds,
                                                             stream))
                    for name, xs in samples.items():
                        rows.append({"mode": "stream_ttfb" if stream else "non_stream",
                                     "concurrency": conc, "target": name,
                                     "p50_ms": statistics.median(xs) * 1e3,
                                     "p90_ms": float(np.percentile(xs, 90) * 1e3),
                                     "added_p50_ms": (statistics.median(xs) - direct) * 1e3,
                                     "router_cpu_ms_per_request": (
                                         cpu_s[name] / requests[name] * 1e3
                                         if name in routers else None),
                                     "n": len(xs)})
                        line = ""
                        if paired:
                            med, lo, hi = paired_added(paired[name], paired["direct"])
                            rows[-1].update({"paired_added_p50_ms": med,
                                             "paired_added_ci90_ms": [lo, hi],
                                             "paired_n": len(paired[name])})
                            line = f"  paired {med:+6.2f} [{lo:+.2f}, {hi:+.2f}] ms"
                        cpu = rows[-1]["router_cpu_ms_per_request"]
                        print(f"{rows[-1]['mode']:11s} c={conc:<3d} {name:22s} "
                              f"p50 {rows[-1]['p50_ms']:7.2f} ms  added {rows[-1]['added_p50_ms']:+7.2f} ms"
                              + line
                              + (f"  router CPU {cpu:5.2f} ms/request" if cpu is not None else ""),
                              flush=True)
            rss = {name: _rss_mb(proc.pid) for name, (_, proc) in routers.items()}
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(15)
    return {"rows": rows, "router_rss_mb": rss, "block_sgl_length_model": args.length_model}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("decision", "fit", "proxy", "all"))
    ap.add_argument("--repeats", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=100, help="requests per proxy cell and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sglang-router-python",
                    help="python of a venv with sglang-router==0.3.2 (side-by-side baseline)")
    ap.add_argument("--length-model", default=None,
                    help="a train_length directory the block_sgl router loads (its RSS target is "
                         "with the tokenizer and a length model loaded)")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", help="merge results into this JSON file")
    ap.add_argument("--json", action="store_true", help="print the results as JSON last")
    args = ap.parse_args(argv)
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPUs {platform.processor()}",
              "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.what in ("decision", "all"):
        result["decision"] = [bench_decision(k, args.repeats) for k in (4, 16, 64)]
        result["tokenize"] = bench_tokenize(200)
        for row in result["decision"]:
            print(f"decision @ {row['instances']:2d} instances: p50 {row['decision_p50_us']:7.1f} µs "
                  f"p99 {row['decision_p99_us']:7.1f} µs; every snapshot new: p50 "
                  f"{row['decision_new_snapshots_p50_us']:7.1f} µs "
                  f"(page hashing {row['of_which_page_hashing_p50_us']:.1f} µs; whole chain, after "
                  f"the pick: {row['full_chain_page_hashing_p50_us']:.1f} µs)")
        t = result["tokenize"]
        print(f"tokenize {t['prompt_tokens']} tokens: p50 {t['tokenize_p50_us']:.0f} µs")
    if args.what in ("fit", "all"):
        result["step_model_fit"] = bench_fit(5)
        for row in result["step_model_fit"]:
            print(f"step-model fit of {row['records']} {row['records_kind']} records: "
                  f"p50 {row['fit_p50_ms']:.1f} ms")
    if args.what in ("proxy", "all"):
        result["proxy"] = bench_proxy(args)
        print("router RSS (MB):", result["proxy"]["router_rss_mb"])
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(result)
        path.write_text(json.dumps(old, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
