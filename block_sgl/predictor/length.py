"""Response-length prediction: an XGBoost quantile regressor (P50, P90) over prompt features.

Model (two stages): (1) linear ridge models over hashed word n-grams of the request, one per
target in ``FeatureConfig.gram_targets`` (log length, rank, P(length > k), ...), fitted by
``fit_gram_ridge``; their scores are features of (2) one XGBoost booster with the quantile
objective (``reg:quantileerror``, ``quantile_alpha = [0.5, 0.9]``, multi-output trees: each
tree has a (P50, P90) leaf) over those scores and the cheap prompt features of
``block_sgl.predictor.features``, trained on log(1 + output tokens) (quantiles are invariant
under a monotone transform, and trees split the log scale more evenly). The training rows get
out-of-fold n-gram scores (stacking), so the trees learn how far to trust them on new prompts.
The P50 is the point prediction (MAE is minimised by the median).

Inference does not call XGBoost (hundreds of µs per single row: thread pool, proxy DMatrix).
At load the booster is compiled twice (``TreeEnsemble``): into numpy arrays (complete binary
trees, level by level: ``predict_batch`` and the reference walk) and into generated Python code,
one nested conditional expression per tree (``predict2_python``): for about a hundred depth-4
trees that costs less than the numpy walk's fixed ten numpy calls. ``predict`` runs
``predict2``: by default the compiled twin of that code (``block_sgl._features.TreeKernel``, a C
walk over the level arrays with the same sums), and the compiled featurizer
(``features.CompiledPromptFeaturizer``); ``BLOCK_SGL_FEATURES_PURE=1`` runs the Python code
instead. Parity with ``Booster.predict`` and between the twins are unit tests. See
``block_sgl/predictor/README.md`` for the measured costs.

Saved model = a directory with ``model.ubj`` (the XGBoost booster, UBJSON),
``gram_weights.npy`` (the n-gram models: ``(targets, 2 ** gram_bits + 1)`` float32) and
``metadata.json`` (schema + version, feature config, tokenizer id, quantiles, target transform,
training summary, sha256 of the two other files). ``LengthPredictor.load`` refuses (ValueError) a
missing, corrupt or mismatched file with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from block_sgl.predictor.features import (COMPILED_EXTENSION, GRAM_TARGETS, FeatureConfig,
                                          PromptFeaturizer, _texts)

LENGTH_MODEL_SCHEMA = "block_sgl.length_model"
LENGTH_MODEL_VERSION = 2
MODEL_FILE = "model.ubj"
GRAMS_FILE = "gram_weights.npy"
METADATA_FILE = "metadata.json"


@dataclasses.dataclass(frozen=True)
class LengthModelConfig:
    """XGBoost training settings of the length model (saved in the model metadata)."""

    rounds: int = 100
    """Boosting rounds (each adds one tree, or one per quantile without multi-output trees).
    Inference cost grows with the number of trees (about 0.1-0.2 µs per tree)."""
    max_depth: int = 4
    """Tree depth (inference visits ``max_depth`` nodes per tree)."""
    learning_rate: float = 0.15
    min_child_weight: float = 50.0
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    reg_lambda: float = 1.0
    max_bin: int = 256
    quantiles: tuple[float, float] = (0.5, 0.9)
    """The two quantiles predicted (P50, P90)."""
    log_target: bool = True
    """Fit log(1 + tokens) instead of tokens."""
    seed: int = 0
    nthread: int = 1
    """XGBoost threads; fixed so that training is reproducible."""
    multi_output_trees: bool = True
    """One tree per round predicting both quantiles (XGBoost ``multi_output_tree``): half the
    trees of one-tree-per-quantile at the same accuracy, so half the inference work."""
    ridge_lambda: float = 1.0
    """L2 penalty of the n-gram linear models behind the ``gram_<target>`` features."""
    ridge_folds: int = 5
    """Folds of the out-of-fold ``gram_<target>`` scores of the training rows."""
    ridge_iterations: int = 200
    """Conjugate-gradient iterations (at most) per ridge fit."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d

    def xgb_params(self) -> dict:
        return {"objective": "reg:quantileerror",
                "quantile_alpha": np.asarray(self.quantiles, dtype=np.float64),
                "tree_method": "hist", "max_depth": self.max_depth, "eta": self.learning_rate,
                "min_child_weight": self.min_child_weight, "subsample": self.subsample,
                "colsample_bytree": self.colsample_bytree, "lambda": self.reg_lambda,
                "max_bin": self.max_bin, "seed": self.seed, "nthread": self.nthread,
                "multi_strategy": ("multi_output_tree" if self.multi_output_trees
                                   else "one_output_per_tree"),
                "verbosity": 0}


class TreeEnsemble:
    """An XGBoost tree ensemble compiled for fast single-row evaluation.

    Numpy form: every tree is padded to a complete binary tree of the ensemble's depth ``D`` (a
    leaf above depth ``D`` becomes a chain of always-left nodes) and stored level by level, all
    levels in one array: level ``d`` starts at ``n_trees * (2**d - 1)`` and from node ``a`` of
    level ``d`` the next node is ``2 * a + n_trees + go_right``, for every tree at once. A
    prediction tests every node in two numpy calls, turns the outcomes into each node's next
    node in a third (``step = left child + go_right``), then moves every tree one level down
    per ``take`` and sums the leaves: ``D + 5`` numpy calls whatever the number of trees.
    Leaves are vectors (one value per output), so both XGBoost layouts work: one tree per
    output (``tree_info`` = output) and multi-output trees (``size_leaf_vector`` > 1).

    Python form (two outputs only): ``predict2_python``, generated code (see
    ``_compile_python``); ``predict2`` is its compiled twin (C, ``block_sgl._features``) unless
    ``BLOCK_SGL_FEATURES_PURE=1``.

    Routing follows XGBoost: go right iff ``x[feature] >= threshold`` in float32; inputs must
    not contain NaN (``features`` never produces one).
    """

    def __init__(self, booster_json: dict):
        try:
            learner = booster_json["learner"]
            model = learner["gradient_booster"]["model"]
            trees, tree_info = model["trees"], [int(g) for g in model["tree_info"]]
            n_out = max(1, int(learner["learner_model_param"]["num_target"]),
                        int(learner["learner_model_param"].get("num_class", 0)))
            base = _parse_base_score(learner["learner_model_param"]["base_score"], n_out)
            self.n_features = int(learner["learner_model_param"]["num_feature"])
            parsed = [_parse_tree(t, g, n_out) for t, g in zip(trees, tree_info)]
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"not a supported XGBoost tree model: {e!r}") from None
        if not parsed:
            raise ValueError("XGBoost model has no trees")
        depth = max(p[-1] for p in parsed)
        n = len(parsed)
        self.depth, self.n_trees, self.n_groups = depth, n, n_out
        feat = [np.zeros(n << d, dtype=np.intp) for d in range(depth)]
        thr = [np.full(n << d, np.inf, dtype=np.float32) for d in range(depth)]
        leaf = np.zeros((n << depth, n_out), dtype=np.float64)
        for ti, (left, right, tfeat, tthr, values, _) in enumerate(parsed):
            stack = [(0, 0, 0)]  # (node id, depth, path)
            while stack:
                node, d, path = stack.pop()
                if values[node] is not None:
                    span = 1 << (depth - d)
                    start = (ti << depth) + (path << (depth - d))
                    leaf[start:start + span] = values[node]
                    continue  # padding below a leaf keeps the default: feature 0, +inf → left
                feat[d][(ti << d) + path] = tfeat[node]
                thr[d][(ti << d) + path] = tthr[node]
                stack.append((left[node], d + 1, path << 1))
                stack.append((right[node], d + 1, (path << 1) | 1))
        if any(int(f.max(initial=0)) >= self.n_features for f in feat):
            raise ValueError("XGBoost model splits on a feature beyond num_feature")
        self.node_feature = np.ascontiguousarray(
            np.concatenate(feat) if feat else np.zeros(0), dtype=np.intp)
        self.node_threshold = np.ascontiguousarray(
            np.concatenate(thr) if thr else np.zeros(0), dtype=np.float32)
        self._leaf_offset = n * ((1 << depth) - 1)
        tree_leaves = leaf.copy()  # no base: the compiled predict2 adds it last, as Python does
        leaf[:1 << depth] += base  # the base score rides on the first tree's leaves
        self.leaf = np.concatenate([np.zeros((self._leaf_offset, n_out)), leaf])
        self.base = base
        # left child of every internal node (its right child is the next index)
        self._left = np.arange(self._leaf_offset, dtype=np.intp) * 2 + n
        # two outputs as one complex number: one take and one sum for both
        self._leaf2 = (self.leaf[:, 0] + 1j * self.leaf[:, 1]) if n_out == 2 else None
        self.predict2_python = (_compile_python(parsed, base, self.n_features) if n_out == 2
                                else None)
        """For two outputs: ``predict2_python(x) -> complex(out0, out1)`` of one row ``x`` (a
        sequence of ``n_features`` floats already rounded to float32, e.g. an ``array('f')``):
        the trees as generated Python code, which for up to a few hundred trees costs less than
        the numpy walk's fixed cost of ten numpy calls. The specification of ``predict2``."""
        self.predict2 = self.predict2_python
        """``predict2_python``, or by default its compiled twin
        (``block_sgl._features.TreeKernel``: the same walk over the level arrays in C, the
        leaves summed in the same order, so the same doubles); ``BLOCK_SGL_FEATURES_PURE=1``
        keeps the Python code."""
        if n_out == 2 and COMPILED_EXTENSION is not None:
            self.predict2 = COMPILED_EXTENSION.TreeKernel(
                self.node_feature, self.node_threshold, np.ascontiguousarray(tree_leaves),
                np.asarray(base, dtype=np.float64), n, depth, self.n_features).predict2

    def predict_margin(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs (n_groups,) of one float32 feature row."""
        if not self.depth:
            return self.leaf.sum(axis=0)
        step = np.add(self._left, x.take(self.node_feature) >= self.node_threshold)
        node = step[:self.n_trees]
        for _ in range(self.depth - 1):
            node = step.take(node)
        return self.leaf.take(node, axis=0).sum(axis=0)

    def predict_margin2(self, x: np.ndarray) -> complex:
        """``predict_margin`` of a two-output ensemble as ``complex(out0, out1)``: the fastest
        single-row path (``LengthPredictor.predict``)."""
        if not self.depth:
            return complex(self._leaf2.sum())
        step = np.add(self._left, x.take(self.node_feature) >= self.node_threshold)
        node = step[:self.n_trees]
        for _ in range(self.depth - 1):
            node = step.take(node)
        return complex(self._leaf2.take(node).sum())

    def predict_margin_batch(self, x: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Raw outputs (n, n_groups) of a float32 feature matrix (n, n_features)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.n_groups))
        for lo in range(0, x.shape[0], chunk):
            xc = x[lo:lo + chunk]
            if not self.depth:
                out[lo:lo + chunk] = self.leaf.sum(axis=0)
                continue
            step = np.add(self._left, xc[:, self.node_feature] >= self.node_threshold)
            node = step[:, :self.n_trees]
            for _ in range(self.depth - 1):
                node = np.take_along_axis(step, node, axis=1)
            out[lo:lo + chunk] = self.leaf[node].sum(axis=1)
        return out


def _compile_python(parsed: list, base: np.ndarray, n_features: int):
    """Python function ``f(x) -> complex`` summing the two-output trees ``parsed`` (as from
    ``_parse_tree``) plus ``base`` for a row ``x`` of float32-rounded floats: one nested
    conditional expression per tree, ``right if x[feature] >= threshold else left`` (XGBoost's
    routing: a float32 threshold compared with a float32 value is exact in Python floats)."""
    def expr(tree, node: int) -> str:
        left, right, feat, thr, values, _ = tree
        if values[node] is not None:
            return repr(complex(float(values[node][0]), float(values[node][1])))
        return (f"({expr(tree, right[node])} if x{int(feat[node])} >= {float(thr[node])!r} "
                f"else {expr(tree, left[node])})")

    lines = ["def trees(x):", f"    ({', '.join(f'x{i}' for i in range(n_features))},) = x",
             f"    s = {complex(float(base[0]), float(base[1]))!r}"]
    for lo in range(0, len(parsed), 16):  # short statements: no deep expression nesting
        lines.append("    s += " + " + ".join(expr(t, 0) for t in parsed[lo:lo + 16]))
    lines.append("    return s")
    namespace: dict = {}
    exec(compile("\n".join(lines), "<length-model trees>", "exec"), namespace)  # noqa: S102
    return namespace["trees"]


def _parse_base_score(value: Any, n_out: int) -> np.ndarray:
    if isinstance(value, str):
        s = value.strip().strip("[]")
        vals = [float(v) for v in s.split(",") if v.strip()]
    else:
        vals = [float(value)]
    if len(vals) == 1:
        vals = vals * n_out
    if len(vals) != n_out:
        raise ValueError(f"base_score has {len(vals)} values for {n_out} outputs")
    return np.asarray(vals, dtype=np.float64)


def _parse_tree(tree: dict, group: int, n_out: int):
    """(left, right, feature, threshold, leaf value vector or None per node, depth)."""
    left = [int(v) for v in tree["left_children"]]
    right = [int(v) for v in tree["right_children"]]
    feat = [int(v) for v in tree["split_indices"]]
    thr = np.asarray(tree["split_conditions"], dtype=np.float32).tolist()
    if any(int(t) != 0 for t in tree.get("split_type", [])):
        raise ValueError("categorical splits are not supported")
    k = int(tree.get("tree_param", {}).get("size_leaf_vector", 1) or 1)
    values: list[np.ndarray | None] = []
    for i, lc in enumerate(left):
        if lc != -1:
            values.append(None)
        elif k > 1:  # multi-output tree: right_children holds the leaf's index
            if k != n_out:
                raise ValueError(f"leaf vectors of size {k} for {n_out} outputs")
            values.append(np.asarray(tree["leaf_weights"][right[i] * k:(right[i] + 1) * k],
                                     dtype=np.float64))
        else:
            if not 0 <= group < n_out:
                raise ValueError(f"tree output {group} out of range")
            v = np.zeros(n_out)
            v[group] = float(np.float32(thr[i]))
            values.append(v)
    depth, stack = 0, [(0, 0)]
    while stack:
        node, d = stack.pop()
        if values[node] is None:
            stack.append((left[node], d + 1))
            stack.append((right[node], d + 1))
        else:
            depth = max(depth, d)
    if depth > 12:
        raise ValueError(f"tree depth {depth} too large for the compiled evaluator (max 12)")
    return left, right, feat, thr, values, depth


def fit_gram_ridge(vectors: Sequence[tuple[np.ndarray, np.ndarray]], targets: np.ndarray,
                   n_buckets: int, lam: float, iterations: int) -> np.ndarray:
    """Ridge regressions of the columns of ``targets`` (n,) or (n, k) on sparse rows
    ``(indices, values)`` with an unpenalised intercept (the target mean), all solved at once
    by conjugate gradient on the normal equations (numpy only; the k solves share every sparse
    product). Returns float32 ``(k, n_buckets + 1)`` (``(n_buckets + 1,)`` for a 1-d target):
    the bucket weights, then the intercept."""
    t = np.asarray(targets, dtype=np.float64)
    one = t.ndim == 1
    t = t.reshape(len(t), -1)
    n, k = t.shape
    if n != len(vectors):
        raise ValueError(f"{len(vectors)} rows but {n} targets")
    lengths = np.fromiter((len(v[0]) for v in vectors), dtype=np.intp, count=n)
    if n == 0 or np.any(lengths == 0):
        raise ValueError("every row needs at least one n-gram")
    row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rows = np.repeat(np.arange(n), lengths)
    cols = np.concatenate([v[0] for v in vectors]).astype(np.intp)
    vals = np.concatenate([v[1] for v in vectors]).astype(np.float64)[:, None]
    # the distinct buckets, and the entries sorted by bucket (for the transposed product)
    used, col_pos = np.unique(cols, return_inverse=True)
    order = np.argsort(col_pos, kind="stable")
    col_start = np.searchsorted(col_pos[order], np.arange(len(used)))
    cols_c, rows_o, vals_o = col_pos, rows[order], vals[order]
    mu = t.mean(axis=0)
    b = t - mu

    def at(u: np.ndarray) -> np.ndarray:  # A^T u, u: (n, k) -> (m, k)
        return np.add.reduceat(vals_o * u[rows_o], col_start, axis=0)

    def normal(v: np.ndarray) -> np.ndarray:  # (A^T A + lam I) v
        av = np.add.reduceat(vals * v[cols_c], row_start, axis=0)
        return at(av) + lam * v

    r = at(b)
    w = np.zeros_like(r)
    p = r.copy()
    rs = np.einsum("ij,ij->j", r, r)
    stop = 1e-12 * rs
    for _ in range(iterations):
        live = rs > stop
        if not live.any():
            break
        ap = normal(p)
        pap = np.einsum("ij,ij->j", p, ap)
        alpha = np.where(live, rs / np.where(pap > 0, pap, 1.0), 0.0)
        w += alpha * p
        r -= alpha * ap
        rs_new = np.einsum("ij,ij->j", r, r)
        p = r + np.where(live, rs_new / np.where(rs > 0, rs, 1.0), 0.0) * p
        rs = rs_new
    out = np.zeros((k, n_buckets + 1), dtype=np.float32)
    out[:, used] = w.T
    out[:, -1] = mu
    return out[0] if one else out


def _gram_predict(vectors, weights: np.ndarray) -> np.ndarray:
    """(n, k) scores of sparse rows under ``fit_gram_ridge`` weights (k, n_buckets + 1),
    without the intercepts (as ``PromptFeaturizer`` computes them)."""
    w = np.asarray(weights, dtype=np.float32).reshape(-1, weights.shape[-1])
    wt = np.ascontiguousarray(w[:, :-1].T)
    return np.array([v.astype(np.float32) @ wt[i] for i, v in vectors],
                    dtype=np.float32).reshape(len(vectors), len(w))


@functools.lru_cache(maxsize=8)
def _normal_quantile(q: float) -> float:
    return statistics.NormalDist().inv_cdf(q)


def lognormal_mean(p50: float, p_upper: float, quantiles: tuple[float, float] = (0.5, 0.9),
                   cap: float = math.inf) -> float:
    """Mean of the log-normal whose ``quantiles`` are (``p50``, ``p_upper``); ``quantiles[0]``
    must be 0.5. At most ``cap``; at least ``p50`` (``p_upper <= p50``: a point mass)."""
    q_low, q_high = quantiles
    if q_low != 0.5 or not 0.5 < q_high < 1.0:
        raise ValueError(f"lognormal_mean needs quantiles (0.5, q) with 0.5 < q < 1, got {quantiles}")
    if not (p50 > 0 and p_upper > 0):
        raise ValueError(f"quantiles must be > 0, got P50={p50}, upper={p_upper}")
    if p_upper <= p50:
        return min(p50, cap)
    sigma = math.log(p_upper / p50) / _normal_quantile(q_high)
    return min(p50 * math.exp(min(sigma * sigma / 2.0, 50.0)), cap)


class LengthPredictor:
    """Predicts (P50, P90) output tokens of a request from its prompt; see the module docstring.

    Build with ``train_length_model`` or ``LengthPredictor.load``. Prediction keeps no state
    between calls (safe from several threads).
    """

    def __init__(self, booster_raw: bytes, metadata: dict, gram_weights: np.ndarray | None):
        import xgboost as xgb

        self._raw = bytes(booster_raw)
        self._metadata = json.loads(json.dumps(metadata))  # deep copy, JSON-clean
        self._gram_weights = (None if gram_weights is None
                              else np.asarray(gram_weights, dtype=np.float32).copy())
        self.feature_config = FeatureConfig.from_dict(metadata["feature_config"])
        if self.feature_config.gram_bits and self._gram_weights is None:
            raise ValueError("the feature config has a gram_score but no gram weights were given")
        self.featurizer = PromptFeaturizer(self.feature_config, self._gram_weights)
        booster = xgb.Booster(model_file=bytearray(self._raw))
        self.ensemble = TreeEnsemble(json.loads(booster.save_raw("json")))
        if self.ensemble.n_features != self.featurizer.n_features:
            raise ValueError(f"the booster expects {self.ensemble.n_features} features but the "
                             f"feature config gives {self.featurizer.n_features}")
        if self.ensemble.n_groups != 2:
            raise ValueError(f"the booster has {self.ensemble.n_groups} outputs, expected 2 "
                             "(P50, P90)")
        self.quantiles = tuple(float(q) for q in metadata["quantiles"])
        self.log_target = bool(metadata["log_target"])
        self.max_output_tokens = float(metadata["max_output_tokens"])
        self.tokens_per_char = float(metadata["tokens_per_char"])
        self.tokenizer_id = str(metadata["tokenizer_id"])

    @property
    def metadata(self) -> dict:
        return json.loads(json.dumps(self._metadata))

    # -- prediction ---------------------------------------------------------------------------
    def _tokens(self, prompt: Any, prompt_token_count: float | None) -> float:
        if prompt_token_count is None:
            texts = _texts(prompt)
            return (sum(map(len, texts)) + max(len(texts) - 1, 0)) * self.tokens_per_char
        return prompt_token_count

    def _finish(self, margin: np.ndarray) -> np.ndarray:
        out = (np.expm1(np.minimum(margin, 50.0)) if self.log_target
               else np.asarray(margin, dtype=np.float64))
        out = np.nan_to_num(out, nan=1.0, posinf=self.max_output_tokens, neginf=1.0)
        out = np.clip(out, 1.0, self.max_output_tokens)
        out[..., 1] = np.maximum(out[..., 1], out[..., 0])  # no quantile crossing
        return out

    def predict(self, prompt: Any, prompt_token_count: float | None = None) -> tuple[float, float]:
        """(P50, P90) output tokens of one request.

        ``prompt``: text, bytes, or a chat message list; ``prompt_token_count``: its length in
        tokens of the served model's tokenizer (estimated from characters when None). Always
        finite, within [1, the longest training response], P90 >= P50.
        """
        if prompt_token_count is None:
            prompt_token_count = self._tokens(prompt, None)
        m = self.ensemble.predict2(self.featurizer.transform_row(prompt, prompt_token_count))
        m50, m90 = m.real, m.imag
        if self.log_target:  # plain floats: numpy calls cost more than the math here
            m50 = math.expm1(min(m50, 50.0))
            m90 = math.expm1(min(m90, 50.0))
        top = self.max_output_tokens
        p50 = min(max(m50, 1.0), top) if m50 == m50 else 1.0
        p90 = min(max(m90, p50), top) if m90 == m90 else p50
        return p50, p90

    def expected_tokens(self, p50: float, p_upper: float) -> float:
        """The mean output length implied by a (P50, upper-quantile) prediction, for a
        log-normal length: ``P50 · exp(σ² / 2)`` with ``σ = ln(P_upper / P50) / z`` (``z``: the
        standard normal quantile of the upper quantile, 1.2816 for P90), capped at the longest
        training response. Why: simulating an instance's work needs each request's *expected*
        length; the median under-states it for right-skewed lengths (on held-out ShareGPT
        conversations the P50 averaged 7 % below the true lengths, this mean 4 % above)."""
        return lognormal_mean(p50, p_upper, self.quantiles, self.max_output_tokens)

    def predict_batch(self, prompts: Sequence[Any],
                      prompt_token_counts: Sequence[float | None] | None = None) -> np.ndarray:
        """(n, 2) array of (P50, P90) for several requests (same values as ``predict``)."""
        if prompt_token_counts is None:
            prompt_token_counts = [None] * len(prompts)
        if len(prompts) != len(prompt_token_counts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_token_counts)} token counts")
        if len(prompts) == 0:
            return np.zeros((0, 2))
        tokens = [self._tokens(p, t) for p, t in zip(prompts, prompt_token_counts)]
        x = self.featurizer.transform(prompts, tokens)
        return self._finish(self.ensemble.predict_margin_batch(x))

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``model.ubj``, ``gram_weights.npy`` (if any) and ``metadata.json`` (last) into
        the directory ``path`` (created if needed)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        meta = dict(self._metadata)
        meta["model_sha256"] = hashlib.sha256(self._raw).hexdigest()
        _atomic_write(d / MODEL_FILE, self._raw)
        if self._gram_weights is not None:
            buf = io.BytesIO()
            np.save(buf, self._gram_weights, allow_pickle=False)
            _atomic_write(d / GRAMS_FILE, buf.getvalue())
            meta["gram_weights_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        else:
            meta.pop("gram_weights_sha256", None)
        _atomic_write(d / METADATA_FILE,
                      (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike, *, tokenizer_id: str | None = None
             ) -> "LengthPredictor":
        """Load a saved model; ``tokenizer_id``, when given, must match the one it was trained
        with. Raises ValueError naming the problem for a missing, corrupt or mismatched model."""
        d = Path(path)
        meta_path = d / METADATA_FILE
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{d}: not a length model directory (no {METADATA_FILE})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: corrupt length-model metadata ({e})") from None
        if not isinstance(meta, dict) or meta.get("schema") != LENGTH_MODEL_SCHEMA:
            got = meta.get("schema") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{meta_path}: schema {got!r} is not {LENGTH_MODEL_SCHEMA!r}")
        if meta.get("version") != LENGTH_MODEL_VERSION:
            raise ValueError(f"{meta_path}: length-model version {meta.get('version')!r} is not "
                             f"supported (this block_sgl reads version {LENGTH_MODEL_VERSION}); "
                             "retrain the model")
        missing = [k for k in ("feature_config", "tokenizer_id", "quantiles", "log_target",
                               "max_output_tokens", "tokens_per_char", "model_sha256")
                   if k not in meta]
        if missing:
            raise ValueError(f"{meta_path}: metadata lacks {', '.join(missing)}")
        if tokenizer_id is not None and meta["tokenizer_id"] != tokenizer_id:
            raise ValueError(f"{d}: length model was trained with tokenizer "
                             f"{meta['tokenizer_id']!r}, not {tokenizer_id!r}")
        raw = _read_checked(d / MODEL_FILE, meta["model_sha256"])
        weights = None
        if "gram_weights_sha256" in meta:
            data = _read_checked(d / GRAMS_FILE, meta["gram_weights_sha256"])
            try:
                weights = np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as e:
                raise ValueError(f"{d / GRAMS_FILE}: corrupt gram weights ({e})") from None
        try:
            return cls(raw, meta, weights)
        except ValueError as e:
            raise ValueError(f"{d}: invalid length model: {e}") from None
        except Exception as e:  # xgboost.core.XGBoostError and friends
            raise ValueError(f"{d}: corrupt length model: {e}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the length model ({e})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: corrupt length model (sha256 does not match {METADATA_FILE})")
    return data


def train_length_model(prompts: Sequence[Any], prompt_token_counts: Sequence[float],
                       output_tokens: Sequence[float], *, tokenizer_id: str,
                       config: LengthModelConfig | None = None,
                       feature_config: FeatureConfig | None = None,
                       extra_metadata: dict | None = None, log=None) -> LengthPredictor:
    """Train the length model on (prompt, prompt tokens) → output tokens.

    Steps: features; the ``gram_score`` column of the training rows from ridge models fitted
    on the other folds (out-of-fold, so the trees do not learn to trust an overfitted score);
    a ridge fit on all rows for inference; then XGBoost. Deterministic for a given input,
    config (seed, nthread) and XGBoost version.
    """
    import xgboost as xgb

    config = config or LengthModelConfig()
    feature_config = feature_config or FeatureConfig()
    log = log or (lambda msg: None)
    y = np.asarray(output_tokens, dtype=np.float64).reshape(-1)
    tok = np.asarray(prompt_token_counts, dtype=np.float64).reshape(-1)
    if not (len(prompts) == len(tok) == len(y)):
        raise ValueError(f"prompts ({len(prompts)}), prompt_token_counts ({len(tok)}) and "
                         f"output_tokens ({len(y)}) differ in length")
    if len(y) < max(2, config.ridge_folds):
        raise ValueError(f"output_tokens: need at least {max(2, config.ridge_folds)} examples")
    for name, arr in (("output_tokens", y), ("prompt_token_counts", tok)):
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"{name}: values must be finite and >= 0")
    featurizer = PromptFeaturizer(feature_config)
    x, vectors = featurizer.transform_with_grams(prompts, tok)
    target = np.log1p(y) if config.log_target else y
    weights = None
    if featurizer.has_gram_score:
        n_b = featurizer.n_gram_buckets
        folds = np.random.default_rng(config.seed).permutation(len(y)) % config.ridge_folds
        fold_rows = [(np.nonzero(folds != k)[0], np.nonzero(folds == k)[0])
                     for k in range(config.ridge_folds)]
        targets = np.stack([GRAM_TARGETS[name](y) for name in feature_config.gram_targets],
                           axis=1)
        start = featurizer.gram_score_start
        for k, (tr, te) in enumerate(fold_rows):
            w = fit_gram_ridge([vectors[i] for i in tr], targets[tr], n_b, config.ridge_lambda,
                               config.ridge_iterations)
            x[te, start:] = _gram_predict([vectors[i] for i in te], w)
            log(f"gram scores: fold {k + 1}/{config.ridge_folds} fitted")
        weights = fit_gram_ridge(vectors, targets, n_b, config.ridge_lambda,
                                 config.ridge_iterations)
        log("gram scores fitted")
    booster = xgb.train(config.xgb_params(), xgb.DMatrix(x, label=target, nthread=config.nthread),
                        num_boost_round=config.rounds)
    chars = sum(sum(map(len, t)) + max(len(t) - 1, 0) for t in map(_texts,
                                                                       prompts))
    meta = {
        "schema": LENGTH_MODEL_SCHEMA,
        "version": LENGTH_MODEL_VERSION,
        "feature_config": feature_config.to_dict(),
        "tokenizer_id": tokenizer_id,
        "quantiles": list(config.quantiles),
        "log_target": config.log_target,
        "max_output_tokens": float(max(1.0, y.max())),
        "tokens_per_char": float(tok.sum() / chars) if chars else 0.25,
        "train": {"config": config.to_dict(), "examples": int(len(y)),
                  "xgboost": xgb.__version__, **(extra_metadata or {})},
    }
    raw = bytes(booster.save_raw("ubj"))
    meta["model_sha256"] = hashlib.sha256(raw).hexdigest()
    return LengthPredictor(raw, meta, weights)
