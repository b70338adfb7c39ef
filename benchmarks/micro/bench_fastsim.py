"""Microbenchmark: microseconds per instance-prediction of fastsim, compiled vs the Python twin.

    .venv/bin/python benchmarks/micro/bench_fastsim.py [--json] [--repeats N] [--seed S]

Grid: 8 / 64 / 256 running x 0 / 32 / 128 waiting requests on an H100 + Llama-2-7B instance
(``DEFAULT_H100_LLAMA2_7B`` step model, 490k KV tokens, chunked prefill 8192, max 256 running);
one candidate (1000-token prompt, 200 predicted output tokens). Per cell: the median over
``--repeats`` of the mean time of a batch of calls to ``simulate`` (the kernel, reused
workspace; also the minimum, the figure least disturbed by neighbours on a shared machine), to ``fastsim.predict_many`` (per instance, one candidate against 8 copies), and to
the twin. Prints a table; writes ``benchmarks/results/micro_fastsim.json``; with ``--json`` the
last stdout line is that JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # idle BLAS threads spin on 2 cores
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from block_sgl import _fastsim, _fastsim_py  # noqa: E402
from block_sgl.fastsim import (Candidate, InstanceConfig, InstanceState,  # noqa: E402
                               RequestTable, predict_many)
from block_sgl.predictor.step_model import DEFAULT_H100_LLAMA2_7B  # noqa: E402

GRID_RUNNING = (8, 64, 256)
GRID_WAITING = (0, 32, 128)
CONFIG = InstanceConfig(max_total_num_tokens=490_000, max_running_requests=256,
                        chunked_prefill_size=8192, max_prefill_tokens=16384)
CANDIDATE = Candidate(input_len=1000, prefix_len=0, pred_output_len=200, max_new_tokens=1024)


def make_state(n_running: int, n_waiting: int, rng: np.random.Generator) -> InstanceState:
    """A busy instance with ShareGPT-like lengths."""
    def rows(n, running):
        inp = rng.integers(50, 2000, n)
        pre = (rng.random(n) < 0.3) * (inp // 2)
        out = rng.integers(1, 300, n) if running else np.zeros(n, dtype=np.int64)
        pred = np.maximum(out + rng.integers(1, 400, n), 1)
        return RequestTable(inp, pre, out, np.full(n, 1024), np.zeros(n), pred)
    running, waiting = rows(n_running, True), rows(n_waiting, False)
    used = int((running.input_len + running.output_len).sum())
    free = CONFIG.max_total_num_tokens - used
    return InstanceState(CONFIG, running, waiting, free_kv_tokens=free - free // 10,
                         evictable_tokens=free // 10, new_token_ratio=0.5)


def _batch_us(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def bench_cell(n_running: int, n_waiting: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1000 * n_running + n_waiting)
    state = make_state(n_running, n_waiting, rng)
    coeffs = DEFAULT_H100_LLAMA2_7B.as_array()
    args = (state.running.packed, state.waiting.packed, state.pending.packed, state.iscal,
            state.fscal, coeffs, CANDIDATE.packed)
    ws = _fastsim.Workspace()
    got_c = _fastsim.simulate(*args, ws)
    got_py = _fastsim_py.simulate(*args)
    if got_c != got_py:
        raise AssertionError(f"compiled {got_c} != twin {got_py}")
    states, out = [state] * 8, np.empty((8, 3))
    py_calls = max(1, min(20, int(0.05 / max(_batch_us(lambda: _fastsim_py.simulate(*args), 1)
                                             * 1e-6, 1e-6))))
    comp, many, py = [], [], []
    for _ in range(repeats):  # interleaved, so that all three see the same neighbours' load
        comp.append(_batch_us(lambda: _fastsim.simulate(*args, ws), 2000))
        many.append(_batch_us(lambda: predict_many(states, CANDIDATE, coeffs, out=out,
                                                   workspace=ws), 250) / 8)
        py.append(_batch_us(lambda: _fastsim_py.simulate(*args), py_calls))
    return {"running": n_running, "waiting": n_waiting,
            "compiled_us": round(statistics.median(comp), 3),
            "compiled_min_us": round(min(comp), 3),
            "predict_many_us": round(statistics.median(many), 3),
            "python_us": round(statistics.median(py), 1),
            "speedup": round(statistics.median(p / c for p, c in zip(py, comp)), 1),
            "ttft_s": round(got_c[0], 6), "e2e_s": round(got_c[1], 6)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cpus, load {load:.1f}, Python "
            f"{platform.python_version()}, numpy {np.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the JSON result as last line")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats per cell (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "micro_fastsim.json"))
    args = ap.parse_args(argv)
    rows = [bench_cell(r, w, args.repeats, args.seed) for r in GRID_RUNNING for w in GRID_WAITING]
    result = {"rows": rows, "machine": machine(), "unit": "microseconds per instance-prediction",
              "targets": {"compiled_us_at_64x32": 5.0, "min_speedup": 200}}
    print(f"{'running':>7} {'waiting':>7} {'compiled_us':>11} {'min_us':>7} {'many_us':>8} "
          f"{'python_us':>10}"
          f" {'speedup':>8} {'ttft_s':>9} {'e2e_s':>9}")
    for r in rows:
        print(f"{r['running']:>7} {r['waiting']:>7} {r['compiled_us']:>11.2f} "
              f"{r['compiled_min_us']:>7.2f} "
              f"{r['predict_many_us']:>8.2f} {r['python_us']:>10.1f} {r['speedup']:>7.0f}x "
              f"{r['ttft_s']:>9.4f} {r['e2e_s']:>9.4f}")
    print(f"machine: {result['machine']}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
