"""The accuracy benchmark's sampled-futures analysis (``benchmarks/accuracy/fastsim_accuracy.py``):
the MAPE-optimal point and the futures drawn from the workload's own process."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.accuracy import fastsim_accuracy as bench
from block_sgl import fastsim
from block_sgl.fastsim import Candidate, InstanceConfig, InstanceState, RequestTable
from block_sgl.predictor.step_model import DEFAULT_H100_LLAMA2_7B as M

CFG = InstanceConfig(max_total_num_tokens=200_000, max_running_requests=64,
                     chunked_prefill_size=8192, max_prefill_tokens=16384)


def expected_ape(p: float, xs: np.ndarray) -> float:
    return float(np.mean(np.abs(p - xs) / xs))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40))
def test_the_mape_optimal_point_is_a_sample_no_other_sample_beats(values):
    xs = np.array(values)
    point = bench._mape_optimal(xs)
    assert point in xs
    # The objective is piecewise linear with kinks at the samples: a sample is its minimum.
    assert expected_ape(point, xs) <= min(expected_ape(x, xs) for x in xs) + 1e-12


def test_the_mape_optimal_point_leans_to_the_small_outcomes():
    xs = np.array([1.0, 1.0, 10.0, 10.0, 10.0])  # median 10; 1/x weights favour 1
    assert bench._mape_optimal(xs) == 1.0
    assert expected_ape(1.0, xs) < expected_ape(10.0, xs)


def _inputs():
    running = RequestTable.from_rows([(400, 0, 20, 200, 1, 200)] * 4)
    state = InstanceState(CFG, running, RequestTable.empty(), free_kv_tokens=150_000)
    cand = Candidate(500, 0, 100, 100, True)
    e2e = fastsim.predict(state, cand, M).e2e_s
    return [("r0", state, cand, 0.0, e2e, 0.0)], fastsim.predict(state, cand, M)


def _run(rate: float, cv: float = 3.0, seed: int = 0, samples: int = 16) -> dict:
    inputs, _ = _inputs()
    results = {"r0": {}}
    bench.sampled_futures(inputs, results, M.as_array(), 0.0, 0.0, rate=rate, cv=cv, page=16,
                          samples=samples, seed=seed)
    return results["r0"]


def test_sampled_futures_are_reproducible_and_never_lighter_than_no_future():
    _, alone = _inputs()
    busy = _run(rate=5.0)
    assert busy == _run(rate=5.0)  # seeded
    # Arrivals only add work: no sampled outcome, hence no point, beats the empty future.
    assert busy["pred_e2e_sampled_futures"] > alone.e2e_s
    assert busy["pred_ttft_sampled_futures"] >= alone.ttft_s
    assert busy["e2e_sampled_futures_spread"] > 0.0
    assert busy["e2e_sampled_futures_expected_ape"] > 0.0


def test_a_near_silent_process_leaves_the_snapshot_prediction_unchanged():
    _, alone = _inputs()
    quiet = _run(rate=1e-6, cv=1.0)  # (at CV 3 even this rate has bursts: gamma shape 1/9)
    assert quiet["pred_e2e_sampled_futures"] == alone.e2e_s
    assert quiet["pred_ttft_sampled_futures"] == alone.ttft_s
    assert quiet["e2e_sampled_futures_expected_ape"] == 0.0
    assert quiet["e2e_sampled_futures_spread"] == 0.0


def test_the_workload_generator_is_unchanged_by_the_split_into_helpers():
    reqs = bench.workload(50, 1.5, 0)
    rng = np.random.default_rng(0)  # the generator as it was written before the split
    gaps = rng.gamma(shape=1 / 9, scale=9 / 1.5, size=50)
    system = rng.integers(100, 20000, size=512).tolist()
    for i, r in enumerate(reqs):
        inp = int(np.clip(rng.lognormal(np.log(500), 0.8), 32, 3000))
        out = int(np.clip(rng.lognormal(np.log(100), 0.7), 8, 400))
        body = rng.integers(100, 20000, size=inp).tolist()
        ids = (system + body) if rng.random() < 1 / 3 else body
        assert (r["ids"], r["out"], r["gap"]) == (ids, out, float(gaps[i]))
