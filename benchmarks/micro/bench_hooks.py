"""Overhead of block_sgl's instance hooks.

1. Publish cost: one snapshot publish from scheduler-like state (8 / 64 / 256 running requests,
   0 or as many waiting; fake requests with the attributes the hooks read), split in two:
   * scheduler thread: ``SchedulerTap._publish_snapshot`` — capture the snapshot (which
     requests; their output and prefix lengths; the scalars) and the batched step records, put
     them on the publisher's queue;
   * total: that plus the publisher thread's share before the socket send — take the item off
     the queue, finish the Snapshot (static columns, Structs) and msgpack-encode each message
     (``Publisher.prepare``), measured back to back on one thread.
   Both for a steady batch (the same requests as at the previous publish, outputs growing) and
   with churn (``CHURN`` requests finish and as many join between two publishes: the static
   per-request columns must be rebuilt). Also the whole step hook (``before_run_batch`` +
   ``after_process_batch_result`` of a decode step that publishes: the step record too).
   Configurations are interleaved in rounds so that machine noise hits them alike; figures are
   medians over all samples.
2. Step-time overhead on real SGLang: emulated instances side by side (same settings, one with
   BLOCK_SGL_PUBLISH, one without, and with ``--compare REF`` one more publishing with REF's
   hooks) run the same workload in turn; reported: the hooks' own scheduler-thread time per step
   (``hook_seconds_total`` / ``steps_total`` from the stream) as a fraction of the measured step
   time, its spread over the snapshot intervals (from every Snapshot on the stream), and the
   workload's wall time on each instance.

    .venv/bin/python benchmarks/micro/bench_hooks.py [--json] [--skip-sglang] [--compare GIT_REF]

``--compare HEAD`` measures the committed hooks next to the working tree's (micro part:
interleaved in the same process; SGLang part: a third instance importing ``git archive HEAD``).

Results: benchmarks/results/micro_hooks.json; notes: benchmarks/micro/README_hooks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
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
CHURN = 2
"""Requests that finish (and join) between two publishes in the churn rows."""


def fake_req(i: int):
    return types.SimpleNamespace(
        rid=f"req-{i:08d}", origin_input_ids=[0] * (500 + i % 1000), output_ids=[0] * (i % 300),
        cached_tokens=128, prefix_len=0,
        sampling_params=types.SimpleNamespace(max_new_tokens=512, ignore_eos=False),
        finished_reason=None, finished=lambda: False)


def fake_scheduler(running: int, waiting: int, first: int = 0):
    reqs = [fake_req(first + i) for i in range(running)]
    return types.SimpleNamespace(
        running_batch=types.SimpleNamespace(reqs=reqs),
        waiting_queue=[fake_req(first + running + i) for i in range(waiting)],
        last_batch=None, chunked_req=None, forward_ct=1234,
        token_to_kv_pool_allocator=types.SimpleNamespace(available_size=lambda: 100000),
        tree_cache=types.SimpleNamespace(evictable_size=lambda: 5000), max_total_num_tokens=490000,
        new_token_ratio_tracker=types.SimpleNamespace(current=0.5))


class _Decode:
    """A ForwardMode stand-in (SGLang's is an IntEnum with these methods)."""

    def is_decode(self):
        return True

    def is_idle(self):
        return False

    def is_mixed(self):
        return False


DECODE = _Decode()


def load_implementation(ref: str | None):
    """(SchedulerTap, Publisher) of the working tree (None) or of a git commit (``--compare``)."""
    if ref is None:
        return SchedulerTap, Publisher
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]

    def module(name: str, path: str):
        source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
        mod = types.ModuleType(name)
        exec(compile(source, f"{ref}:{path}", "exec"), mod.__dict__)
        return mod

    publisher = module("block_sgl.hooks.publisher", "block_sgl/hooks/publisher.py")
    current = sys.modules["block_sgl.hooks.publisher"]
    sys.modules["block_sgl.hooks.publisher"] = publisher  # what the old scheduler module imports
    try:
        scheduler = module("block_sgl.hooks.scheduler", "block_sgl/hooks/scheduler.py")
    finally:
        sys.modules["block_sgl.hooks.publisher"] = current
    return scheduler.SchedulerTap, publisher.Publisher


class Case:
    """One configuration: a tap with an unstarted publisher (its queue is drained by hand)."""

    def __init__(self, running: int, waiting: int, churn: int, whole_step: bool, publishes: int,
                 implementation=(SchedulerTap, Publisher), label: str = "working tree"):
        self.running, self.waiting, self.churn, self.whole_step = running, waiting, churn, whole_step
        self.label = label
        tap_class, publisher_class = implementation
        self.tap = tap_class(HookSettings(snapshot_interval_ms=1e-6))  # publish at every step
        # Never started: no thread, no sockets; the queue is drained by sample().
        self.tap.publisher = publisher_class("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "bench")
        self.tap.instance_id = "bench"
        self.queue = self.tap.publisher._queue
        codec = p.Codec()
        # The publisher thread's work before the send (older publishers only encoded).
        self.prepare = getattr(self.tap.publisher, "prepare", codec.encode)
        self.sched = fake_scheduler(running, waiting)
        # Churn: publish k sees requests [k*churn, k*churn + running) of one pool (prepared here,
        # outside the timed region), i.e. `churn` finished and `churn` joined since publish k-1.
        self.pool = [fake_req(10**6 + i) for i in range(running + churn * publishes)] if churn else None
        self.k = 0
        self.batch = types.SimpleNamespace(forward_mode=DECODE, reqs=self.sched.running_batch.reqs,
                                           seq_lens_sum=running * 700, extend_lens=None, prefix_lens=None)
        self.scheduler_ns: list[int] = []
        self.total_ns: list[int] = []

    def sample(self, n: int) -> None:
        tap, sched, batch, q, prepare = self.tap, self.sched, self.batch, self.queue, self.prepare
        clock = time.perf_counter_ns
        for _ in range(n):
            if self.pool is not None:
                start = (self.k * self.churn) % (len(self.pool) - self.running + 1)
                sched.running_batch.reqs = batch.reqs = self.pool[start:start + self.running]
                self.k += 1
            for r in sched.running_batch.reqs:
                r.output_ids.append(0)  # a decode step happened (untimed)
            t0 = clock()
            if self.whole_step:
                tap.before_run_batch(sched)
                tap.after_process_batch_result(None, sched, batch)
            else:
                tap._publish_snapshot(sched, 0.0)
            t1 = clock()
            while q.qsize():  # the publisher thread's share, before the send
                item = q.get_nowait()
                for message in item if type(item) is tuple else (item,):
                    prepare(message)
            t2 = clock()
            self.scheduler_ns.append(t1 - t0)
            self.total_ns.append(t2 - t0)

    def row(self) -> dict:
        return {"implementation": self.label,
                "running": self.running, "waiting": self.waiting, "churn_per_publish": self.churn,
                "what": "step hook (record + publish)" if self.whole_step else "publish",
                "scheduler_thread_us": round(statistics.median(self.scheduler_ns) / 1e3, 2),
                "total_us": round(statistics.median(self.total_ns) / 1e3, 2)}


def publish_costs(compare: str | None = None, rounds: int = 10, per_round: int = 200) -> list[dict]:
    specs = [(n, w, 0, False) for n in (8, 64, 256) for w in (0, n)]
    specs += [(n, 0, CHURN, False) for n in (8, 64, 256)]
    specs += [(n, 0, 0, True) for n in (8, 64, 256)]
    implementations = [(load_implementation(None), "working tree")]
    if compare:
        implementations.append((load_implementation(compare), compare))
    cases = [Case(*spec, publishes=rounds * per_round + 10, implementation=impl, label=label)
             for spec in specs for impl, label in implementations]
    for case in cases:  # warm-up (first publish builds every static row)
        case.sample(10)
        case.scheduler_ns.clear()
        case.total_ns.clear()
    for _ in range(rounds):
        for case in cases:
            case.sample(per_round)
    return [case.row() for case in cases]


def _endpoints(n: int) -> list[str]:
    from block_sgl.testing.cluster import free_port, port_in_use

    out: list[str] = []
    while len(out) < n:
        port = free_port()
        replay = port + p.REPLAY_PORT_OFFSET
        if replay < 65536 and not port_in_use(replay) and all(
                abs(port - int(e.rsplit(":", 1)[1])) > 2 for e in out):
            out.append(f"tcp://127.0.0.1:{port}")
    return out


def _export(ref: str, into: str) -> tuple[tuple[str, str], ...]:
    """``block_sgl/`` of a commit, and the environment that makes an instance import it (checked
    here; PYTHONSAFEPATH: the working directory, the repository root, must not come first)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(["git", "archive", ref, "block_sgl"], cwd=root, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    env = (("PYTHONPATH", into), ("PYTHONSAFEPATH", "1"))
    where = subprocess.run([sys.executable, "-c", "import block_sgl.hooks.scheduler as m; print(m.__file__)"],
                           env=dict(env, PATH="/usr/bin:/bin"), cwd=root, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert where.startswith(into), f"{ref}'s hooks do not take precedence: {where}"
    return env


def step_overhead(compare: str | None = None) -> dict:
    """Instances side by side, one workload each in turn (twice): hooks of the working tree,
    no hooks, and (``compare``) hooks of that commit."""
    import tempfile

    from block_sgl.router.ingest import StreamSubscriber
    from block_sgl.testing.cluster import ClusterConfig, LocalCluster

    names = ["hooks_on", "hooks_off"] + ([f"hooks_on_{compare}"] if compare else [])
    endpoints = _endpoints(len(names))
    with tempfile.TemporaryDirectory() as tmp:
        env = [(("BLOCK_SGL_PUBLISH", endpoints[0]),), ()]
        if compare:
            env.append((("BLOCK_SGL_PUBLISH", endpoints[2]),) + _export(compare, tmp))
        hooked = {names[0]: endpoints[0]} | ({names[2]: endpoints[2]} if compare else {})
        config = ClusterConfig(instances=len(names), emulate="h100-llama2-7b", time_scale=4.0,
                               per_instance_env=tuple(env), start_timeout_s=600.0)
        with LocalCluster(config) as cluster:
            sub = StreamSubscriber(list(hooked.values()))
            sub.start()
            sub.wait_until(lambda s: not s.stale(), 30)
            taps = {name: SnapshotTap(e) for name, e in hooked.items()}

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

            walls: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(2):  # alternate to spread machine noise evenly
                for name, url in zip(names, cluster.urls):
                    walls[name].append(workload(url))
            time.sleep(1.5)
            snaps = {name: sub.states[e].snapshot for name, e in hooked.items()}
            steps = {name: [d for rec in sub.states[e].steps for d in rec.duration_s]
                     for name, e in hooked.items()}
            sub.stop()
            intervals = {name: tap.stop() for name, tap in taps.items()}
    out: dict = {}
    for name in hooked:
        snap, spread = snaps[name], sorted(intervals[name])
        per_step_hook = snap.hook_seconds_total / max(snap.steps_total, 1)
        step = statistics.median(steps[name])
        out[name] = {
            "hook_us_per_step": per_step_hook * 1e6, "median_step_ms": step * 1e3,
            "hook_fraction_of_step": per_step_hook / step, "steps_total": snap.steps_total,
            "hook_us_per_step_by_interval": {
                "intervals": len(spread),
                "median": statistics.median(spread) * 1e6 if spread else None,
                "p90": spread[int(0.9 * (len(spread) - 1))] * 1e6 if spread else None,
                "max": spread[-1] * 1e6 if spread else None}}
    out["wall_s"] = {name: statistics.median(w) for name, w in walls.items()}
    out["workload"] = ("16 requests x (300 in, 100 out), concurrency 8, greedy, h100-llama2-7b "
                       "emulated at time scale 4, per instance, twice, instances in turn; "
                       "snapshot interval 10 ms (default)")
    return out


class SnapshotTap:
    """Every Snapshot on the live stream: hook time per step between two consecutive ones."""

    def __init__(self, endpoint: str):
        import zmq

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 100)
        self._sock.connect(endpoint)
        self._stop = threading.Event()
        self._points: list[tuple[int, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        codec = p.Codec()
        while not self._stop.is_set():
            try:
                _, _, payload = self._sock.recv_multipart()
            except zmq.Again:
                continue
            message = codec.decode(payload)
            if isinstance(message, p.Snapshot):
                self._points.append((message.steps_total, message.hook_seconds_total))

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        self._sock.close(0)
        self._ctx.term()
        pts = self._points
        return [(h1 - h0) / (s1 - s0) for (s0, h0), (s1, h1) in zip(pts, pts[1:]) if s1 > s0]


def calibrate() -> float:
    return statistics.median(
        timeit.timeit(lambda: sum(range(1000)), number=200) / 200 for _ in range(20)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    ap.add_argument("--skip-sglang", action="store_true", help="only the publish-cost part")
    ap.add_argument("--compare", metavar="GIT_REF",
                    help="also measure the hooks of this commit (e.g. HEAD), interleaved")
    args = ap.parse_args()
    before = calibrate()
    rows = publish_costs(args.compare)
    after = calibrate()
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "calibration_sum_range_1000_us": [round(before, 2), round(after, 2)],
              "publish": rows}
    print(f"machine speed reference: sum(range(1000)) = {before:.2f} / {after:.2f} us before / after "
          "(about 8 us on an idle core of this machine kind; higher means contention)")
    print(f"{'':14s} {'':29s} {'running':>7s} {'waiting':>7s} {'churn':>5s} {'sched. thread':>13s} "
          f"{'total':>8s}")
    for r in rows:
        print(f"{r['implementation'][:14]:14s} {r['what']:29s} {r['running']:7d} {r['waiting']:7d} "
              f"{r['churn_per_publish']:5d} {r['scheduler_thread_us']:10.2f} us {r['total_us']:8.2f} us")
    if not args.skip_sglang:
        result["step_overhead"] = so = step_overhead(args.compare)
        for name, r in so.items():
            if name.startswith("hooks_on"):
                spread = r["hook_us_per_step_by_interval"]
                print(f"{name}: hooks per step {r['hook_us_per_step']:.1f} us = "
                      f"{100 * r['hook_fraction_of_step']:.3f} % of the median step "
                      f"({r['median_step_ms']:.1f} ms, {r['steps_total']} steps); per snapshot "
                      f"interval: median {spread['median']:.1f} us, p90 {spread['p90']:.1f} us, "
                      f"max {spread['max']:.1f} us")
        print("workload wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in so["wall_s"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
