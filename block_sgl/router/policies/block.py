"""Block's policies. ``block``: send the request where fastsim predicts it finishes first;
``block_ttft``: where it gets its first token first. Both are selfish: they price only the new
request's own latency. ``block_marginal`` adds what the request costs the others on that
instance — its prefill step delays every request running or queued there — so a cache hit,
which shortens that step, is worth more on a busy instance than on an idle one.

The router fills ``predicted_*`` in the views by simulating each candidate instance's
scheduler with the request added (``core.py``)."""

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


class BlockMarginal(Block):
    """Minimise predicted E2E + (the request's own prefill step time on that instance) ×
    (requests running or waiting there).

    Why: with the selfish objective a cache miss on an idle-ish instance often wins over a
    hit on a busier one (the miss's extra ~tens of ms of prefill are cheaper than the queue),
    yet that prefill stalls every request on the instance for its duration — the cost the
    selfish objective does not see. In SGLang a prefill batch runs as its own step (no mixed
    chunking by default: ``Scheduler.get_next_batch_to_run`` in ``managers/scheduler.py``),
    so each running request's next token waits for it, and the requests queued ahead of the
    candidate are running by the time its prefill is scheduled. Approximations: the step is
    priced as if the candidate prefilled alone (batched with others it shares the constant
    part), and requests that finish before it is scheduled are counted.
    """

    name = "block_marginal"
    needs_prefill_cost = True

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        return min([(x != x, x if x == x else 0.0, v.in_flight, v.index) for v in instances
                    for x in (v.predicted_e2e_s
                              + v.predicted_prefill_s * (v.running + v.waiting),)])[3]
