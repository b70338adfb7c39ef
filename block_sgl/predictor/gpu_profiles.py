"""Step latency of a real GPU serving a real model, built from measured operator profiles.

The bundled profiles (``block_sgl/data/*_mlp_profile.csv``, from microsoft/vidur) measure every
non-attention operator of ONE transformer layer on a GPU, by number of tokens in the batch, with
min / max / mean / median / std over repeated runs. A forward step of the whole model is

    step = emb(n) + n_layers * sum(per-layer ops)(n) + lm_head(seqs) + attention

where ``n`` is the number of tokens in the batch (prefill tokens + one per decoding sequence).

Attention is not in the profiles, so it is modelled from first principles (stated here because
every emulated number depends on it):

* prefill (FlashAttention, compute bound):
  ``FLOPs = 4 * n_layers * n_heads * head_dim * pairs`` where ``pairs`` = sum over prefill
  requests of ``extend * (prefix + (extend + 1) / 2)`` (causal (query, key) pairs: QK^T and AV
  are 2 FLOPs per multiply-add each), divided by ``peak_flops * attn_flops_efficiency``.
* decode (memory bound): every decoding sequence reads its whole KV cache once per step:
  ``bytes = decode_context_tokens * 2 (K and V) * n_layers * n_kv_heads * head_dim * dtype_bytes``
  divided by ``hbm_bytes_per_s * attn_bw_efficiency``.
* lm_head (not profiled either): ``max(weight bytes / bandwidth, 2*hidden*vocab*seqs / flops)``
  with one logit row per sequence in the batch.

Efficiencies are typical achieved fractions of peak (FlashAttention-2 forward reaches about 40 %
of H100 dense BF16 peak and about 55 % on A100; paged decode attention streams KV at about 70 %
of HBM bandwidth). They are documented constants, not fitted to anything.

Variability: the profile's measured spread is sampled, not its mean. One standard normal draw per
step scales the summed standard deviation of the profiled operators (operators of one step are
strongly correlated: same clocks, same contention), clipped to the summed [min, max] range.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import math
from typing import Mapping

import numpy as np

# Operators measured once per layer (``add`` is the residual add; a Llama layer has two).
_LAYER_OPS: Mapping[str, int] = {
    "input_layernorm": 1,
    "attn_pre_proj": 1,
    "attn_rope": 1,
    "attn_post_proj": 1,
    "post_attention_layernorm": 1,
    "mlp_up_proj": 1,
    "mlp_act": 1,
    "mlp_down_proj": 1,
    "add": 2,
}
_STEP_OPS: Mapping[str, int] = {"emb": 1}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """Peak figures of a GPU (dense BF16) and the achieved fractions used for attention."""

    name: str
    peak_flops: float
    """Dense BF16 tensor-core FLOP/s."""
    hbm_bytes_per_s: float
    """HBM bandwidth, bytes/s."""
    attn_flops_efficiency: float
    """Fraction of ``peak_flops`` prefill attention achieves."""
    attn_bw_efficiency: float
    """Fraction of ``hbm_bytes_per_s`` decode attention achieves."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Shape of the served transformer."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    dtype_bytes: int = 2


@dataclasses.dataclass(frozen=True)
class ProfileSource:
    """Where a named emulation profile comes from."""

    csv_name: str
    gpu: GpuSpec
    model: ModelSpec


H100_SXM = GpuSpec("H100-SXM-80GB", 989e12, 3.35e12, 0.40, 0.70)
A100_80GB = GpuSpec("A100-SXM-80GB", 312e12, 2.0e12, 0.55, 0.70)
LLAMA2_7B = ModelSpec("Llama-2-7b", 32, 32, 32, 128, 4096, 32000)
LLAMA3_8B = ModelSpec("Meta-Llama-3-8B", 32, 32, 8, 128, 4096, 128256)

PROFILES: Mapping[str, ProfileSource] = {
    "h100-llama2-7b": ProfileSource("h100_llama2_7b_mlp_profile.csv", H100_SXM, LLAMA2_7B),
    "a100-llama3-8b": ProfileSource("a100_llama3_8b_mlp_profile.csv", A100_80GB, LLAMA3_8B),
}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What a forward step computes; the inputs of every step-latency model in block_sgl.

    ``prefill_context_tokens`` is the attention work of the prefill part: the sum over prefill
    (extend) requests of ``extend * (prefix + (extend + 1) / 2)``, i.e. the number of causal
    (query, key) pairs. For one request it is its new tokens times their mean context.
    """

    prefill_tokens: int = 0
    prefill_context_tokens: float = 0.0
    decode_seqs: int = 0
    decode_context_tokens: int = 0
    prefill_seqs: int = 0

    @staticmethod
    def for_requests(extend_lens, prefix_lens, decode_context_lens) -> "StepShape":
        """Shape of a step from per-request lengths (prefill requests, then decoding ones)."""
        pairs = sum(e * (p + (e + 1) / 2.0) for e, p in zip(extend_lens, prefix_lens))
        return StepShape(
            prefill_tokens=int(sum(extend_lens)),
            prefill_context_tokens=float(pairs),
            decode_seqs=len(decode_context_lens),
            decode_context_tokens=int(sum(decode_context_lens)),
            prefill_seqs=len(extend_lens),
        )


def attention_pairs(extend: int, prefix: int) -> float:
    """Causal (query, key) pairs of one prefill of ``extend`` tokens after ``prefix`` cached."""
    return extend * (prefix + (extend + 1) / 2.0)


class GpuStepProfile:
    """Step time (seconds) of a named GPU + model profile; see the module docstring."""

    def __init__(self, name: str, source: ProfileSource, tokens: np.ndarray,
                 mean: np.ndarray, std: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.name = name
        self.gpu = source.gpu
        self.model = source.model
        self._tokens = tokens
        self._mean, self._std, self._lo, self._hi = mean, std, lo, hi

    @classmethod
    def load(cls, name: str, tensor_parallel: int = 1) -> "GpuStepProfile":
        """Load a bundled profile by id (see ``PROFILES``); unknown ids raise ValueError."""
        if name not in PROFILES:
            raise ValueError(
                f"unknown GPU profile {name!r}; valid profiles: {', '.join(sorted(PROFILES))}")
        source = PROFILES[name]
        text = importlib.resources.files("block_sgl.data").joinpath(source.csv_name).read_text()
        rows = [r for r in csv.DictReader(text.splitlines())
                if int(r["num_tensor_parallel_workers"]) == tensor_parallel]
        if not rows:
            raise ValueError(f"profile {name!r} has no rows for tensor_parallel={tensor_parallel}")
        by_tokens: dict[int, list[np.ndarray]] = {}
        for r in rows:
            stats = np.zeros(4)
            for ops, mult in ((_LAYER_OPS, source.model.n_layers), (_STEP_OPS, 1)):
                for op, count in ops.items():
                    k = f"time_stats.{op}"
                    stats += mult * count * np.array(
                        [float(r[f"{k}.mean"]), float(r[f"{k}.std"]),
                         float(r[f"{k}.min"]), float(r[f"{k}.max"])])
            by_tokens.setdefault(int(r["num_tokens"]), []).append(stats)
        tokens = np.array(sorted(by_tokens), dtype=np.float64)
        table = np.array([np.mean(by_tokens[int(t)], axis=0) for t in tokens]) / 1e3  # ms → s
        return cls(name, source, tokens, table[:, 0], table[:, 1], table[:, 2], table[:, 3])

    # -- pieces ---------------------------------------------------------------------------
    def _interp(self, values: np.ndarray, n: float) -> float:
        t = self._tokens
        if n <= t[-1]:
            return float(np.interp(n, t, values))
        # Beyond the profiled range the linear layers are compute bound: extend the last
        # segment's per-token slope over the last quarter of the profile.
        k = max(1, len(t) // 4)
        slope = (values[-1] - values[-k - 1]) / (t[-1] - t[-k - 1])
        return float(values[-1] + slope * (n - t[-1]))

    def attention_seconds(self, shape: StepShape) -> float:
        m, g = self.model, self.gpu
        prefill_flops = 4.0 * m.n_layers * m.n_heads * m.head_dim * shape.prefill_context_tokens
        kv_bytes = shape.decode_context_tokens * 2 * m.n_layers * m.n_kv_heads * m.head_dim * m.dtype_bytes
        return (prefill_flops / (g.peak_flops * g.attn_flops_efficiency)
                + kv_bytes / (g.hbm_bytes_per_s * g.attn_bw_efficiency))

    def lm_head_seconds(self, seqs: int) -> float:
        if seqs <= 0:
            return 0.0
        m, g = self.model, self.gpu
        weight_bytes = m.hidden * m.vocab * m.dtype_bytes
        flops = 2.0 * m.hidden * m.vocab * seqs
        return max(weight_bytes / g.hbm_bytes_per_s, flops / g.peak_flops)

    # -- public -------------------------------------------------------------------------------
    def mean_seconds(self, shape: StepShape) -> float:
        """Expected step time (the profile's mean; the emulator's median converges to it)."""
        n = shape.prefill_tokens + shape.decode_seqs
        if n <= 0:
            return 0.0
        return (self._interp(self._mean, n) + self.attention_seconds(shape)
                + self.lm_head_seconds(shape.prefill_seqs + shape.decode_seqs))

    def sample_seconds(self, shape: StepShape, rng: np.random.Generator) -> float:
        """One step time drawn from the profile's measured spread (see module docstring)."""
        n = shape.prefill_tokens + shape.decode_seqs
        if n <= 0:
            return 0.0
        mean, std = self._interp(self._mean, n), self._interp(self._std, n)
        lo, hi = self._interp(self._lo, n), self._interp(self._hi, n)
        linear = min(max(mean + std * float(rng.standard_normal()), lo), hi)
        if not math.isfinite(linear):
            linear = mean
        return (linear + self.attention_seconds(shape)
                + self.lm_head_seconds(shape.prefill_seqs + shape.decode_seqs))
