"""In-engine routing: block_sgl's policies inside SGLang's DataParallelController (``--dp-size N``).

``--block-dp-policy NAME`` (env ``BLOCK_SGL_DP_POLICY``) replaces the body of
``DataParallelController.total_tokens_scheduler`` (a REPLACE hook; ``from_cli_args`` sets
``--load-balance-method total_tokens`` so that SGLang dispatches through it). Per request:

1. ``routed_dp_rank`` set by the client: SGLang's own ``maybe_external_dp_rank_routing`` sends
   it there (as its schedulers do); block_sgl only records it as pending on that rank.
2. Otherwise the router's core (``block_sgl.router.core.Router``) decides over the ranks in
   ``_active_workers``: it subscribes to every rank's block_sgl stream (rank r publishes on
   ``BLOCK_SGL_PUBLISH`` port + r), matches ``req.input_ids`` against each rank's radix cache
   (page hashes), predicts the output length, runs fastsim for the predictive policies, and the
   policy picks a rank. Same policies and semantics as ``launch_router``, with two differences
   the controller imposes (``RouterConfig.completions_from_stream``): it never learns when a
   request finishes, so pending requests end when any snapshot shows them, "in flight" is
   running + waiting + pending from the stream, and the mean output length is learnt from
   requests leaving the snapshots; a pending request no snapshot showed expires after
   ``PENDING_TTL_S``.
3. Any exception inside block_sgl's part falls back to SGLang's own ``total_tokens`` dispatch for
   that request (logged once per kind, counted). The controller never crashes because of
   block_sgl; what SGLang itself raises (a bad ``routed_dp_rank``) is left as it is.

Observability: every decision at DEBUG level; an INFO line when routing starts and every
``LOG_EVERY`` decisions with the per-rank counts (``DPRouting.per_rank``) and fallbacks;
responses carry SGLang's ``meta_info.dp_rank``.
"""

from __future__ import annotations

import collections
import logging
import time

from block_sgl.hooks.flags import HookSettings

logger = logging.getLogger(__name__)

DPC_MODULE = "sglang.srt.managers.data_parallel_controller"
DPC = f"{DPC_MODULE}.DataParallelController"
HOOKED_METHOD = "total_tokens_scheduler"
LOG_EVERY = 100
REBUILD_AFTER_S = 10.0
"""After a failed start of the routing state, wait this long before trying again."""
PENDING_TTL_S = 5.0
"""A dispatched request no snapshot showed after this long came and went between two
snapshots (a rank picks up new requests at its next scheduling round, well under a second)."""
DEFAULT_MAX_NEW_TOKENS = 32768
"""Assumed when a request carries no max_new_tokens (SGLang then caps it by the context)."""


def rank_url(rank: int) -> str:
    """The synthetic worker URL of a DP rank in the controller's Router (never contacted)."""
    return f"http://dp-rank-{rank}.invalid:1"


def ids_as_text(token_ids) -> str:
    """The text cache_aware matches on when a request has no ``input_text``: one character per
    token id, so its character-level tree matches token prefixes."""
    return "".join(map(chr, token_ids)) if token_ids is not None else ""


def request_fields(req, default_max_new: int = DEFAULT_MAX_NEW_TOKENS):
    """(prompt text or None, token ids or None, max_new_tokens, ignore_eos) of a
    ``TokenizedGenerateReqInput`` (or embedding request: no sampling of new tokens)."""
    ids = getattr(req, "input_ids", None)
    if ids is not None and not isinstance(ids, list):
        ids = list(ids)  # array('i') / numpy → plain ints for hashing and fastsim
    text = getattr(req, "input_text", None)
    if not isinstance(text, str):
        text = None
    params = getattr(req, "sampling_params", None)
    max_new = getattr(params, "max_new_tokens", 0) if params is not None else 0
    if max_new is None:
        max_new = default_max_new
    ignore_eos = bool(getattr(params, "ignore_eos", False)) if params is not None else False
    return text, ids, int(max_new), ignore_eos


class DPRouting:
    """State of block_sgl's routing in one DataParallelController process."""

    def __init__(self, settings: HookSettings, *, router_factory=None, length_predictor=None,
                 clock=time.monotonic):
        self.settings = settings
        self.policy = settings.dp_policy
        self._router_factory = router_factory
        self._length_predictor = length_predictor
        self._clock = clock
        self.router = None
        self.per_rank: list[int] = []
        """Requests block_sgl's policy sent to each rank."""
        self.external = 0
        """Requests that named their rank (``routed_dp_rank``)."""
        self.fallbacks: collections.Counter = collections.Counter()
        """kind → requests dispatched by SGLang's total_tokens because block_sgl failed."""
        self.errors: collections.Counter = collections.Counter()
        """kind → failures after the request was sent (bookkeeping only)."""
        self._logged: set[str] = set()
        self._build_failed_at: float | None = None
        self._original = None
        self._send = None

    @property
    def decisions(self) -> int:
        return sum(self.per_rank)

    # -- routing state ------------------------------------------------------------------------
    def ensure_router(self, ctrl):
        """The Router over ``ctrl``'s DP ranks, built on first use (after a failure, again at
        most every ``REBUILD_AFTER_S``)."""
        if self.router is not None:
            return self.router
        now = self._clock()
        if self._build_failed_at is not None and now - self._build_failed_at < REBUILD_AFTER_S:
            raise RuntimeError("block_sgl DP routing state is not available (start failed)")
        try:
            self.router = self._build(len(ctrl.workers))
        except Exception:
            self._build_failed_at = now
            raise
        self.per_rank = [0] * len(self.router.workers)
        return self.router

    def _build(self, n_ranks: int):
        from block_sgl.hooks.scheduler import endpoints_for_rank
        from block_sgl.router.config import RouterConfig

        endpoints = tuple(endpoints_for_rank(self.settings.publish, r)[0] for r in range(n_ranks))
        config = RouterConfig(worker_urls=tuple(rank_url(r) for r in range(n_ranks)),
                              publish_endpoints=endpoints, policy=self.policy, seed=0,
                              completions_from_stream=True, pending_ttl_s=PENDING_TTL_S)
        predictor = self._length_predictor
        if predictor is None and self.settings.dp_length_model:
            from block_sgl.predictor.length import LengthPredictor

            predictor = self._length_predictor = LengthPredictor.load(self.settings.dp_length_model)
        if self._router_factory is not None:
            router = self._router_factory(config, predictor)
        else:
            from block_sgl.router.core import Router

            router = Router(config, length_predictor=predictor)
        router.attach_streams(list(endpoints))
        logger.info("block_sgl DP routing active: policy %s over %d DP ranks (streams %s)%s",
                    self.policy, n_ranks, ", ".join(endpoints),
                    " with length model " + self.settings.dp_length_model
                    if self.settings.dp_length_model else "")
        return router

    def close(self) -> None:
        if self.router is not None:
            self.router.close()

    # -- per request --------------------------------------------------------------------------
    def request_view(self, router, req, default_max_new: int = DEFAULT_MAX_NEW_TOKENS):
        from block_sgl.router.policies import RequestView

        text, ids, max_new, ignore_eos = request_fields(req, default_max_new)
        policy_text = text if text is not None else ids_as_text(ids)
        if text is None and router.length_predictor is not None:
            # The length model reads prompt text; without it: the hint or the running mean.
            n = len(ids) if ids is not None else 0
            pred = max_new if ignore_eos and router.config.use_ignore_eos_hint else \
                max(1, min(router.mean_output_len(), max_new))
            rv = RequestView(rid="", text=policy_text, input_len=n, max_new_tokens=max_new,
                             pred_output_len=max(pred, 1), ignore_eos=ignore_eos)
        else:
            rv = router.request_view(text=policy_text, token_ids=ids, max_new_tokens=max_new,
                                     ignore_eos=ignore_eos, prompt=text)
        return rv, ids

    @staticmethod
    def candidates(ctrl) -> list[int]:
        """The ranks SGLang would route to now: active, up, with a socket."""
        status = getattr(ctrl, "status", None)
        return [r for r in ctrl._active_workers
                if ctrl.workers[r] is not None and (status is None or status[r])]

    def decide(self, ctrl, req):
        router = self.ensure_router(ctrl)
        active = self.candidates(ctrl)
        if not active:
            raise RuntimeError("no active DP rank")
        exclude = frozenset(range(len(router.workers))).difference(active)
        rv, ids = self.request_view(router, req, getattr(ctrl, "max_req_input_len", None)
                                    or DEFAULT_MAX_NEW_TOKENS)
        decision = router.decide(rv, ids, exclude)
        if decision.worker not in active:  # a policy bug must not send to a dead rank
            raise RuntimeError(f"policy {self.policy} picked inactive rank {decision.worker}")
        return decision

    def dispatch(self, ctrl, req, original, send) -> None:
        """The body of ``total_tokens_scheduler``: ``original`` is SGLang's, ``send`` its
        ``sock_send``."""
        if ctrl.maybe_external_dp_rank_routing(req):
            self.external += 1
            self._note_external(ctrl, req)
            return
        try:
            decision = self.decide(ctrl, req)
        except Exception as e:
            self._fail(self.fallbacks, f"decide:{type(e).__name__}", e,
                       "falling back to SGLang's total_tokens dispatch")
            return original(ctrl, req)
        rank = decision.worker
        send(ctrl.workers[rank], req)
        try:
            self.router.dispatched(decision)
            self.router.remember_prefix(decision)
            self.per_rank[rank] += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("block_sgl DP %s: rid %s (%d tokens, %d cached there) -> rank %d; %s",
                             self.policy, getattr(req, "rid", "?"), decision.request.input_len,
                             decision.chosen.cached_prefix_tokens, rank, _views(decision.views))
            n = self.decisions
            if n % LOG_EVERY == 0:
                self.log_counts()
        except Exception as e:
            self._fail(self.errors, f"bookkeeping:{type(e).__name__}", e,
                       "the request was sent; its accounting is lost")

    def _note_external(self, ctrl, req) -> None:
        try:
            router = self.ensure_router(ctrl)
            rv, ids = self.request_view(router, req)
            decision = router.assign(rv, ids, int(req.routed_dp_rank))
            router.dispatched(decision)
            router.remember_prefix(decision)
        except Exception as e:
            self._fail(self.errors, f"external:{type(e).__name__}", e,
                       "the request was sent to its routed_dp_rank; its accounting is lost")

    def log_counts(self) -> None:
        logger.info("block_sgl DP routing (%s): %d decisions, per rank %s; routed_dp_rank %d; "
                    "fallbacks to total_tokens %d", self.policy, self.decisions, self.per_rank,
                    self.external, sum(self.fallbacks.values()))

    def _fail(self, counter, kind: str, error: Exception, consequence: str) -> None:
        counter[kind] += 1
        if kind not in self._logged:
            self._logged.add(kind)
            logger.error("block_sgl DP routing failed (%s; logged once per kind, counted): %s; %s",
                         kind, error, consequence, exc_info=error)

    # -- SGLang hooks -------------------------------------------------------------------------
    def hook(self, ctrl, req):
        """REPLACE hook of ``DataParallelController.total_tokens_scheduler``."""
        if self._original is None:
            self._original = original_method(type(ctrl))
            from sglang.srt.managers.io_struct import sock_send

            self._send = sock_send
        return self.dispatch(ctrl, req, self._original, self._send)

    def after_init(self, result, ctrl, *args, **kwargs):
        """AFTER hook of ``DataParallelController.__init__``: the ranks are up (their
        publishers bound): subscribe now rather than at the first request."""
        try:
            method = getattr(ctrl.load_balance_method, "name", str(ctrl.load_balance_method))
            if method != "TOTAL_TOKENS":
                logger.error("block_sgl DP policy %s is NOT active: the load balance method is %s "
                             "(block_sgl replaces total_tokens; launch_server sets it, the Python "
                             "Engine needs load_balance_method='total_tokens')",
                             self.policy, method.lower())
                return None
            if any(w is not None for w in ctrl.workers):
                self.ensure_router(ctrl)
        except Exception as e:
            self._fail(self.errors, f"start:{type(e).__name__}", e,
                       "will retry at the first request (meanwhile: SGLang's total_tokens)")
        return None


def _views(views) -> str:
    return "; ".join(f"rank {v.index}: run {v.running} wait {v.waiting} cached "
                     f"{v.cached_prefix_tokens} ttft {v.predicted_ttft_s:.4f} "
                     f"e2e {v.predicted_e2e_s:.4f}" for v in views)


def original_method(cls):
    """SGLang's own ``total_tokens_scheduler`` under the hook wrappers (each wrapper of
    ``HookRegistry`` keeps what it wraps in ``__wrapped__``; the original has none)."""
    fn = getattr(cls, HOOKED_METHOD)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def install(settings: HookSettings) -> DPRouting:
    """Register the DataParallelController hooks for this process."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    routing = DPRouting(settings)
    HookRegistry.register(f"{DPC}.{HOOKED_METHOD}", routing.hook, HookType.REPLACE)
    HookRegistry.register(f"{DPC}.__init__", routing.after_init, HookType.AFTER)
    return routing
