"""Heuristic baseline policies. Each is a small class with the ``Policy`` interface of
``base.py``; load figures come from the instances' streams (snapshot + the router's pending
requests), never from polling the instances.
"""

from __future__ import annotations

import random as _random
from typing import Sequence

from block_sgl.router.policies.base import InstanceView, RequestView


class _Stateless:
    needs_tokens = False
    needs_prediction = False

    def on_complete(self, instance_index: int, request: RequestView) -> None:
        return None


def _argmin(instances: Sequence[InstanceView], key) -> int:
    """Index field of the instance with the smallest ``key`` (ties: fewer in flight, then the
    lower index, so results are deterministic)."""
    return min(instances, key=lambda v: (key(v), v.in_flight, v.index)).index


class RoundRobin(_Stateless):
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        # Cycle over worker indices; skip the ones filtered out (unhealthy) this time.
        indices = sorted(v.index for v in instances)
        choice = next((i for i in indices if i >= self._next), indices[0])
        self._next = choice + 1
        return choice


class Random(_Stateless):
    name = "random"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        return self._rng.choice(instances).index


class LeastRequests(_Stateless):
    """Fewest requests on the instance (running + waiting, including the router's pending)."""

    name = "least_requests"

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        return _argmin(instances, lambda v: v.running + v.waiting)


class LeastTokens(_Stateless):
    """Fewest tokens of work: KV held by running requests + prompt tokens still to prefill
    (SGLang's DP ``total_tokens`` balancing, from the stream)."""

    name = "least_tokens"

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        return _argmin(instances, lambda v: v.used_kv_tokens + v.queued_prefill_tokens)


class PowerOfTwo(_Stateless):
    """Two instances drawn at random; the one with fewer requests wins. (sglang-router's
    power_of_two polls ``/get_load``, which SGLang 0.5.23 answers with 404; this one takes load
    from the streams.)"""

    name = "power_of_two"

    def __init__(self, seed: int | None = None):
        self._rng = _random.Random(seed)

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        pair = self._rng.sample(list(instances), min(2, len(instances)))
        return _argmin(pair, lambda v: v.running + v.waiting)


class LMetric(_Stateless):
    """Prefill work it would wait behind × batch size: (queued uncached prompt tokens + this
    request's uncached tokens) × (running + waiting + 1). Cache-aware through the prefix."""

    name = "lmetric"
    needs_tokens = True

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        def score(v: InstanceView) -> float:
            new_tokens = max(request.input_len - v.cached_prefix_tokens, 1)
            return (v.queued_prefill_tokens + new_tokens) * (v.running + v.waiting + 1)
        return _argmin(instances, score)


class Llumnix(_Stateless):
    """Llumnix-style load: the most free KV per request (free KV tokens / (running + waiting +
    1)), i.e. the instance with the most memory headroom per request it serves."""

    name = "llumnix"

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        return _argmin(instances, lambda v: -v.free_kv_tokens / (v.running + v.waiting + 1))
