"""Block's policy: send the request where fastsim predicts it finishes first (``block``) or
gets its first token first (``block_ttft``). The router fills ``predicted_*`` in the views by
simulating each candidate instance's scheduler with the request added (``core.py``)."""

from __future__ import annotations

import operator
from typing import Sequence

from block_sgl.router.policies.base import InstanceView, RequestView


class Block:
    name = "block"
    needs_tokens = True
    needs_prediction = True
    objective = "predicted_e2e_s"

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        objective = operator.attrgetter(self.objective)
        # Smallest objective, then fewest in flight, then lowest index; an instance fastsim
        # could not score (NaN: x != x) ranks after every scored one. One tuple per instance
        # in a comprehension (a key function cost ~1.4 µs per instance here).
        return min([(x != x, x if x == x else 0.0, v.in_flight, v.index)
                    for v in instances for x in (objective(v),)])[3]

    def on_complete(self, instance_index: int, request: RequestView) -> None:
        return None


class BlockTTFT(Block):
    name = "block_ttft"
    objective = "predicted_ttft_s"
