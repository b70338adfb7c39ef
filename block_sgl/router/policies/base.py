"""The tiny interfaces every routing policy implements (in the spirit of llm-d's scheduler
plugins): a policy sees one request and a list of candidate instances, already filtered to the
healthy ones, and returns the index of its pick. Policies are pure apart from the state they
own (a round-robin counter, a cache_aware tree); the router builds the views.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence


@dataclasses.dataclass(frozen=True)
class RequestView:
    """The request being routed, as the router sees it before dispatch."""

    rid: str
    text: str
    """The prompt as text (chat requests: rendered with the model's chat template)."""
    input_len: int
    """Prompt tokens (0 when the policy does not need tokens and the router skipped them)."""
    max_new_tokens: int
    pred_output_len: int
    """Predicted total output tokens (capped by ``max_new_tokens``)."""
    ignore_eos: bool = False


@dataclasses.dataclass(slots=True)
class InstanceView:
    """One candidate instance at decision time (built per decision; policies must not
    mutate it — it is not frozen only because frozen dataclasses are slow to build).

    Load figures combine the instance's latest snapshot with the router's own optimistic
    accounting of requests it dispatched that the snapshot does not show yet.
    """

    index: int
    """Position in the router's worker list (stable; what policies keep state by)."""
    url: str
    stale: bool = False
    """No fresh stream from this instance: its snapshot figures are old or missing."""
    in_flight: int = 0
    """Requests this router sent there that have not completed (router-local)."""
    running: int = 0
    """Running-batch size (snapshot + pending requests the snapshot does not show)."""
    waiting: int = 0
    """Waiting-queue length (snapshot + pending)."""
    queued_prefill_tokens: int = 0
    """Uncached prompt tokens of waiting + pending requests (prefill work still to do)."""
    used_kv_tokens: int = 0
    """KV tokens held by running requests (their prompts + outputs so far)."""
    free_kv_tokens: int = 0
    """KV tokens free or evictable."""
    max_total_tokens: int = 0
    cached_prefix_tokens: int = 0
    """Leading prompt tokens of THIS request already in the instance's radix cache."""
    predicted_ttft_s: float = float("nan")
    predicted_e2e_s: float = float("nan")
    """fastsim's prediction for this request here (NaN unless the policy asked for it)."""
    predicted_prefill_s: float = float("nan")
    """This request's own prefill step time here (its uncached tokens, the instance's step
    model), filled for policies with ``needs_prefill_cost``; NaN otherwise."""


class Policy(Protocol):
    name: str
    needs_tokens: bool
    """True: the router must tokenize the prompt (prefix matching, token counts)."""
    needs_prediction: bool
    """True: the router must fill predicted_ttft_s / predicted_e2e_s (runs fastsim).
    A policy may also set ``needs_prefill_cost = True`` to get predicted_prefill_s."""

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        """Return the ``index`` field of the chosen instance (``instances`` is non-empty)."""
        ...

    def on_complete(self, instance_index: int, request: RequestView) -> None:
        """Called once when a request dispatched by this policy finishes (any outcome)."""
        ...
