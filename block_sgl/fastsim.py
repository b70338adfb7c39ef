"""fastsim: predict a request's TTFT / E2E / queueing delay on one SGLang instance.

The simulator replays SGLang 0.5.23's scheduling (prefill-first steps, ``PrefillAdder``
admission with the ``new_token_ratio`` reservation, chunked prefill, decode retraction) over the
instance's snapshot with a step-latency model; see ``block_sgl/_fastsim_py.py`` (the readable
specification) and ``benchmarks/micro/README_fastsim.md`` (what is modelled, what approximated).

This module selects the implementation: the compiled ``block_sgl._fastsim`` (a missing build is
an ImportError, never a silent fallback), or the pure-Python twin when the environment variable
``BLOCK_SGL_FASTSIM_PURE=1`` is set (slow; for debugging and platforms without a compiler).

Typical use (the router builds an ``InstanceState`` per snapshot and reuses it)::

    state = InstanceState(config, running, waiting, free_kv_tokens=..., evictable_tokens=...,
                          elapsed_s=now - snapshot_time)  # the candidate arrives then
    p = predict(state.with_pending(in_flight, dispatched_at - snapshot_time),
                Candidate(800, 512, 200, 1024), step_model)
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Sequence

import numpy as np

from block_sgl import _fastsim_py as _spec
from block_sgl.predictor.step_model import StepModel

if os.environ.get("BLOCK_SGL_FASTSIM_PURE") == "1":
    from block_sgl import _fastsim_py as _kernel
else:
    try:
        from block_sgl import _fastsim as _kernel
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            "block_sgl._fastsim (the compiled fastsim kernel) is not built. Build it with "
            "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`; "
            "set BLOCK_SGL_FASTSIM_PURE=1 to run the (about 1000x slower) pure-Python twin "
            "instead.") from exc

POLICIES = {"fcfs": _spec.POLICY_FCFS, "lpm": _spec.POLICY_LPM}
FSCAL_ELAPSED = _spec.F_ELAPSED
"""Where ``InstanceState.fscal`` holds ``elapsed_s`` (the candidate's arrival after the
snapshot)."""


def implementation() -> str:
    """``"compiled"`` or ``"python"``: which kernel ``predict`` runs."""
    return "python" if _kernel is _spec else "compiled"


@dataclasses.dataclass(frozen=True)
class RequestTable:
    """Columnar per-request arrays (running batch, waiting queue or pending requests).

    ``prefix_len``: tokens of the request already cached on the instance (for running requests:
    what was cached at admission). ``output_len``: tokens generated so far (>0 in the waiting
    queue means a retracted request). ``pred_output_len``: predicted TOTAL output length; the
    simulator finishes a request at ``min(pred_output_len, max_new_tokens)`` tokens (and at least
    one token after the current ones).
    """

    input_len: np.ndarray
    prefix_len: np.ndarray
    output_len: np.ndarray
    max_new_tokens: np.ndarray
    ignore_eos: np.ndarray
    pred_output_len: np.ndarray
    packed: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        cols = [np.asarray(getattr(self, f), dtype=np.int64).reshape(-1) for f in _spec.FIELDS]
        for f, c in zip(_spec.FIELDS, cols):
            if len(c) != len(cols[0]):
                raise ValueError(f"{f} has {len(c)} entries, input_len has {len(cols[0])}")
        packed = np.ascontiguousarray(np.stack(cols)) if cols[0].size else np.zeros(
            (_spec.N_FIELDS, 0), dtype=np.int64)
        object.__setattr__(self, "packed", packed)

    def __len__(self) -> int:
        return self.packed.shape[1]

    @classmethod
    def empty(cls) -> "RequestTable":
        """The empty table (one shared, read-only instance: built once per process, not at every
        decision)."""
        if cls is RequestTable:
            return _EMPTY_TABLE
        return cls.from_packed(np.zeros((_spec.N_FIELDS, 0), dtype=np.int64))

    @classmethod
    def from_packed(cls, packed: np.ndarray) -> "RequestTable":
        """A table over the kernel layout ``packed`` ((fields, n) int64, C-contiguous; e.g. one
        ``np.array`` of the six columns), without copying it column by column: the router
        builds tables from every new snapshot."""
        if not (isinstance(packed, np.ndarray) and packed.dtype == np.int64 and packed.ndim == 2
                and packed.shape[0] == _spec.N_FIELDS and packed.flags.c_contiguous):
            raise ValueError(f"packed must be a C-contiguous int64 array of shape "
                             f"({_spec.N_FIELDS}, n), got {getattr(packed, 'dtype', type(packed))} "
                             f"{getattr(packed, 'shape', '')}")
        table = object.__new__(cls)
        for i, f in enumerate(_spec.FIELDS):
            object.__setattr__(table, f, packed[i])
        object.__setattr__(table, "packed", packed)
        return table

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> "RequestTable":
        """Rows of ``(input_len, prefix_len, output_len, max_new_tokens, ignore_eos,
        pred_output_len)``."""
        if not rows:
            return cls.empty()
        a = np.asarray(rows, dtype=np.int64)
        if a.ndim != 2 or a.shape[1] != _spec.N_FIELDS:
            raise ValueError(f"rows must have {_spec.N_FIELDS} fields {_spec.FIELDS}")
        return cls(*a.T)

    @staticmethod
    def packed_rows(rows: Sequence[Sequence[int]]) -> np.ndarray:
        """The kernel layout ``from_rows(rows).packed`` ((fields, n) int64, C-contiguous)
        without building a RequestTable (the router rebuilds its pending requests' table at
        almost every decision)."""
        if not rows:
            return np.zeros((_spec.N_FIELDS, 0), dtype=np.int64)
        a = np.array(rows, dtype=np.int64)
        if a.ndim != 2 or a.shape[1] != _spec.N_FIELDS:
            raise ValueError(f"rows must have {_spec.N_FIELDS} fields {_spec.FIELDS}")
        return np.ascontiguousarray(a.T)

    def concat(self, other: "RequestTable") -> "RequestTable":
        return RequestTable.from_packed(np.concatenate([self.packed, other.packed], axis=1))


_EMPTY_TABLE = RequestTable.from_packed(np.zeros((_spec.N_FIELDS, 0), dtype=np.int64))
_EMPTY_TABLE.packed.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    """Fixed scheduler settings of an instance (its Hello message)."""

    max_total_num_tokens: int
    max_running_requests: int
    page_size: int = 1
    chunked_prefill_size: int = 8192
    """<= 0 disables chunked prefill (SGLang ``--chunked-prefill-size -1``)."""
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    """``fcfs`` or ``lpm``."""
    schedule_conservativeness: float = 1.0
    init_new_token_ratio: float = 0.7
    """SGLANG_INIT_NEW_TOKEN_RATIO."""
    min_new_token_ratio_factor: float = 0.14
    """SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR."""
    new_token_ratio_decay_steps: int = 600
    """SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS."""
    clip_max_new_tokens: int = 4096
    """SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION."""
    retract_decode_steps: int = 20
    """SGLANG_RETRACT_DECODE_STEPS."""

    def __post_init__(self):
        if self.schedule_policy not in POLICIES:
            raise ValueError(f"schedule_policy must be one of {sorted(POLICIES)}, "
                             f"got {self.schedule_policy!r}")
        if not self.new_token_ratio_decay_steps >= 1:
            raise ValueError("new_token_ratio_decay_steps must be >= 1, got "
                             f"{self.new_token_ratio_decay_steps}")

    def ratio_schedule(self) -> tuple[float, float, float]:
        """``(init, min, decay per decode step)`` as NewTokenRatioTracker.from_config."""
        init = min(self.init_new_token_ratio * self.schedule_conservativeness, 1.0)
        low = min(init * self.min_new_token_ratio_factor, 1.0)
        return init, low, (init - low) / self.new_token_ratio_decay_steps


@dataclasses.dataclass(frozen=True)
class InstanceState:
    """One instance as its snapshot shows it, plus requests dispatched since (``pending``).

    ``chunked_idx`` indexes ``waiting`` (-1: none): that request is mid chunked prefill with
    ``chunked_prefilled`` tokens (cached prefix included) already in KV. The simulation starts
    at the snapshot (a scheduling-round boundary: the hooks take it at the end of a step); the
    candidate arrives ``elapsed_s`` later, each pending request at ``pending_times`` (seconds
    after the snapshot; None: all at the snapshot, i.e. in transit when it was taken; a time
    after ``elapsed_s`` counts as ``elapsed_s``). Predictions count from the candidate's
    arrival. See ``block_sgl/_fastsim_py.py``.
    """

    config: InstanceConfig
    running: RequestTable
    waiting: RequestTable
    free_kv_tokens: int
    evictable_tokens: int = 0
    new_token_ratio: float | None = None
    """``None``: the configured initial ratio (an instance that was idle)."""
    chunked_idx: int = -1
    chunked_prefilled: int = 0
    batch_is_full: bool = False
    pending: RequestTable = dataclasses.field(default_factory=RequestTable.empty)
    elapsed_s: float = 0.0
    future: RequestTable | None = None
    """Requests expected to arrive after the candidate (``expected_arrivals``), with
    ``future_times`` (seconds after the candidate's arrival, non-decreasing); None: no arrivals
    assumed."""
    future_times: np.ndarray | None = None
    pending_times: np.ndarray | None = None
    iscal: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    fscal: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    arrays: tuple = dataclasses.field(init=False, repr=False, compare=False)
    """``(running, waiting, pending, iscal, fscal)`` as the kernel takes them, followed by
    ``(future, future_times)`` when arrivals are expected, and by ``(future or None,
    future_times or None, pending_times)`` when pending times are given."""

    def __post_init__(self):
        c = self.config
        init, low, decay = c.ratio_schedule()
        ratio = init if self.new_token_ratio is None else self.new_token_ratio
        iscal = np.array([c.page_size, c.max_total_num_tokens, self.free_kv_tokens,
                          self.evictable_tokens, c.max_running_requests, c.chunked_prefill_size,
                          c.max_prefill_tokens, POLICIES[c.schedule_policy], self.chunked_idx,
                          self.chunked_prefilled, int(bool(self.batch_is_full)),
                          c.clip_max_new_tokens, c.retract_decode_steps], dtype=np.int64)
        fscal = np.array([ratio, init, low, decay, self.elapsed_s], dtype=np.float64)
        object.__setattr__(self, "iscal", iscal)
        object.__setattr__(self, "fscal", fscal)
        if (self.future is None) != (self.future_times is None):
            raise ValueError("give both future and future_times, or neither")
        arrays = (self.running.packed, self.waiting.packed, self.pending.packed, iscal, fscal)
        if self.future is not None:
            times = np.ascontiguousarray(self.future_times, dtype=np.float64).reshape(-1)
            object.__setattr__(self, "future_times", times)
            arrays += (self.future.packed, times)
        if self.pending_times is not None:
            times = np.ascontiguousarray(self.pending_times, dtype=np.float64).reshape(-1)
            object.__setattr__(self, "pending_times", times)
            arrays = arrays[:5] + (arrays[5:] or (None, None)) + (times,)
        object.__setattr__(self, "arrays", arrays)

    def with_pending(self, pending: RequestTable,
                     times: np.ndarray | None = None) -> "InstanceState":
        """A copy whose pending requests (dispatched, not yet in the snapshot) are ``pending``,
        arriving ``times`` seconds after the snapshot (None: at the snapshot)."""
        return dataclasses.replace(self, pending=pending, pending_times=times)

    def with_future(self, future: RequestTable | None,
                    times: np.ndarray | None) -> "InstanceState":
        """A copy that expects ``future`` requests at ``times`` (see ``expected_arrivals``)."""
        return dataclasses.replace(self, future=future, future_times=times)

    def arrays_with_pending(self, pending_packed: np.ndarray,
                            pending_times: np.ndarray | None = None) -> tuple:
        """``with_pending(pending, pending_times).arrays`` without building the copy:
        ``pending_packed`` is a ``packed_rows`` result, ``pending_times`` float64 ``(p,)``
        C-contiguous or None (at the snapshot)."""
        a = self.arrays
        out = (a[0], a[1], pending_packed, a[3], a[4]) + a[5:7]
        if pending_times is None:
            return out
        return out + ((None, None) if len(out) == 5 else ()) + (pending_times,)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """The request being routed, as this instance would see it."""

    input_len: int
    prefix_len: int
    """Tokens of its prompt already cached on this instance."""
    pred_output_len: int
    max_new_tokens: int
    ignore_eos: bool = False
    packed: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "packed", np.array(
            [self.input_len, self.prefix_len, self.pred_output_len, self.max_new_tokens,
             int(bool(self.ignore_eos))], dtype=np.int64))


class Prediction(NamedTuple):
    ttft_s: float
    """Until the step that prefills the candidate's last chunk completes."""
    e2e_s: float
    """Until the step that produces its last token completes."""
    queue_s: float
    """Until its first prefill step starts."""


def expected_arrivals(rate_per_s: float, horizon_s: float, *, input_len: int, prefix_len: int,
                      pred_output_len: int, max_new_tokens: int, ignore_eos: bool = False,
                      max_requests: int = 256) -> tuple[RequestTable, np.ndarray]:
    """The requests an instance can expect after the candidate: one of the typical shape every
    ``1 / rate_per_s`` seconds (the first one interval after its arrival) up to ``horizon_s``,
    at most ``max_requests``. Evenly spaced at the mean rate: bursts are not foreseen, only how
    much work arrives while the candidate runs. For ``InstanceState.with_future``."""
    for name, v in (("rate_per_s", rate_per_s), ("horizon_s", horizon_s)):
        if not (v >= 0.0 and np.isfinite(v)):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if max_requests < 0:
        raise ValueError(f"max_requests must be >= 0, got {max_requests}")
    if not 0 <= prefix_len <= input_len or input_len < 1:
        raise ValueError(f"need 0 <= prefix_len <= input_len and input_len >= 1, got "
                         f"prefix_len {prefix_len}, input_len {input_len}")
    n = 0 if rate_per_s == 0.0 else min(int(horizon_s * rate_per_s), max_requests)
    times = np.arange(1, n + 1, dtype=np.float64) / rate_per_s if n else np.zeros(0)
    row = (input_len, prefix_len, 0, max_new_tokens, int(bool(ignore_eos)), pred_output_len)
    return RequestTable.from_rows([row] * n), times


def _coeffs(step_model) -> np.ndarray:
    if isinstance(step_model, StepModel):
        return step_model.as_array()
    return np.ascontiguousarray(step_model, dtype=np.float64)


def new_workspace():
    """Scratch memory to pass as ``workspace=`` and reuse across calls (compiled kernel)."""
    return _kernel.Workspace() if hasattr(_kernel, "Workspace") else None


def predict(state: InstanceState, candidate: Candidate, step_model, *, workspace=None,
            step_by_step: bool = False) -> Prediction:
    """Predict the candidate's TTFT, E2E and queueing delay on ``state`` (seconds; inf if the
    instance could never serve it). ``step_model``: a ``StepModel`` or its 5 coefficients."""
    a = state.arrays  # 5 arrays, 7 with expected arrivals, 8 with pending times
    return Prediction(*_kernel.simulate(*a[:5], _coeffs(step_model), candidate.packed,
                                        workspace, step_by_step, *a[5:]))


def trace(state: InstanceState, candidate: Candidate, step_model) -> tuple[Prediction, list]:
    """``predict`` by the readable twin, with every simulated step (``SimStep``: start and end
    from the snapshot, extend or decode, who was prefilled) — for finding where a prediction
    parts from what an instance did (``benchmarks/accuracy/fastsim_accuracy.py --trace``)."""
    a = state.arrays
    steps: list = []
    result = _spec.simulate(*a[:5], _coeffs(step_model), candidate.packed, None, False, *a[5:],
                            trace=steps)
    return Prediction(*result), steps


SimStep = _spec.SimStep


def predict_rows(state_arrays: list, candidate_rows: list, coeffs: list, out: np.ndarray,
                 workspace=None) -> np.ndarray:
    """The hot-path form of ``predict_many`` for callers that keep packed inputs (the router):
    each ``state_arrays[i]`` is an ``InstanceState.arrays``, ``candidate_rows[i]`` an int64
    ``(5,)`` array (``Candidate.packed``; e.g. the rows of a reused ``(K, 5)`` buffer),
    ``coeffs[i]`` a float64 array of 5 coefficients. Inputs are validated by the kernel as in
    ``predict_many``."""
    return _kernel.simulate_many(state_arrays, candidate_rows, coeffs, out, workspace)


def predict_many(states: Sequence[InstanceState], candidates, step_models, *,
                 out: np.ndarray | None = None, workspace=None) -> np.ndarray:
    """One candidate against K instances. ``candidates``: one ``Candidate`` for all or one per
    instance (its cached prefix differs per instance); ``step_models``: one ``StepModel`` (or
    1-D coefficient array) for all, or a sequence with one per instance.
    Returns (or fills) ``out``: float64 ``(K, 3)``, columns ttft_s, e2e_s, queue_s."""
    k = len(states)
    if out is None:
        out = np.empty((k, 3), dtype=np.float64)
    elif out.shape != (k, 3):
        raise ValueError(f"out must have shape ({k}, 3), got {out.shape}")
    cands = [candidates] * k if isinstance(candidates, Candidate) else list(candidates)
    if len(cands) != k:
        raise ValueError(f"got {k} states and {len(cands)} candidates: give one for all or "
                         "one per state")
    single_model = isinstance(step_models, StepModel) or (
        isinstance(step_models, np.ndarray) and step_models.ndim == 1)
    models = [_coeffs(step_models)] * k if single_model else [_coeffs(m) for m in step_models]
    if len(models) != k:
        raise ValueError(f"got {k} states and {len(models)} step models: give one for all or "
                         "one per state")
    if workspace is None:
        workspace = new_workspace()
    return _kernel.simulate_many([s.arrays for s in states], [c.packed for c in cands], models,
                                 out, workspace)
