"""The compiled fastsim kernel against its pure-Python twin (the specification)."""

from __future__ import annotations

import importlib.machinery
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import block_sgl._fastsim as compiled
from block_sgl import _fastsim_py as twin
from block_sgl.fastsim import InstanceConfig

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_compiled_extension_is_loaded():
    """Fails when block_sgl._fastsim is not the built extension (e.g. a stray .py shadow)."""
    assert compiled.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), \
        compiled.__file__
    assert compiled.compiled() is True
    assert not hasattr(twin, "compiled")


def _close(a: float, b: float, rel: float = 1e-9, abs_s: float = 1e-13) -> bool:
    """Equal to 1e-9 relative, or to 0.1 ps: results are differences of absolute simulated
    times (seconds since the snapshot, up to tens of s), so a picosecond-scale result carries
    the rounding of those times (≈ 1e-17 s; hypothesis found 4.000002e-12 vs 3.999995e-12 s
    from the fast and the step-by-step paths with 1e-12 s steps after 0.21 s)."""
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_s)


@st.composite
def requests(draw, n, running, clip):
    cols = [[] for _ in range(twin.N_FIELDS)]
    for _ in range(n):
        mx = draw(st.integers(1, max(2, 3 * clip)) | st.integers(1, 600))
        out = draw(st.integers(1, mx)) if running else draw(
            st.just(0) | st.integers(0, mx))  # > 0 in the queue: a retracted request
        inp = draw(st.integers(1, 3000))
        pre = draw(st.just(0) | st.integers(0, inp + out))
        row = (inp, pre, out, mx, draw(st.integers(0, 1)), draw(st.integers(1, 700)))
        for c, v in zip(cols, row):
            c.append(v)
    return np.array(cols, dtype=np.int64).reshape(twin.N_FIELDS, n)


@st.composite
def scenarios(draw):
    page = draw(st.sampled_from([1, 1, 4, 16]))
    clip = draw(st.sampled_from([64, 512, 4096]))
    running = draw(requests(draw(st.integers(0, 20)), True, clip))
    waiting = draw(requests(draw(st.integers(0, 12)), False, clip))
    pending = draw(requests(draw(st.integers(0, 3)), False, clip))
    max_total = draw(st.integers(200, 80_000))
    free = draw(st.integers(0, max_total))
    evictable = draw(st.integers(0, max_total - free))
    chunk = draw(st.sampled_from([-1, 64, 256, 2048, 8192]))
    chunk = chunk if chunk <= 0 else max(chunk, page)
    chunked_idx, chunked_done = -1, 0
    if chunk > 0 and waiting.shape[1] and draw(st.booleans()):
        chunked_idx = draw(st.integers(0, waiting.shape[1] - 1))
        fill = int(waiting[0, chunked_idx] + waiting[2, chunked_idx])
        lo = int(min(waiting[1, chunked_idx], fill - 1))
        waiting[1, chunked_idx] = lo
        chunked_done = draw(st.integers(lo, fill - 1))
    cfg = InstanceConfig(max_total_num_tokens=max_total,
                         max_running_requests=draw(st.integers(1, 40)), page_size=page,
                         chunked_prefill_size=chunk,
                         max_prefill_tokens=draw(st.sampled_from([512, 4096, 16384])),
                         schedule_policy=draw(st.sampled_from(["fcfs", "lpm"])),
                         schedule_conservativeness=draw(st.sampled_from([0.3, 1.0, 2.0])),
                         clip_max_new_tokens=clip,
                         retract_decode_steps=draw(st.integers(0, 40)))
    init, low, decay = cfg.ratio_schedule()
    iscal = np.array([page, max_total, free, evictable, cfg.max_running_requests, chunk,
                      cfg.max_prefill_tokens, 1 if cfg.schedule_policy == "lpm" else 0,
                      chunked_idx, chunked_done, draw(st.integers(0, 1)), clip,
                      cfg.retract_decode_steps], dtype=np.int64)
    elapsed = draw(st.just(0.0) | st.floats(0.0, 0.05) | st.floats(0.0, 3.0))
    fscal = np.array([draw(st.floats(0.0, 1.0)), init, low, decay, elapsed])
    coeffs = np.array([draw(st.floats(0.0, 0.02)), draw(st.floats(0.0, 1e-4)),
                       draw(st.floats(0.0, 512.0)), draw(st.floats(0.0, 1e-8)),
                       draw(st.floats(0.0, 1e-6))])
    inp = draw(st.integers(1, 4000))
    cand = np.array([inp, draw(st.integers(0, inp)), draw(st.integers(1, 800)),
                     draw(st.integers(1, 1000)), draw(st.integers(0, 1))], dtype=np.int64)
    return (running, waiting, pending, iscal, fscal, coeffs, cand)


@SETTINGS
@given(scenarios())
def test_compiled_equals_twin(args):
    got = compiled.simulate(*args)
    want = twin.simulate(*args)
    assert all(_close(g, w) for g, w in zip(got, want)), (got, want)
    ttft, e2e, queue = got
    assert queue <= ttft <= e2e or math.isinf(ttft)


@SETTINGS
@given(scenarios())
def test_closed_form_jumps_equal_step_by_step(args):
    jump = compiled.simulate(*args, None, False)
    step = compiled.simulate(*args, None, True)
    assert all(_close(a, b) for a, b in zip(jump, step)), (jump, step)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_bad_input_same_error(args, data):
    args = [a.copy() for a in args]
    which = data.draw(st.sampled_from([0, 1, 3, 4, 5, 6]))
    arr = args[which]
    assume(arr.size > 0)
    flat = arr.reshape(-1)
    pos = data.draw(st.integers(0, flat.size - 1))
    flat[pos] = data.draw(st.sampled_from([-1, -(10**6)])) if arr.dtype == np.int64 else \
        data.draw(st.sampled_from([-1.0, np.nan, np.inf]))
    try:
        twin.validate(*args)
    except ValueError as exc:
        with pytest.raises(ValueError) as got:
            compiled.simulate(*args)
        assert str(got.value) == str(exc)
    else:  # the corruption happened to stay valid: both still agree
        assert all(_close(g, w) for g, w in zip(compiled.simulate(*args),
                                                twin.simulate(*args)))


def test_simulate_many_equals_simulate():
    rng = np.random.default_rng(7)
    states, cands, coeffs = [], [], []
    for k in range(6):
        n = int(rng.integers(0, 30))
        t = np.array([rng.integers(1, 2000, n), np.zeros(n), rng.integers(1, 50, n),
                      np.full(n, 600), rng.integers(0, 2, n), rng.integers(1, 600, n)],
                     dtype=np.int64).reshape(6, n)
        empty = np.zeros((6, 0), dtype=np.int64)
        iscal = np.array([1, 100_000, 60_000, 0, 32, 2048, 16384, 0, -1, 0, 0, 4096, 20])
        states.append((t, empty, empty, iscal, np.array([0.7, 0.7, 0.098, 0.001, 0.0])))
        cands.append(np.array([1000, 0, 50 + k, 600, 0], dtype=np.int64))
        coeffs.append(np.array([6e-3, 2e-5, 104.0, 1.4e-9, 2.3e-7]))
    for impl in (compiled, twin):
        out = np.zeros((6, 3))
        impl.simulate_many(states, cands, coeffs, out)
        for i in range(6):
            assert tuple(out[i]) == compiled.simulate(*states[i], coeffs[i], cands[i])


@st.composite
def with_future(draw):
    """A scenario plus expected future arrivals (fresh requests at non-decreasing times)."""
    args = draw(scenarios())
    clip = int(args[3][twin.I_CLIP])
    m = draw(st.integers(0, 12))
    table = draw(requests(m, False, clip))
    table[twin.R_OUTPUT] = 0
    table[twin.R_PREFIX] = np.minimum(table[twin.R_PREFIX], table[twin.R_INPUT])
    gaps = draw(st.lists(st.floats(0.0, 2.0), min_size=m, max_size=m))
    return args, table, np.cumsum(np.array(gaps, dtype=np.float64)).reshape(m)


@SETTINGS
@given(with_future())
def test_future_arrivals_compiled_equals_twin(scenario):
    args, future, times = scenario
    got = compiled.simulate(*args, future=future, future_t=times)
    want = twin.simulate(*args, future=future, future_t=times)
    assert all(_close(g, w) for g, w in zip(got, want)), (got, want)
    step = compiled.simulate(*args, None, True, future=future, future_t=times)
    assert all(_close(a, b) for a, b in zip(got, step)), (got, step)


@SETTINGS
@given(with_future())
def test_future_arrivals_never_shorten_e2e_or_move_the_fcfs_queue(scenario):
    """Expected arrivals queue behind the candidate (FCFS): they can delay its first prefill
    (sharing a step with its last chunk) and lengthen its E2E, never shorten either. With
    ample KV: under KV pressure a newcomer may be retracted in the candidate's place."""
    args, future, times = scenario
    assume(args[3][twin.I_POLICY] == twin.POLICY_FCFS)
    iscal = args[3].copy()
    iscal[twin.I_MAX_TOTAL] = 10**9
    iscal[twin.I_FREE] = 10**9 - iscal[twin.I_EVICTABLE]
    args = args[:3] + (iscal,) + args[4:]
    alone = compiled.simulate(*args)
    loaded = compiled.simulate(*args, future=future, future_t=times)
    assert loaded[2] >= alone[2] - 1e-9 * max(1.0, alone[2]) or math.isinf(alone[2])
    assert loaded[1] >= alone[1] - 1e-9 * max(1.0, alone[1]) or math.isinf(alone[1])


def test_future_arrivals_lengthen_a_decoding_candidate_by_their_prefill_steps():
    """Hand-checked: an idle instance, the candidate decodes 100 tokens; one request expected
    at 0.5 s adds exactly one prefill step (of its 1000 tokens) to the candidate's E2E, plus
    its share of the decode steps after it joins."""
    empty = np.zeros((6, 0), dtype=np.int64)
    iscal = np.array([1, 100_000, 100_000, 0, 32, 8192, 16384, 0, -1, 0, 0, 4096, 20])
    fscal = np.array([0.7, 0.7, 0.098, 0.001, 0.0])
    coeffs = np.array([0.02, 0.0, 1e9, 0.0, 0.0])  # 20 ms a step, whatever its shape
    cand = np.array([100, 0, 100, 100, 1], dtype=np.int64)
    future = np.array([[1000], [0], [0], [50], [1], [50]], dtype=np.int64)
    for impl in (compiled, twin):
        alone = impl.simulate(empty, empty, empty, iscal, fscal, coeffs, cand)
        later = impl.simulate(empty, empty, empty, iscal, fscal, coeffs, cand,
                              future=future, future_t=np.array([0.5]))
        assert alone[0] == pytest.approx(0.02) and alone[1] == pytest.approx(0.02 * 100)
        assert later[0] == alone[0]
        assert later[1] == pytest.approx(alone[1] + 0.02)  # one extra (prefill) step
        never = impl.simulate(empty, empty, empty, iscal, fscal, coeffs, cand,
                              future=future, future_t=np.array([10.0]))
        assert never == alone  # arrives after the candidate finished


@pytest.mark.parametrize("impl", [compiled, twin], ids=["compiled", "twin"])
def test_future_arrivals_bad_input(impl):
    empty = np.zeros((6, 0), dtype=np.int64)
    iscal = np.array([1, 100_000, 100_000, 0, 32, 8192, 16384, 0, -1, 0, 0, 4096, 20])
    fscal = np.array([0.7, 0.7, 0.098, 0.001, 0.0])
    coeffs = np.array([0.02, 0.0, 1e9, 0.0, 0.0])
    cand = np.array([100, 0, 100, 100, 1], dtype=np.int64)
    base = (empty, empty, empty, iscal, fscal, coeffs, cand)
    future = np.array([[1000, 10], [0, 0], [0, 0], [50, 5], [1, 1], [50, 5]], dtype=np.int64)
    with pytest.raises(ValueError, match="future_t\\[1\\] must be finite, >= 0 and >= the "
                                         "previous time"):
        impl.simulate(*base, future=future, future_t=np.array([0.5, 0.2]))
    with pytest.raises(ValueError, match="future_t\\[0\\]"):
        impl.simulate(*base, future=future, future_t=np.array([np.nan, 1.0]))
    bad = future.copy()
    bad[twin.R_OUTPUT, 1] = 2
    with pytest.raises(ValueError, match="future.output_len\\[1\\] must be 0"):
        impl.simulate(*base, future=bad, future_t=np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="both future and future_t"):
        impl.simulate(*base, future=future)


@st.composite
def with_pending_times(draw):
    """A scenario whose pending requests arrive at non-decreasing times from the snapshot
    (some after the candidate's arrival: they count as arriving with it), plus maybe future
    arrivals."""
    args, future, times = draw(with_future())
    n_pend = args[2].shape[1]
    gaps = draw(st.lists(st.floats(0.0, 0.5), min_size=n_pend, max_size=n_pend))
    pending_t = np.cumsum(np.array(gaps, dtype=np.float64)).reshape(n_pend)
    if draw(st.booleans()):
        future, times = None, None
    return args, future, times, pending_t


@SETTINGS
@given(with_pending_times())
def test_pending_arrival_times_compiled_equals_twin(scenario):
    args, future, times, pending_t = scenario
    got = compiled.simulate(*args, future=future, future_t=times, pending_t=pending_t)
    want = twin.simulate(*args, future=future, future_t=times, pending_t=pending_t)
    assert all(_close(g, w) for g, w in zip(got, want)), (got, want)
    step = compiled.simulate(*args, None, True, future=future, future_t=times,
                             pending_t=pending_t)
    assert all(_close(a, b) for a, b in zip(got, step)), (got, step)
    ttft, e2e, queue = got
    assert queue <= ttft <= e2e or math.isinf(ttft)
    out = np.zeros((1, 3))
    for impl in (compiled, twin):
        impl.simulate_many([args[:5] + (future, times, pending_t)], [args[6]], [args[5]], out)
        assert all(_close(g, w) for g, w in zip(out[0], got)), (out[0], got)


@SETTINGS
@given(with_pending_times())
def test_pending_times_default_to_the_snapshot_and_never_follow_the_candidate(scenario):
    """No times = all at the snapshot; a pending request was dispatched before the candidate,
    so a time after the candidate's arrival counts as the candidate's."""
    args, future, times, pending_t = scenario
    elapsed = float(args[4][twin.F_ELAPSED])
    for impl in (compiled, twin):
        assert impl.simulate(*args, future=future, future_t=times) == impl.simulate(
            *args, future=future, future_t=times, pending_t=np.zeros_like(pending_t))
        late = impl.simulate(*args, future=future, future_t=times, pending_t=pending_t + 5.0)
        assert late == impl.simulate(*args, future=future, future_t=times,
                                     pending_t=np.full_like(pending_t, elapsed))


@pytest.mark.parametrize("impl", [compiled, twin], ids=["compiled", "twin"])
def test_pending_times_bad_input(impl):
    empty = np.zeros((6, 0), dtype=np.int64)
    pending = np.array([[1000, 10], [0, 0], [0, 0], [50, 5], [1, 1], [50, 5]], dtype=np.int64)
    iscal = np.array([1, 100_000, 100_000, 0, 32, 8192, 16384, 0, -1, 0, 0, 4096, 20])
    fscal = np.array([0.7, 0.7, 0.098, 0.001, 0.0])
    coeffs = np.array([0.02, 0.0, 1e9, 0.0, 0.0])
    cand = np.array([100, 0, 100, 100, 1], dtype=np.int64)
    base = (empty, empty, pending, iscal, fscal, coeffs, cand)
    with pytest.raises(ValueError, match="pending_t\\[1\\] must be finite, >= 0 and >= the "
                                         "previous time"):
        impl.simulate(*base, pending_t=np.array([0.5, 0.2]))
    with pytest.raises(ValueError, match="pending_t\\[0\\]"):
        impl.simulate(*base, pending_t=np.array([-0.1, 1.0]))
    with pytest.raises(ValueError, match="pending_t\\[1\\]"):
        impl.simulate(*base, pending_t=np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="pending_t"):
        impl.simulate(*base, pending_t=np.array([0.1]))
