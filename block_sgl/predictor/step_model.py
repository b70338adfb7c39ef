"""The step-latency model form shared by the predictors and fastsim.

    step_s = const_s
           + per_token_s * max(prefill_tokens + decode_seqs - knee_tokens, 0)
           + per_prefill_pair_s * prefill_context_tokens
           + per_decode_context_token_s * decode_context_tokens

Why this form (see ``block_sgl/predictor/gpu_profiles.py`` for the data): the linear layers of a
step cost about the same for 1..~64 tokens (weight reads dominate: memory bound) and then grow
linearly with tokens (compute bound) — a hinge at ``knee_tokens``; prefill attention grows with
(query, key) pairs (``prefill_context_tokens``, defined in ``StepShape``); decode attention with
the KV tokens read. The coefficient vector, in this order, is what fastsim consumes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

N_COEFFS = 5


@dataclasses.dataclass(frozen=True)
class StepModel:
    const_s: float
    per_token_s: float
    knee_tokens: float
    per_prefill_pair_s: float
    per_decode_context_token_s: float

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"StepModel.{f.name} must be a finite number >= 0, got {v!r}")

    def as_array(self) -> np.ndarray:
        return np.array([self.const_s, self.per_token_s, self.knee_tokens,
                         self.per_prefill_pair_s, self.per_decode_context_token_s],
                        dtype=np.float64)

    @classmethod
    def from_array(cls, coeffs) -> "StepModel":
        c = np.asarray(coeffs, dtype=np.float64)
        if c.shape != (N_COEFFS,):
            raise ValueError(f"step model coefficients must have shape ({N_COEFFS},), got {c.shape}")
        return cls(*(float(x) for x in c))

    def step_time(self, prefill_tokens: float, prefill_context_tokens: float,
                  decode_seqs: float, decode_context_tokens: float) -> float:
        n = prefill_tokens + decode_seqs
        if n <= 0:
            return 0.0
        return (self.const_s + self.per_token_s * max(n - self.knee_tokens, 0.0)
                + self.per_prefill_pair_s * prefill_context_tokens
                + self.per_decode_context_token_s * decode_context_tokens)


# Fitted to the bundled H100 + Llama-2-7B profile (``GpuStepProfile.load("h100-llama2-7b")``
# mean step times over random prefill/decode shapes; median relative error 0.7 %). A test refits
# and checks these stay in agreement; ``block_sgl.predictor.perf_model`` produces them.
DEFAULT_H100_LLAMA2_7B = StepModel(
    const_s=5.949e-3,
    per_token_s=1.9776e-5,
    knee_tokens=104.0,
    per_prefill_pair_s=1.3797e-9,
    per_decode_context_token_s=2.2590e-7,
)
