"""Routing policies, chosen by name (``--policy``). See README.md in this folder."""

from __future__ import annotations

from block_sgl.router.policies.base import InstanceView, Policy, RequestView
from block_sgl.router.policies.block import Block, BlockMarginal, BlockTTFT
from block_sgl.router.policies.simple import (LeastRequests, LeastTokens, Llumnix, LMetric,
                                              PowerOfTwo, Random, RoundRobin)

_SIMPLE = {cls.name: cls for cls in (RoundRobin, Random, LeastRequests, LeastTokens, PowerOfTwo,
                                     LMetric, Llumnix, Block, BlockTTFT, BlockMarginal)}
POLICY_NAMES = tuple(sorted([*_SIMPLE, "cache_aware"]))
PREDICTIVE_POLICIES = tuple(sorted(n for n, cls in _SIMPLE.items() if cls.needs_prediction))
"""Policies that run fastsim (what --slo-ttft-ms, --power-of-k and /block/provisioning need)."""


def make_policy(name: str, *, seed: int | None = None, cache_aware: dict | None = None) -> Policy:
    """A fresh policy object. ``cache_aware``: keyword arguments of ``CacheAwarePolicy``."""
    if name == "cache_aware":
        from block_sgl.router.policies.cache_aware import CacheAwarePolicy

        return CacheAwarePolicy(**(cache_aware or {}))
    if name not in _SIMPLE:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(POLICY_NAMES)}")
    cls = _SIMPLE[name]
    return cls(seed=seed) if cls in (Random, PowerOfTwo) else cls()


__all__ = ["InstanceView", "Policy", "RequestView", "POLICY_NAMES", "PREDICTIVE_POLICIES",
           "make_policy"]
