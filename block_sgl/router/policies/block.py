"""Block's policy: send the request where fastsim predicts it finishes first (``block``) or
gets its first token first (``block_ttft``). The router fills ``predicted_*`` in the views by
simulating each candidate instance's scheduler with the request added (``core.py``)."""

from __future__ import annotations

import math
from typing import Sequence

from block_sgl.router.policies.base import InstanceView, RequestView


class Block:
    name = "block"
    needs_tokens = True
    needs_prediction = True
    objective = "predicted_e2e_s"

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        def key(v: InstanceView):
            value = getattr(v, self.objective)
            # An instance fastsim could not score (NaN) ranks after every scored one.
            return (math.isnan(value), value if not math.isnan(value) else 0.0, v.in_flight,
                    v.index)
        return min(instances, key=key).index

    def on_complete(self, instance_index: int, request: RequestView) -> None:
        return None


class BlockTTFT(Block):
    name = "block_ttft"
    objective = "predicted_ttft_s"
