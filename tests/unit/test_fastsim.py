"""fastsim: hand-checked scenarios, properties and input validation (both implementations)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from block_sgl import _fastsim, _fastsim_py
from block_sgl import fastsim as fs
from block_sgl.fastsim import (Candidate, InstanceConfig, InstanceState, Prediction,
                               RequestTable, predict, predict_many)
from block_sgl.predictor.step_model import DEFAULT_H100_LLAMA2_7B as M
from block_sgl.predictor.step_model import StepModel

IMPLS = {"compiled": _fastsim, "python": _fastsim_py}
CFG = InstanceConfig(max_total_num_tokens=200_000, max_running_requests=64,
                     chunked_prefill_size=8192, max_prefill_tokens=16384)
EMPTY = RequestTable.empty()


@pytest.fixture(params=sorted(IMPLS))
def sim(request):
    kernel = IMPLS[request.param]

    def run(state, cand, model=M, step_by_step=False):
        a = state.arrays
        return Prediction(*kernel.simulate(*a[:5], model.as_array(), cand.packed, None,
                                           step_by_step, *a[5:]))
    return run


def idle(cfg=CFG, **kw):
    return InstanceState(cfg, EMPTY, EMPTY, free_kv_tokens=cfg.max_total_num_tokens, **kw)


def prefill_time(extend, prefix=0):
    return M.step_time(extend, extend * (prefix + (extend + 1) / 2.0), 0, 0)


def decode_time(bs, ctx):
    return M.step_time(0, 0.0, bs, ctx)


def rows(n, inp=1000, pre=0, out=0, max_new=512, ieos=0, pred=100):
    return RequestTable.from_rows([(inp, pre, out, max_new, ieos, pred)] * n)


# ------------------------------------------------------------------------- hand-checked
def test_idle_instance_ttft_is_one_prefill_step(sim):
    p = sim(idle(), Candidate(1000, 0, 10, 100))
    assert p.ttft_s == prefill_time(1000)
    assert p.queue_s == 0.0
    e2e = p.ttft_s + sum(decode_time(1, 1000 + out) for out in range(1, 10))
    assert p.e2e_s == pytest.approx(e2e, rel=1e-12)


def test_single_token_output_finishes_at_ttft(sim):
    p = sim(idle(), Candidate(500, 0, 1, 100))
    assert p.e2e_s == p.ttft_s == prefill_time(500)


def test_output_capped_by_max_new_tokens(sim):
    long = sim(idle(), Candidate(500, 0, 1000, 20))
    exact = sim(idle(), Candidate(500, 0, 20, 20))
    assert long == exact


def test_cached_prefix_lowers_ttft(sim):
    cold = sim(idle(), Candidate(1000, 0, 10, 100))
    warm = sim(idle(), Candidate(1000, 600, 10, 100))
    assert warm.ttft_s == prefill_time(400, 600)
    assert warm.ttft_s < cold.ttft_s
    # a full match still recomputes the last token (Req._compute_max_prefix_len)
    assert sim(idle(), Candidate(1000, 1000, 1, 100)).ttft_s == prefill_time(1, 999)


def test_long_prompt_is_chunked(sim):
    cfg = InstanceConfig(max_total_num_tokens=200_000, max_running_requests=64,
                         chunked_prefill_size=2048)
    p = sim(idle(cfg), Candidate(5000, 0, 5, 100))
    chunks = [(2048, 0), (2048, 2048), (904, 4096)]
    assert p.ttft_s == pytest.approx(sum(prefill_time(e, pre) for e, pre in chunks), rel=1e-12)
    assert p.queue_s == 0.0


def test_chunked_request_in_progress_goes_first(sim):
    cfg = InstanceConfig(max_total_num_tokens=200_000, max_running_requests=64,
                         chunked_prefill_size=2048)
    waiting = RequestTable.from_rows([(10000, 0, 0, 100, 0, 10)])
    state = InstanceState(cfg, EMPTY, waiting, free_kv_tokens=190_000, chunked_idx=0,
                          chunked_prefilled=4096)
    p = sim(state, Candidate(1000, 0, 5, 100))
    t1 = prefill_time(2048, 4096)
    t2 = prefill_time(2048, 6144)
    # last chunk (1808) + the candidate's first chunk (the 240 tokens left in the budget)
    pairs3 = 1808 * (8192 + 1809 / 2.0) + 240 * (0 + 241 / 2.0)
    t3 = M.step_time(2048, pairs3, 0, 0)
    t4 = prefill_time(760, 240)  # the chunked candidate goes first; the other request waits
    assert p.queue_s == pytest.approx(t1 + t2, rel=1e-12)
    assert p.ttft_s == pytest.approx(t1 + t2 + t3 + t4, rel=1e-12)


def test_long_queue_delays_the_candidate(sim):
    cand = Candidate(1000, 0, 10, 512)
    ttfts = []
    for n in (0, 4, 16, 40):
        state = InstanceState(CFG, EMPTY, rows(n, inp=2000), free_kv_tokens=200_000)
        ttfts.append(sim(state, cand).ttft_s)
    assert ttfts == sorted(ttfts) and ttfts[0] < ttfts[-1]
    # 4 x 2000 waiting fill 8000 of the 8192-token chunk; the candidate takes the other 192
    # as THE chunked request and finishes alone in the next step (no mixed decode)
    state = InstanceState(CFG, EMPTY, rows(4, inp=2000), free_kv_tokens=200_000)
    p = sim(state, cand)
    pairs = 4 * (2000 * (0 + 2001 / 2.0)) + 192 * (0 + 193 / 2.0)
    assert p.queue_s == 0.0
    assert p.ttft_s == pytest.approx(M.step_time(8192, pairs, 0, 0) + prefill_time(808, 192),
                                     rel=1e-12)


def test_kv_nearly_full_waits_for_a_completion(sim):
    cfg = InstanceConfig(max_total_num_tokens=2000, max_running_requests=64)
    running = RequestTable.from_rows([(100, 0, 1, 100, 0, 51)])
    state = InstanceState(cfg, running, EMPTY, free_kv_tokens=600)
    # needs 500 + 100 + 1 < 600 - 0.7 * 99: no; it fits once the running request frees its KV
    p = sim(state, Candidate(500, 0, 10, 100))
    wait = sum(decode_time(1, 101 + j) for j in range(50))
    assert p.queue_s == pytest.approx(wait, rel=1e-12)
    assert p.ttft_s == pytest.approx(wait + prefill_time(500), rel=1e-12)
    roomy = sim(InstanceState(cfg, running, EMPTY, free_kv_tokens=1900),
                Candidate(500, 0, 10, 100))
    assert roomy.queue_s == 0.0


def test_max_running_requests_waits_for_a_completion(sim):
    cfg = InstanceConfig(max_total_num_tokens=200_000, max_running_requests=4)
    running = RequestTable.from_rows([(100, 0, 1, 100, 0, 11)] * 4)
    p = sim(InstanceState(cfg, running, EMPTY, free_kv_tokens=190_000),
            Candidate(1000, 0, 3, 100))
    wait = sum(decode_time(4, 4 * (101 + j)) for j in range(10))
    assert p.queue_s == pytest.approx(wait, rel=1e-12)
    assert p.ttft_s == pytest.approx(wait + prefill_time(1000), rel=1e-12)


def test_decode_batch_slows_the_candidates_decode(sim):
    running = RequestTable.from_rows([(2000, 0, 1, 1000, 0, 900)] * 32)
    busy = sim(InstanceState(CFG, running, EMPTY, free_kv_tokens=100_000),
               Candidate(1000, 0, 50, 100))
    alone = sim(idle(), Candidate(1000, 0, 50, 100))
    assert busy.e2e_s - busy.ttft_s > alone.e2e_s - alone.ttft_s


def test_pending_requests_queue_before_the_candidate(sim):
    base = InstanceState(CFG, EMPTY, rows(2), free_kv_tokens=200_000)
    more = base.with_pending(rows(30, inp=3000))
    cand = Candidate(1000, 0, 10, 512)
    assert sim(more, cand).ttft_s > sim(base, cand).ttft_s


def test_the_replay_starts_at_the_snapshot_and_counts_from_the_candidates_arrival(sim):
    cand = Candidate(1000, 0, 10, 100)
    alone = sim(idle(), cand)
    late = sim(idle(elapsed_s=0.5), cand)  # nothing ran meanwhile
    assert late == pytest.approx(alone, rel=1e-12)
    running = RequestTable.from_rows([(100, 0, 1, 100, 0, 50)])
    state = InstanceState(CFG, running, EMPTY, free_kv_tokens=190_000)
    first = decode_time(1, 101)
    # at the snapshot: prefill first; 2 ms later: the decode step begun at the snapshot ends
    # first; a step and a half later: the candidate waits for the end of the second one
    assert sim(state, cand).queue_s == 0.0
    assert sim(dataclasses.replace(state, elapsed_s=0.002), cand).queue_s == \
        pytest.approx(first - 0.002, rel=1e-9)
    two = first + decode_time(1, 102)
    assert sim(dataclasses.replace(state, elapsed_s=first * 1.5), cand).queue_s == \
        pytest.approx(two - first * 1.5, rel=1e-9)


def test_pending_requests_arrive_at_their_times(sim):
    """A pending request that reached the instance at the snapshot is prefilled in the step
    begun then, without the candidate that arrives 10 ms later; one that arrives with the
    candidate shares its prefill step; a time after the candidate's counts as the candidate's."""
    cand = Candidate(500, 0, 10, 100)
    base = idle(elapsed_s=0.01)
    pending = rows(1, inp=3000)
    early = sim(base.with_pending(pending, np.array([0.0])), cand)
    assert early.queue_s == pytest.approx(prefill_time(3000) - 0.01, rel=1e-9)
    assert early.ttft_s == pytest.approx(prefill_time(3000) + prefill_time(500) - 0.01,
                                         rel=1e-9)
    assert sim(base.with_pending(pending), cand) == early  # default: at the snapshot
    together = sim(base.with_pending(pending, np.array([0.01])), cand)
    assert together.queue_s == 0.0
    batch = M.step_time(3500, 3000 * 3001 / 2.0 + 500 * 501 / 2.0, 0, 0)
    assert together.ttft_s == pytest.approx(batch, rel=1e-9)
    assert sim(base.with_pending(pending, np.array([5.0])), cand) == together


def test_lpm_serves_the_longest_prefix_first(sim):
    waiting = rows(10, inp=3000)
    cand = Candidate(3000, 2900, 10, 512)
    fcfs = InstanceConfig(max_total_num_tokens=200_000, max_running_requests=64,
                          chunked_prefill_size=4096)
    lpm = dataclasses.replace(fcfs, schedule_policy="lpm")
    assert sim(InstanceState(fcfs, EMPTY, waiting, free_kv_tokens=200_000), cand).queue_s > 0
    assert sim(InstanceState(lpm, EMPTY, waiting, free_kv_tokens=200_000), cand).queue_s == 0


def test_retraction_under_kv_pressure_is_finite(sim):
    cfg = InstanceConfig(max_total_num_tokens=6000, max_running_requests=64)
    running = RequestTable.from_rows([(400, 0, 1, 2000, 1, 1500)] * 10)
    state = InstanceState(cfg, running, EMPTY, free_kv_tokens=1900)
    p = sim(state, Candidate(300, 0, 20, 100))
    assert math.isfinite(p.e2e_s) and p.ttft_s <= p.e2e_s
    assert sim(state, Candidate(300, 0, 20, 100), step_by_step=True) == pytest.approx(p)


def test_request_larger_than_the_pool_never_runs(sim):
    cfg = InstanceConfig(max_total_num_tokens=1000, max_running_requests=64)
    p = sim(InstanceState(cfg, EMPTY, EMPTY, free_kv_tokens=1000), Candidate(5000, 0, 5, 10))
    assert p == (math.inf, math.inf, math.inf)


def test_jumps_match_step_by_step(sim):
    rng = np.random.default_rng(3)
    running = RequestTable(rng.integers(10, 3000, 40), np.zeros(40), rng.integers(1, 50, 40),
                           np.full(40, 800), rng.integers(0, 2, 40), rng.integers(1, 700, 40))
    waiting = RequestTable(rng.integers(10, 3000, 20), np.zeros(20), np.zeros(20),
                           np.full(20, 800), np.zeros(20), rng.integers(1, 700, 20))
    state = InstanceState(CFG, running, waiting, free_kv_tokens=120_000, new_token_ratio=0.4)
    cand = Candidate(1500, 100, 300, 800)
    assert sim(state, cand) == pytest.approx(sim(state, cand, step_by_step=True), rel=1e-9)


# ------------------------------------------------------------------------- properties
req = st.tuples(st.integers(1, 1500), st.integers(0, 1), st.integers(1, 400),
                st.integers(0, 1), st.integers(1, 500))


def _table(reqs, running):
    out = []
    for inp, has_pre, mx, ieos, pred in reqs:
        o = min(pred, mx) // 2 if running else 0
        out.append((inp, inp // 2 * has_pre, o, mx, ieos, pred))
    return RequestTable.from_rows(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=st.lists(req, max_size=12), wait=st.lists(req, max_size=8), extra=req,
       cand=req, max_running=st.integers(1, 16), chunk=st.sampled_from([-1, 256, 2048]))
def test_more_queued_work_never_lowers_ttft(run, wait, extra, cand, max_running, chunk):
    cfg = InstanceConfig(max_total_num_tokens=100_000, max_running_requests=max_running,
                         chunked_prefill_size=chunk)
    c = Candidate(cand[0], cand[0] // 3, cand[4], cand[2])
    base = InstanceState(cfg, _table(run, True), _table(wait, False), free_kv_tokens=80_000)
    more = base.with_pending(_table([extra], False))
    assert predict(more, c, M).ttft_s >= predict(base, c, M).ttft_s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=st.lists(req, max_size=12), wait=st.lists(req, max_size=8), cand=req,
       more=st.integers(1, 300), free=st.integers(500, 40_000), max_running=st.integers(1, 16))
def test_longer_output_never_lowers_e2e(run, wait, cand, more, free, max_running):
    cfg = InstanceConfig(max_total_num_tokens=40_000, max_running_requests=max_running,
                         chunked_prefill_size=1024)
    state = InstanceState(cfg, _table(run, True), _table(wait, False), free_kv_tokens=free)
    short = predict(state, Candidate(cand[0], 0, cand[4], 1000), M)
    long = predict(state, Candidate(cand[0], 0, cand[4] + more, 1000), M)
    assert long.e2e_s >= short.e2e_s
    assert long.ttft_s == short.ttft_s


# ------------------------------------------------------------------------- API
def test_predict_many_matches_predict():
    states = [idle(), InstanceState(CFG, rows(8, out=3), rows(5), free_kv_tokens=150_000)]
    cands = [Candidate(1000, 0, 10, 100), Candidate(1000, 500, 10, 100)]
    out = predict_many(states, cands, M)
    assert out.shape == (2, 3)
    for i in range(2):
        assert tuple(out[i]) == predict(states[i], cands[i], M)
    assert np.array_equal(predict_many(states, cands[0], [M, M]),
                          predict_many(states, cands[0], M.as_array()))
    with pytest.raises(ValueError, match="candidates"):
        predict_many(states, cands[:1], M)


def test_predict_rows_over_a_reused_buffer_matches_predict_many():
    """The router's form: candidate rows are views of one (K, 5) buffer refilled per decision."""
    states = [idle(), InstanceState(CFG, rows(8, out=3), rows(5), free_kv_tokens=150_000)]
    buffer = np.zeros((2, 5), dtype=np.int64)
    row_views, out, ws = list(buffer), np.empty((2, 3)), fs.new_workspace()
    coeffs = [M.as_array(), M.as_array()]
    for cands in ([Candidate(1000, 0, 10, 100), Candidate(1000, 500, 10, 100)],
                  [Candidate(300, 16, 200, 256, True), Candidate(4000, 0, 1, 1)]):
        buffer[:] = [c.packed for c in cands]
        got = fs.predict_rows([s.arrays for s in states], row_views, coeffs, out, ws)
        assert np.array_equal(got, predict_many(states, cands, M))
    with pytest.raises(ValueError, match="need K each"):
        fs.predict_rows([s.arrays for s in states], row_views[:1], coeffs, out, ws)


def test_workspace_reuse_gives_the_same_answer():
    ws = fs.new_workspace()
    state = InstanceState(CFG, rows(30, out=3), rows(10), free_kv_tokens=150_000)
    big = InstanceState(CFG, rows(200, out=3), rows(100), free_kv_tokens=150_000)
    c = Candidate(1000, 0, 10, 100)
    first = predict(state, c, M, workspace=ws)
    predict(big, c, M, workspace=ws)
    assert predict(state, c, M, workspace=ws) == first == predict(state, c, M)


def test_compiled_kernel_is_selected():
    if os.environ.get("BLOCK_SGL_FASTSIM_PURE") == "1":
        pytest.skip("the pure-Python twin was requested")
    assert fs.implementation() == "compiled"


def test_env_var_selects_the_twin():
    code = "import block_sgl.fastsim as f; print(f.implementation())"
    env = dict(os.environ, BLOCK_SGL_FASTSIM_PURE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "python"


def test_missing_extension_is_an_import_error(monkeypatch):
    monkeypatch.delenv("BLOCK_SGL_FASTSIM_PURE", raising=False)
    monkeypatch.setitem(sys.modules, "block_sgl._fastsim", None)  # import fails
    monkeypatch.delattr(importlib.import_module("block_sgl"), "_fastsim")
    monkeypatch.delitem(sys.modules, "block_sgl.fastsim")
    with pytest.raises(ImportError, match="not built"):
        importlib.import_module("block_sgl.fastsim")
    monkeypatch.undo()
    importlib.import_module("block_sgl.fastsim")


# ------------------------------------------------------------------------- bad input
def _kernel_args(state=None, cand=None, coeffs=None):
    state = state or InstanceState(CFG, rows(2, out=1), rows(2), free_kv_tokens=150_000)
    cand = Candidate(100, 0, 5, 10) if cand is None else cand
    coeffs = M.as_array() if coeffs is None else coeffs
    return [*(a.copy() for a in state.arrays), coeffs, cand.packed.copy()]


def _set(args, idx, pos, value):
    args[idx][pos] = value
    return args


BAD = {
    "running.prefix_len": lambda a: _set(a, 0, (1, 0), 5000),
    "waiting.input_len": lambda a: _set(a, 1, (0, 1), 0),
    "running.output_len": lambda a: _set(a, 0, (2, 1), -3),
    "waiting.max_new_tokens": lambda a: _set(a, 1, (3, 0), 0),
    "running.ignore_eos": lambda a: _set(a, 0, (4, 0), 2),
    "pending.pred_output_len": lambda a: [*a[:2], np.array([[5], [0], [0], [5], [0], [0]]),
                                          *a[3:]],
    "max_new_tokens = ": lambda a: _set(a, 0, (2, 0), 999),
    "per_token_s": lambda a: _set(a, 5, 1, np.nan),
    "knee_tokens": lambda a: _set(a, 5, 2, -1.0),
    "new_token_ratio": lambda a: _set(a, 4, 0, 1.5),
    "elapsed_s": lambda a: _set(a, 4, 4, -0.1),
    "page_size": lambda a: _set(a, 3, 0, 0),
    "exceeds max_total_num_tokens": lambda a: _set(a, 3, 2, 10**9),
    "chunked_idx": lambda a: _set(a, 3, 8, 7),
    "chunked_prefilled": lambda a: _set(_set(a, 3, 8, 0), 3, 9, 99999),
    "schedule_policy": lambda a: _set(a, 3, 7, 5),
    "candidate.prefix_len": lambda a: _set(a, 6, 1, 101),
    "candidate.pred_output_len": lambda a: _set(a, 6, 2, 0),
    "candidate.max_new_tokens": lambda a: _set(a, 6, 3, -1),
}


@pytest.mark.parametrize("field", sorted(BAD))
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bad_input_names_the_field(impl, field):
    args = BAD[field](_kernel_args())
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        IMPLS[impl].simulate(*args)


def test_bad_arrays_at_the_edge():
    args = _kernel_args()
    with pytest.raises(ValueError, match="running must be"):
        _fastsim.simulate(args[0].astype(np.int32), *args[1:])
    with pytest.raises(ValueError, match="step model coefficients"):
        _fastsim.simulate(*args[:5], np.zeros(4), args[6])
    with pytest.raises(ValueError, match="prefix_len has 1 entries"):
        RequestTable(np.ones(2), np.ones(1), np.ones(2), np.ones(2), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="per_token_s"):
        StepModel(1e-3, float("nan"), 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="schedule_policy"):
        InstanceConfig(max_total_num_tokens=10, max_running_requests=1, schedule_policy="lof")


def test_router_fast_path_arrays_equal_the_table_path():
    """``packed_rows`` / ``arrays_with_pending`` (the router's hot path) give the kernel exactly
    what ``from_rows`` / ``with_pending`` give, and the same prediction."""
    pending_rows = [(900, 128, 0, 256, 1, 256), (300, 0, 0, 512, 0, 80)]
    state = InstanceState(CFG, rows(3, out=7), rows(2), free_kv_tokens=150_000)
    fast = state.arrays_with_pending(RequestTable.packed_rows(pending_rows))
    slow = state.with_pending(RequestTable.from_rows(pending_rows)).arrays
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(fast, slow))
    assert fast[2].flags.c_contiguous
    cand = Candidate(800, 0, 100, 512)
    for kernel in IMPLS.values():
        assert kernel.simulate(*fast, M.as_array(), cand.packed, None, False) == \
            kernel.simulate(*slow, M.as_array(), cand.packed, None, False)
    times = np.array([0.0, 0.004])
    timed = state.arrays_with_pending(RequestTable.packed_rows(pending_rows), times)
    slow_timed = state.with_pending(RequestTable.from_rows(pending_rows), times).arrays
    assert len(timed) == len(slow_timed) == 8 and timed[5] is None and timed[6] is None
    assert all(np.array_equal(a, b) for a, b in zip(timed[:5] + timed[7:],
                                                    slow_timed[:5] + slow_timed[7:]))
    for kernel in IMPLS.values():
        a = timed
        assert kernel.simulate(*a[:5], M.as_array(), cand.packed, None, False, *a[5:]) == \
            kernel.simulate(*a[:5], M.as_array(), cand.packed, None, False, pending_t=times)
    assert RequestTable.packed_rows([]).shape == RequestTable.empty().packed.shape
    with pytest.raises(ValueError, match="fields"):
        RequestTable.packed_rows([(1, 2, 3)])


def test_expected_arrivals_are_evenly_spaced_up_to_the_horizon_and_cap():
    table, times = fs.expected_arrivals(2.0, 3.2, input_len=500, prefix_len=100,
                                             pred_output_len=80, max_new_tokens=256)
    assert times.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert table.input_len.tolist() == [500] * 6 and table.prefix_len.tolist() == [100] * 6
    assert table.output_len.tolist() == [0] * 6 and table.pred_output_len.tolist() == [80] * 6
    capped, t = fs.expected_arrivals(100.0, 60.0, input_len=10, prefix_len=0,
                                          pred_output_len=5, max_new_tokens=5, max_requests=7)
    assert len(capped) == len(t) == 7
    none, t0 = fs.expected_arrivals(0.0, 60.0, input_len=10, prefix_len=0,
                                         pred_output_len=5, max_new_tokens=5)
    assert len(none) == len(t0) == 0
    with pytest.raises(ValueError, match="rate_per_s"):
        fs.expected_arrivals(float("nan"), 1.0, input_len=10, prefix_len=0,
                                  pred_output_len=5, max_new_tokens=5)
    with pytest.raises(ValueError, match="prefix_len"):
        fs.expected_arrivals(1.0, 1.0, input_len=10, prefix_len=11,
                                  pred_output_len=5, max_new_tokens=5)


def test_expected_arrivals_lengthen_the_prediction_of_a_long_request():
    cfg = fs.InstanceConfig(max_total_num_tokens=200_000, max_running_requests=64,
                                 page_size=16, chunked_prefill_size=4096)
    state = fs.InstanceState(cfg, fs.RequestTable.empty(), fs.RequestTable.empty(),
                                  free_kv_tokens=200_000)
    model = StepModel(const_s=0.02, per_token_s=1e-4, knee_tokens=16,
                      per_prefill_pair_s=1e-9, per_decode_context_token_s=2e-7)
    cand = fs.Candidate(800, 0, 300, 512, True)
    alone = fs.predict(state, cand, model)
    future = fs.expected_arrivals(2.0, 3 * alone.e2e_s, input_len=800, prefix_len=0,
                                       pred_output_len=300, max_new_tokens=512, ignore_eos=True)
    loaded_state = state.with_future(*future)
    loaded = fs.predict(loaded_state, cand, model)
    assert loaded.ttft_s == alone.ttft_s  # they queue behind it
    assert loaded.e2e_s > alone.e2e_s * 1.2  # ~12 prefills of 800 tokens + a bigger batch
    assert len(loaded_state.arrays) == 7 and len(state.arrays) == 5
    many = fs.predict_many([state, loaded_state], cand, model)
    assert many[0, 1] == alone.e2e_s and many[1, 1] == loaded.e2e_s
    pending = fs.RequestTable.packed_rows([(100, 0, 0, 50, 1, 50)])
    assert len(loaded_state.arrays_with_pending(pending)) == 7
    with pytest.raises(ValueError, match="both future and future_times"):
        state.with_future(future[0], None)


def test_from_packed_is_the_column_table_and_validates_its_layout():
    """``RequestTable.from_packed`` (the router builds a table from every new snapshot this
    way) is the same table as the six columns given one by one, over the same memory; anything
    but a C-contiguous (6, n) int64 array is refused."""
    rng = np.random.default_rng(5)
    cols = [rng.integers(0, 5000, 7) for _ in range(6)]
    packed = np.array(cols, dtype=np.int64)
    table, reference = RequestTable.from_packed(packed), RequestTable(*cols)
    assert len(table) == 7 and table.packed is packed
    for f in _fastsim_py.FIELDS:
        assert np.array_equal(getattr(table, f), getattr(reference, f))
    assert np.array_equal(table.concat(reference).packed,
                          np.concatenate([reference.packed, reference.packed], axis=1))
    for bad in (packed.astype(np.int32), packed[:5], packed.T.copy(), packed[:, ::2],
                packed.tolist()):
        with pytest.raises(ValueError, match="C-contiguous int64 array of shape"):
            RequestTable.from_packed(bad)
    empty = RequestTable.empty()
    assert empty is RequestTable.empty() and len(empty) == 0  # shared, built once
    with pytest.raises(ValueError):
        empty.packed[:] = 1  # read-only: no caller can change everyone's empty table
    assert len(InstanceState(CFG, empty, empty, free_kv_tokens=10).pending) == 0


def test_trace_lists_the_simulated_steps_of_the_prediction():
    """``fastsim.trace`` (the twin, stepping) gives the same prediction as ``predict`` and the
    steps behind it: here a pending request prefilled from the snapshot, then the candidate
    (arrived 10 ms later), then one closed-form stretch of decode steps for both."""
    state = idle(elapsed_s=0.01).with_pending(rows(1, inp=3000, pred=100), np.array([0.0]))
    cand = Candidate(500, 0, 10, 100)
    prediction, steps = fs.trace(state, cand, M)
    assert prediction == pytest.approx(predict(state, cand, M), rel=1e-12)
    assert [(s.kind, s.steps, s.batch) for s in steps] == [
        ("extend", 1, 1), ("extend", 1, 1), ("decode", 9, 2)]
    assert steps[0].extend == ((0, 3000, 0, True),) and steps[1].extend == ((1, 500, 0, True),)
    assert steps[0].start_s == 0.0 and steps[0].end_s == prefill_time(3000)
    assert all(a.end_s == b.start_s for a, b in zip(steps, steps[1:]))
    assert prediction.ttft_s == pytest.approx(steps[1].end_s - 0.01, rel=1e-12)
    assert prediction.e2e_s == pytest.approx(steps[2].end_s - 0.01, rel=1e-12)
