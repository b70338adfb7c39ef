"""Overhead of block_sgl's instance hooks.

1. Publish cost: building one Snapshot from scheduler-like state (8 / 64 / 256 running requests,
   as many waiting) and encoding it with the protocol codec — the work the scheduler thread does
   per published snapshot (the send happens on the publisher thread). Median over repeats.
2. Step-time overhead on real SGLang: two emulated instances side by side (same settings, one
   with BLOCK_SGL_PUBLISH, one without) run the same workload; reported: the hooks' own
   scheduler-thread time per step (``hook_seconds_total`` / ``steps_total`` from the stream) as a
   fraction of the measured step time, and the workload's wall time on each instance.

    .venv/bin/python benchmarks/micro/bench_hooks.py [--json] [--skip-sglang]

Results: benchmarks/results/micro_hooks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import timeit
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from block_sgl import protocol as p
from block_sgl.hooks.flags import HookSettings
from block_sgl.hooks.publisher import Publisher
from block_sgl.hooks.scheduler import SchedulerTap

RESULTS = Path(__file__).resolve().parents[1] / "results" / "micro_hooks.json"


def fake_req(i: int):
    return types.SimpleNamespace(
        rid=f"req-{i:08d}", origin_input_ids=[0] * (500 + i), output_ids=[0] * (i % 300),
        cached_tokens=128, prefix_len=0, sampling_params=types.SimpleNamespace(max_new_tokens=512, ignore_eos=False),
        finished=lambda: False)


def fake_scheduler(running: int, waiting: int):
    reqs = [fake_req(i) for i in range(running)]
    return types.SimpleNamespace(
        running_batch=types.SimpleNamespace(reqs=reqs),
        waiting_queue=[fake_req(running + i) for i in range(waiting)],
        last_batch=None, chunked_req=None, forward_ct=1234,
        token_to_kv_pool_allocator=types.SimpleNamespace(available_size=lambda: 100000),
        tree_cache=types.SimpleNamespace(evictable_size=lambda: 5000), max_total_num_tokens=490000,
        new_token_ratio_tracker=types.SimpleNamespace(current=0.5))


def publish_cost(running: int, waiting: int, repeats: int = 2000) -> float:
    tap = SchedulerTap(HookSettings())
    tap.publisher = Publisher("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "bench")  # never started
    tap.instance_id = "bench"
    codec = p.Codec()
    sched = fake_scheduler(running, waiting)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        codec.encode(tap.build_snapshot(sched))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def step_overhead() -> dict:
    from block_sgl.router.ingest import StreamSubscriber
    from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port

    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    config = ClusterConfig(instances=2, emulate="h100-llama2-7b", time_scale=4.0,
                           per_instance_env=((("BLOCK_SGL_PUBLISH", endpoint),), ()))
    with LocalCluster(config) as cluster:
        sub = StreamSubscriber([endpoint])
        sub.start()
        sub.wait_until(lambda s: not s.stale(), 30)

        def workload(url):
            def one(i):
                body = json.dumps({"input_ids": [(i * 97 + k) % 20000 + 10 for k in range(300)],
                                   "sampling_params": {"max_new_tokens": 100, "ignore_eos": True,
                                                       "temperature": 0}}).encode()
                req = urllib.request.Request(f"{url}/generate", data=body,
                                             headers={"content-type": "application/json"})
                urllib.request.urlopen(req, timeout=300).read()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(16)))
            return time.perf_counter() - t0

        walls = {"hooks_on": [], "hooks_off": []}
        for _ in range(2):  # alternate to spread machine noise evenly
            walls["hooks_on"].append(workload(cluster.urls[0]))
            walls["hooks_off"].append(workload(cluster.urls[1]))
        state = sub.states[endpoint]
        time.sleep(1.5)
        snap = state.snapshot
        steps = [d for rec in state.steps for d in rec.duration_s]
        sub.stop()
    per_step_hook = snap.hook_seconds_total / max(snap.steps_total, 1)
    step = statistics.median(steps)
    return {"hook_us_per_step": per_step_hook * 1e6, "median_step_ms": step * 1e3,
            "hook_fraction_of_step": per_step_hook / step,
            "wall_s_hooks_on": statistics.median(walls["hooks_on"]),
            "wall_s_hooks_off": statistics.median(walls["hooks_off"]),
            "workload": "16 requests x (300 in, 100 out), concurrency 8, greedy, h100-llama2-7b x4"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    ap.add_argument("--skip-sglang", action="store_true", help="only the publish-cost part")
    args = ap.parse_args()
    rows = [{"running": n, "waiting": w, "publish_us": round(publish_cost(n, w), 2)}
            for n in (8, 64, 256) for w in (0, n)]
    calibration = statistics.median(
        timeit.timeit(lambda: sum(range(1000)), number=200) / 200 for _ in range(20)) * 1e6
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "calibration_sum_range_1000_us": round(calibration, 2),
              "publish": rows}
    print(f"machine speed reference: sum(range(1000)) = {calibration:.2f} us "
          "(about 8 us on an idle core of this machine kind; higher means contention)")
    for r in rows:
        print(f"snapshot build+encode, {r['running']:>3} running + {r['waiting']:>3} waiting: {r['publish_us']:8.2f} us")
    if not args.skip_sglang:
        result["step_overhead"] = step_overhead()
        so = result["step_overhead"]
        print(f"hooks per step: {so['hook_us_per_step']:.1f} us = {100 * so['hook_fraction_of_step']:.3f} % "
              f"of the median step ({so['median_step_ms']:.1f} ms); workload wall time "
              f"on {so['wall_s_hooks_on']:.2f} s vs off {so['wall_s_hooks_off']:.2f} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
