"""Fit the step-latency model (``step_model.StepModel``) to measured or profiled step times.

The model form is fixed in ``block_sgl/predictor/step_model.py``::

    step_s = const_s + per_token_s * max(n - knee_tokens, 0)
           + per_prefill_pair_s * prefill_context_tokens
           + per_decode_context_token_s * decode_context_tokens,   n = prefill_tokens + decode_seqs

Fitting (``fit``): for every candidate knee on a grid the model is linear in the four other
coefficients, so each knee is a small non-negative least-squares problem. The loss is on
*relative* error (rows weighted by 1 / measured time: a 5 ms decode step matters as much as a
500 ms prefill) and robust: Huber IRLS down-weights outlier steps (GC pauses, preemption). The
knee is searched on a coarse grid, then refined; all coefficients are constrained to >= 0 by
solving every subset of active columns (exact NNLS for 4 unknowns). An optional ``prior`` (a
previous model) adds ridge rows pulling each coefficient towards it, so a fit on a narrow window
(e.g. only decode steps) keeps sensible values for the coefficients the window cannot see.

Inputs are plain arrays (``StepRecords``), so records from a live SGLang instance, from a GPU
profile (``fit_profile``) or from a file all go through the same path.

``OnlineCalibrator`` keeps a sliding window of the latest records and refits every few records;
it detects a hardware change (the current model is off by more than ``drift_threshold`` on the
newest records), then drops the stale window, rescales the model at once and refits from the
new records only.

JSON format of a fitted model (what the router and fastsim load)::

    {"schema": "block_sgl.step_model/1",
     "coefficients": {"const_s": ..., "per_token_s": ..., "knee_tokens": ...,
                      "per_prefill_pair_s": ..., "per_decode_context_token_s": ...},
     "source": {...free-form provenance: profile id, record count, fit error...}}
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from block_sgl.predictor.gpu_profiles import GpuStepProfile, StepShape
from block_sgl.predictor.step_model import StepModel

STEP_MODEL_SCHEMA = "block_sgl.step_model/1"
_FIELDS = ("prefill_tokens", "prefill_context_tokens", "decode_seqs", "decode_context_tokens",
           "seconds")
_COEFF_NAMES = tuple(f.name for f in dataclasses.fields(StepModel))
# Linear coefficients (all but the knee), in design-matrix column order.
_LINEAR = ("const_s", "per_token_s", "per_prefill_pair_s", "per_decode_context_token_s")
_SUBSETS = tuple(tuple(s) for r in range(1, 5) for s in itertools.combinations(range(4), r))
_SUBSET_MASKS = np.array([[j in s for j in range(4)] for s in _SUBSETS])  # (15, 4)
_SUBSET_PAIRS = _SUBSET_MASKS[:, :, None] & _SUBSET_MASKS[:, None, :]      # (15, 4, 4)
_EYE4 = np.eye(4)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One measured forward step (the fields of ``StepShape`` the model uses + its duration)."""

    prefill_tokens: float
    prefill_context_tokens: float
    decode_seqs: float
    decode_context_tokens: float
    seconds: float

    @staticmethod
    def from_shape(shape: StepShape, seconds: float) -> "StepRecord":
        return StepRecord(shape.prefill_tokens, shape.prefill_context_tokens, shape.decode_seqs,
                          shape.decode_context_tokens, seconds)


@dataclasses.dataclass(frozen=True)
class StepRecords:
    """Columns of step records (float64 arrays of equal length), validated on construction.

    ``prefill_context_tokens`` is ``StepShape.prefill_context_tokens`` (causal query-key pairs
    of the prefill part); ``seconds`` is the measured step time. Raises ValueError naming the
    offending field for empty input, mismatched lengths, NaN/inf, negative values, a
    non-positive time, or a step with no tokens.
    """

    prefill_tokens: np.ndarray
    prefill_context_tokens: np.ndarray
    decode_seqs: np.ndarray
    decode_context_tokens: np.ndarray
    seconds: np.ndarray

    def __post_init__(self):
        n = None
        for name in _FIELDS:
            try:
                col = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as e:
                raise ValueError(f"step records: field {name!r} is not numeric ({e})") from None
            if col.size == 0:
                raise ValueError(f"step records: field {name!r} is empty (no records to fit)")
            if n is None:
                n = col.size
            elif col.size != n:
                raise ValueError(f"step records: field {name!r} has {col.size} values, "
                                 f"expected {n} like {_FIELDS[0]!r}")
            bad = ~np.isfinite(col)
            if bad.any():
                raise ValueError(f"step records: field {name!r} has {int(bad.sum())} non-finite "
                                 f"value(s) (NaN/inf), first at index {int(np.argmax(bad))}")
            neg = col <= 0 if name == "seconds" else col < 0
            if neg.any():
                what = "non-positive" if name == "seconds" else "negative"
                raise ValueError(f"step records: field {name!r} has {int(neg.sum())} {what} "
                                 f"value(s), first at index {int(np.argmax(neg))}")
            col.setflags(write=False)
            object.__setattr__(self, name, col)
        empty = (self.prefill_tokens + self.decode_seqs) <= 0
        if empty.any():
            raise ValueError("step records: fields 'prefill_tokens' + 'decode_seqs' are 0 for "
                             f"{int(empty.sum())} record(s) (a step must process tokens), "
                             f"first at index {int(np.argmax(empty))}")

    def __len__(self) -> int:
        return int(self.seconds.size)

    @classmethod
    def from_records(cls, records: Iterable[StepRecord]) -> "StepRecords":
        rows = list(records)
        if not rows:
            raise ValueError("step records: field 'seconds' is empty (no records to fit)")
        return cls(*(np.array([getattr(r, f) for r in rows], dtype=np.float64) for f in _FIELDS))

    @classmethod
    def from_shapes(cls, shapes: Sequence[StepShape], seconds) -> "StepRecords":
        return cls(np.array([s.prefill_tokens for s in shapes], dtype=np.float64),
                   np.array([s.prefill_context_tokens for s in shapes], dtype=np.float64),
                   np.array([s.decode_seqs for s in shapes], dtype=np.float64),
                   np.array([s.decode_context_tokens for s in shapes], dtype=np.float64),
                   seconds)

    def subset(self, idx) -> "StepRecords":
        return StepRecords(*(getattr(self, f)[idx] for f in _FIELDS))


def predict_seconds(model: StepModel, records: StepRecords) -> np.ndarray:
    """Vectorised ``model.step_time`` over records (same formula, same zero for empty steps)."""
    n = records.prefill_tokens + records.decode_seqs
    t = (model.const_s + model.per_token_s * np.maximum(n - model.knee_tokens, 0.0)
         + model.per_prefill_pair_s * records.prefill_context_tokens
         + model.per_decode_context_token_s * records.decode_context_tokens)
    return np.where(n > 0, t, 0.0)


def relative_errors(model: StepModel, records: StepRecords) -> np.ndarray:
    """|predicted / measured - 1| per record."""
    return np.abs(predict_seconds(model, records) / records.seconds - 1.0)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Knobs of ``fit``; the defaults suit both GPU profiles and live records."""

    knee_max: float = 1024.0
    """Largest knee (tokens) searched; the linear layers of LLMs on current GPUs turn compute
    bound well below this."""
    knee_coarse_step: float = 16.0
    """Coarse knee grid spacing (tokens); the best coarse knee is refined to ``knee_fine_step``."""
    knee_fine_step: float = 1.0
    huber_delta: float = 0.05
    """Relative residual beyond which a record's weight is reduced (Huber)."""
    irls_iterations: int = 6
    prior_weight: float = 0.01
    """Strength of the pull towards ``prior``: a coefficient 100 % off the prior costs as much as
    one record mispredicted by 10 %. Weak on purpose: it only decides the coefficients the
    records cannot (e.g. the prefill coefficient of a window of decode steps)."""


_LSTSQ_RCOND = np.finfo(float).eps * 4


def _nnls_gram(g: np.ndarray, h: np.ndarray, bb: float) -> np.ndarray:
    """min ||a x - b||^2 s.t. x >= 0 given the normal equations g = a'a, h = a'b, bb = b'b
    (one problem; ``_nnls_gram_many`` solves a stack)."""
    return _nnls_gram_many(g[None], np.asarray(h)[None], np.array([bb]))[0]


def _nnls_gram_many(g: np.ndarray, h: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """``_nnls_gram`` for a stack of K problems (g (K, 4, 4), h (K, 4), bb (K,)) → (K, 4).

    Exact for the 4 unknowns here: the best feasible unconstrained solution over all subsets of
    free columns (the optimum of an NNLS is the least-squares solution on its support). The 15
    subset systems of every problem that needs them are solved in one batched call (each
    padded to 4x4 with the identity outside its support, so the solution is 0 there); when one
    of them is singular, all are solved with one batched pseudo-inverse instead (the
    minimum-norm solution on each support, as ``_nnls_gram_subsets``, the one-subset-at-a-time
    reference, takes with ``lstsq``). The infeasible case is the common one on step records the
    model form does not fit (a real-CPU instance), where the per-subset loop made a refit cost
    ~120 ms here; singular systems are common when every step has the same shape (e.g. a
    stream of identical short requests, where the loop took ~0.7 ms of router CPU per proxied
    request in a profile), or when a knee lies above every step's token count."""
    x = None
    try:
        x = np.linalg.solve(g, h[:, :, None])[:, :, 0]
        todo = np.flatnonzero((x < 0).any(axis=1))  # the unconstrained optimum is infeasible
    except np.linalg.LinAlgError:
        todo = np.arange(len(g))
        x = np.empty((len(g), g.shape[-1]))
    if not len(todo):
        return x
    gs, hs, bbs = g[todo], h[todo], bb[todo]
    systems = np.where(_SUBSET_PAIRS, gs[:, None], _EYE4)               # (M, 15, 4, 4)
    rhs = np.where(_SUBSET_MASKS, hs[:, None, :], 0.0)[..., None]         # (M, 15, 4, 1)
    try:
        xs = np.linalg.solve(systems, rhs)[..., 0]
    except np.linalg.LinAlgError:
        # lstsq's default cut-off (eps * max(M, N)), so that the answers match the reference
        xs = (np.linalg.pinv(systems, rcond=_LSTSQ_RCOND) @ rhs)[..., 0]
        xs = np.where(_SUBSET_MASKS, xs, 0.0)  # exactly 0 off the support (SVD leaves ~1e-15)
    losses = (np.einsum("msi,mij,msj->ms", xs, gs, xs) - 2.0 * np.einsum("msi,mi->ms", xs, hs)
              + bbs[:, None])
    feasible = (xs >= 0).all(axis=2)
    best = np.full(len(todo), -1)
    best_loss = bbs.copy()
    tol = 1e-12 * np.abs(bbs)
    for k in range(len(_SUBSETS)):  # in subset order, as _nnls_gram_subsets
        better = feasible[:, k] & (losses[:, k] < best_loss - tol)
        best = np.where(better, k, best)
        best_loss = np.where(better, losses[:, k], best_loss)
    chosen = xs[np.arange(len(todo)), np.maximum(best, 0)]
    x[todo] = np.where((best >= 0)[:, None], chosen, 0.0)
    return x


def _nnls_gram_subsets(g: np.ndarray, h: np.ndarray, bb: float) -> np.ndarray:
    """``_nnls_gram``'s subset search one subset at a time (minimum-norm least squares on each
    support: handles singular systems)."""
    best_x, best_loss = np.zeros(len(h)), bb
    for cols in _SUBSETS:
        idx = np.array(cols)
        g_sub = g[np.ix_(idx, idx)]
        if not np.any(g_sub):
            continue
        x_sub = np.linalg.lstsq(g_sub, h[idx], rcond=None)[0]
        if np.any(x_sub < 0):
            continue
        x = np.zeros(len(h))
        x[idx] = x_sub
        loss = float(x @ g @ x - 2.0 * x @ h + bb)
        if loss < best_loss - 1e-12 * abs(bb):
            best_x, best_loss = x, loss
    return best_x


class _Problem:
    """Weighted, column-scaled relative-error least squares for one record set (+ prior), for
    many knees at once: only the design's second column depends on the knee, so the normal
    equations of every knee are built in one batched pass (a fit evaluates ~300 knee ×
    weight combinations; one at a time they cost ~90 ms per 1024-record fit, which the
    router's subscriber thread paid while holding the GIL)."""

    def __init__(self, records: StepRecords, prior: StepModel | None, opts: FitOptions):
        self.records, self.opts = records, opts
        inv_y = 1.0 / records.seconds
        self.n_tokens = records.prefill_tokens + records.decode_seqs
        self.inv_y = inv_y
        # Relative-error rows of the knee-independent columns (const, prefill pairs, decode
        # context), and their column maxima (the scaling that keeps the systems conditioned).
        self.fixed = np.column_stack([inv_y, records.prefill_context_tokens * inv_y,
                                      records.decode_context_tokens * inv_y])
        self.fixed_scale = np.abs(self.fixed).max(axis=0)
        self.prior = None
        if prior is not None:
            self.prior = np.array([getattr(prior, c) for c in _LINEAR])

    def _rows(self, knees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Relative-error design rows x (K, n, 4) and column scales (K, 4) per knee."""
        knee_col = np.maximum(self.n_tokens[None, :] - knees[:, None], 0.0) * self.inv_y
        x = np.empty((len(knees), len(self.inv_y), 4))
        x[:, :, 0] = self.fixed[:, 0]
        x[:, :, 1] = knee_col
        x[:, :, 2] = self.fixed[:, 1]
        x[:, :, 3] = self.fixed[:, 2]
        scale = np.empty((len(knees), 4))
        scale[:, [0, 2, 3]] = self.fixed_scale
        scale[:, 1] = np.abs(knee_col).max(axis=1)
        scale[scale == 0] = 1.0
        return x, scale

    def solve(self, knees: np.ndarray, weights: np.ndarray, rows=None):
        """Weighted NNLS per knee. ``weights``: (n,) for every knee or (K, n); ``rows``: this
        method's fourth output for the same knees, to reuse. Returns coefficients (K, 4),
        weighted squared losses (K,), relative residuals (K, n) and the rows."""
        knees = np.asarray(knees, dtype=np.float64).reshape(-1)
        if rows is None:
            x, scale = self._rows(knees)
            rows = (x, scale, x / scale[:, None, :])
        x, scale, a = rows
        w = np.broadcast_to(weights, (len(knees), x.shape[1]))
        aw = a * w[:, :, None]
        g = aw.transpose(0, 2, 1) @ a
        h = aw.sum(axis=1)
        bb = w.sum(axis=1)
        if self.prior is not None:
            # rows  sqrt(lambda) * c_j / prior_j = sqrt(lambda)  (relative pull towards prior),
            # one per positive prior coefficient: diagonal terms of the normal equations
            lam = self.opts.prior_weight
            for j, p in enumerate(self.prior):
                if p > 0:
                    r = 1.0 / (p * scale[:, j])
                    g[:, j, j] += lam * r * r
                    h[:, j] += lam * r
                    bb = bb + lam
        coef = _nnls_gram_many(g, h, np.broadcast_to(bb, len(knees))) / scale
        resid = (x @ coef[:, :, None])[:, :, 0] - 1.0  # relative residuals of the data rows
        return coef, np.sum(w * resid * resid, axis=1), resid, rows

    def huber_weights(self, resid: np.ndarray) -> np.ndarray:
        d = self.opts.huber_delta
        r = np.abs(resid)
        return np.where(r <= d, 1.0, d / np.maximum(r, 1e-300))

    def robust_fit(self, knees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IRLS with Huber weights per knee; returns coefficients (K, 4) and Huber losses (K,)."""
        coef, _, resid, rows = self.solve(knees, np.ones(len(self.inv_y)))
        for _ in range(self.opts.irls_iterations):
            coef, _, resid, _ = self.solve(knees, self.huber_weights(resid), rows)
        d, r = self.opts.huber_delta, np.abs(resid)
        loss = np.sum(np.where(r <= d, 0.5 * r * r, d * (r - 0.5 * d)), axis=1)
        return coef, loss


def fit(records: StepRecords | Iterable[StepRecord], *, prior: StepModel | None = None,
        options: FitOptions | None = None) -> StepModel:
    """Fit a ``StepModel`` to step records (see the module docstring for the method).

    ``records``: ``StepRecords`` (plain arrays) or an iterable of ``StepRecord``. Invalid input
    (empty, NaN, negative, mismatched lengths) raises ValueError naming the field.
    """
    if not isinstance(records, StepRecords):
        records = StepRecords.from_records(records)
    opts = options or FitOptions()
    problem = _Problem(records, prior, opts)
    top = min(opts.knee_max, float(problem.n_tokens.max()))
    coarse = np.arange(0.0, top + opts.knee_coarse_step, opts.knee_coarse_step)
    # Coarse search on plain (relative) least squares, then robust refinement near the best.
    losses = problem.solve(coarse, np.ones(len(records)))[1]
    k0 = float(coarse[int(np.argmin(losses))])
    fine = np.arange(max(0.0, k0 - opts.knee_coarse_step), k0 + opts.knee_coarse_step + 1e-9,
                     opts.knee_fine_step)
    coefs, fine_losses = problem.robust_fit(fine)
    best = 0
    for k in range(1, len(fine)):  # first of (near-)ties, as a scan in knee order
        if fine_losses[k] < fine_losses[best] - 1e-15:
            best = k
    values = dict(zip(_LINEAR, (float(max(c, 0.0)) for c in coefs[best])))
    return StepModel(knee_tokens=float(fine[best]), **values)


def sample_profile_shapes(n: int, rng: np.random.Generator) -> list[StepShape]:
    """Random step shapes spanning what an SGLang instance runs (used by ``fit_profile``).

    40 % single-request prefills (1..8192 new tokens after a 0..8000-token cached prefix),
    10 % multi-request prefill batches, 40 % decode batches (1..256 sequences of 10..4000
    context tokens), 10 % mixed (a prefill chunk plus decodes).
    """
    shapes = []
    for _ in range(n):
        u = rng.random()
        if u < 0.4:
            s = StepShape.for_requests([int(rng.integers(1, 8193))], [int(rng.integers(0, 8001))], [])
        elif u < 0.5:
            k = int(rng.integers(2, 9))
            s = StepShape.for_requests(list(rng.integers(1, 1025, size=k)),
                                       list(rng.integers(0, 2049, size=k)), [])
        elif u < 0.9:
            b = int(rng.integers(1, 257))
            s = StepShape.for_requests([], [], list(rng.integers(10, 4001, size=b)))
        else:
            b = int(rng.integers(1, 129))
            s = StepShape.for_requests([int(rng.integers(1, 2049))], [int(rng.integers(0, 4001))],
                                       list(rng.integers(10, 4001, size=b)))
        shapes.append(s)
    return shapes


def profile_records(profile: GpuStepProfile | str, n: int, rng: np.random.Generator, *,
                    noisy: bool = True, time_scale: float = 1.0) -> StepRecords:
    """``n`` records from a GPU profile: random shapes, times sampled with the profile's measured
    spread (``noisy``) or its mean, multiplied by ``time_scale``."""
    p = GpuStepProfile.load(profile) if isinstance(profile, str) else profile
    shapes = sample_profile_shapes(n, rng)
    if noisy:
        secs = [p.sample_seconds(s, rng) for s in shapes]
    else:
        secs = [p.mean_seconds(s) for s in shapes]
    return StepRecords.from_shapes(shapes, np.asarray(secs) * time_scale)


def fit_profile(profile_id: str, *, n_samples: int = 2000, seed: int = 0, noisy: bool = False,
                time_scale: float = 1.0) -> StepModel:
    """Fit a ``StepModel`` to a bundled GPU profile (``gpu_profiles.PROFILES``).

    Samples ``n_samples`` shapes (``sample_profile_shapes``) with ``seed`` and fits their mean
    step times (``noisy=False``, how ``DEFAULT_H100_LLAMA2_7B`` was made) or sampled ones.
    """
    rng = np.random.default_rng(seed)
    return fit(profile_records(profile_id, n_samples, rng, noisy=noisy, time_scale=time_scale))


# -- JSON ---------------------------------------------------------------------------------

def model_to_json(model: StepModel, source: Mapping[str, Any] | None = None) -> dict:
    """The JSON document of a model (see the module docstring)."""
    return {"schema": STEP_MODEL_SCHEMA,
            "coefficients": {name: getattr(model, name) for name in _COEFF_NAMES},
            "source": dict(source or {})}


def model_from_json(doc: Any) -> StepModel:
    """Parse a model document; a wrong schema or missing/invalid coefficient raises ValueError."""
    if not isinstance(doc, dict):
        raise ValueError(f"step model JSON must be an object, got {type(doc).__name__}")
    if doc.get("schema") != STEP_MODEL_SCHEMA:
        raise ValueError(f"step model JSON: schema {doc.get('schema')!r} is not "
                         f"{STEP_MODEL_SCHEMA!r}")
    coeffs = doc.get("coefficients")
    if not isinstance(coeffs, dict):
        raise ValueError("step model JSON: field 'coefficients' missing or not an object")
    values = {}
    for name in _COEFF_NAMES:
        if name not in coeffs:
            raise ValueError(f"step model JSON: coefficient {name!r} missing")
        v = coeffs[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"step model JSON: coefficient {name!r} is not a number: {v!r}")
        values[name] = float(v)
    extra = set(coeffs) - set(_COEFF_NAMES)
    if extra:
        raise ValueError(f"step model JSON: unknown coefficient(s) {sorted(extra)}")
    return StepModel(**values)


def save_step_model(path: str | os.PathLike, model: StepModel,
                    source: Mapping[str, Any] | None = None) -> None:
    """Write the model's JSON document atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(model_to_json(model, source), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_step_model(path: str | os.PathLike) -> StepModel:
    """Read a model written by ``save_step_model``; unreadable or invalid files raise ValueError."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read step model {str(path)!r}: {e}") from None
    try:
        return model_from_json(doc)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# -- online calibration ------------------------------------------------------------------

def scaled(model: StepModel, factor: float) -> StepModel:
    """The model with every time coefficient multiplied by ``factor`` (knee unchanged)."""
    return StepModel(const_s=model.const_s * factor, per_token_s=model.per_token_s * factor,
                     knee_tokens=model.knee_tokens,
                     per_prefill_pair_s=model.per_prefill_pair_s * factor,
                     per_decode_context_token_s=model.per_decode_context_token_s * factor)


class OnlineCalibrator:
    """Keeps a ``StepModel`` calibrated on the latest step records of one instance.

    * sliding window of the latest ``window`` records; every ``refit_every`` records a refit on
      the window (pulled towards the current model as a prior, so a window without, say,
      prefill steps keeps the prefill coefficient it had);
    * drift: if the current model's median relative error on the newest ``refit_every``
      records exceeds ``drift_threshold`` (new GPU, clocks, time scale), the older records are
      dropped, the model is rescaled at once by the median measured/predicted ratio and refitted
      from the new records as they arrive (a full fit once ``min_fit_records`` are in).

    Convergence after a hardware change is bounded by ``refit_every`` (rescale) plus
    ``min_fit_records`` (refit on new records only) steps; ``tests/unit/test_perf_model.py``
    measures it. Each refit costs a few ms to tens of ms for a 1024-record window; callers on a
    latency-critical path should run ``observe`` off that path, and a busy instance (hundreds
    of steps a second) should set ``min_refit_interval_s``: the drift check still runs every
    ``refit_every`` records (cheap), the full refit of a model that has not drifted at most
    once per interval (the router uses 10 s: refitting every 64 steps cost a router in front of
    one busy instance ~15 % of its CPU), and a drift refits at once only if the previous
    post-drift fit is an interval old (an instance whose step times the model form does not
    fit, e.g. a real-CPU test instance, "drifts" at almost every check; the rescale still
    happens at every drift). So at most two full fits per interval.
    """

    def __init__(self, initial: StepModel | None = None, *, window: int = 1024,
                 refit_every: int = 64, min_fit_records: int = 128, drift_threshold: float = 0.15,
                 options: FitOptions | None = None, min_refit_interval_s: float = 0.0,
                 clock=time.monotonic):
        if window < min_fit_records or min_fit_records < refit_every or refit_every < 1:
            raise ValueError("OnlineCalibrator needs window >= min_fit_records >= refit_every >= 1")
        if not min_refit_interval_s >= 0:
            raise ValueError(f"min_refit_interval_s must be >= 0, got {min_refit_interval_s}")
        self.min_refit_interval_s, self._clock = min_refit_interval_s, clock
        self._last_fit_at: float | None = None
        self._last_drift_fit_at: float | None = None
        self.window, self.refit_every = window, refit_every
        self.min_fit_records, self.drift_threshold = min_fit_records, drift_threshold
        self.options = options or FitOptions()
        self._model = initial
        self._buf: collections.deque[tuple[float, ...]] = collections.deque(maxlen=window)
        self._since_refit = 0
        self._fresh = False  # window holds only records since the last drift, not yet fitted
        self.records_seen = 0
        self.records_skipped = 0
        self.refits = 0
        self.drift_events = 0

    @property
    def model(self) -> StepModel | None:
        """The current model (None until the first fit when no initial model was given)."""
        return self._model

    def observe(self, prefill_tokens: float, prefill_context_tokens: float, decode_seqs: float,
                decode_context_tokens: float, seconds: float) -> bool:
        """Add one step record; returns True when this call changed the model (a refit or a
        drift rescale). Invalid records
        (non-finite, negative, no tokens, non-positive time) are counted and skipped."""
        row = (float(prefill_tokens), float(prefill_context_tokens), float(decode_seqs),
               float(decode_context_tokens), float(seconds))
        if (not all(math.isfinite(v) and v >= 0 for v in row) or row[4] <= 0
                or row[0] + row[2] <= 0):
            self.records_skipped += 1
            return False
        self._buf.append(row)
        self.records_seen += 1
        self._since_refit += 1
        if self._since_refit < self.refit_every:
            return False
        self._since_refit = 0
        return self._refit()

    def observe_record(self, record: StepRecord) -> bool:
        return self.observe(record.prefill_tokens, record.prefill_context_tokens,
                            record.decode_seqs, record.decode_context_tokens, record.seconds)

    def _records(self, last: int | None = None) -> StepRecords:
        rows = list(self._buf)[-last:] if last else list(self._buf)
        return StepRecords(*np.array(rows, dtype=np.float64).T)

    def _refit(self) -> bool:
        changed = False
        if self._model is not None:
            recent = self._records(self.refit_every)
            ratio = recent.seconds / np.maximum(predict_seconds(self._model, recent), 1e-300)
            off = np.abs(ratio - 1.0) > self.drift_threshold
            if float(np.median(np.abs(ratio - 1.0))) > self.drift_threshold:
                self.drift_events += 1
                start = 0
                if not self._fresh:
                    # Change point: the split of the newest chunk into "fits the old model" /
                    # "does not" with the fewest misclassified records; older records are dropped.
                    start = _change_point(off)
                    keep = list(self._buf)[-self.refit_every + start:]
                    self._buf.clear()
                    self._buf.extend(keep)
                    self._fresh = True
                self._model = scaled(self._model, float(np.median(ratio[start:])))
                changed = True
        if len(self._buf) >= self.min_fit_records or self._model is None:
            now = self._clock()
            interval = self.min_refit_interval_s
            if (self._model is not None and self._last_fit_at is not None
                    and now - self._last_fit_at < interval):
                # Refitted recently. A drift (new regime) may still refit at once, but only if
                # the last post-drift fit is an interval old: an instance whose steps the
                # model form does not fit keeps "drifting" and would otherwise be refitted at
                # every check (a real-CPU instance: 14 drifts in 33 checks, ~120 ms per fit).
                if not self._fresh or (self._last_drift_fit_at is not None
                                       and now - self._last_drift_fit_at < interval):
                    return changed
            if self._fresh:
                self._last_drift_fit_at = now
            self._model = fit(self._records(), prior=self._model, options=self.options)
            self._last_fit_at = now
            self._fresh = False
            self.refits += 1
            changed = True
        return changed


def _change_point(off: np.ndarray) -> int:
    """Index k minimising #(off before k) + #(not off from k): where the regime changed."""
    off = off.astype(np.int64)
    before = np.concatenate([[0], np.cumsum(off)])          # off records in [0, k)
    after_ok = np.concatenate([np.cumsum((1 - off)[::-1])[::-1], [0]])  # fitting ones in [k, n)
    return int(np.argmin(before + after_ok))
