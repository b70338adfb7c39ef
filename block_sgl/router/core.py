"""The routing core: what the router knows about each instance and how it picks one.

Per request (``Router.decide``):
  prompt token ids → page-hash chain (SGLang's hashing, the instance's page size) → cached
  prefix per instance (radix-cache events + speculative entries for prompts just sent there)
  → predicted output length → each instance's view: its latest snapshot plus the requests
  this router dispatched that the snapshot does not show yet (``pending``) → fastsim for the
  predictive policies (every instance, or power-of-k) → the policy's pick.

Everything here runs on the event loop thread except the stream listeners (``_on_cache``,
``_on_steps``), which run in the subscriber thread and only touch thread-safe structures
(the prefix index has a lock; a calibrator's model is swapped by reference).
No I/O: the proxy (``proxy.py``) owns HTTP; this module is testable without a network.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import random
import time
from typing import Callable, Sequence

import numpy as np

from block_sgl import fastsim
from block_sgl._fastsim_py import step_time
from block_sgl import protocol as p
from block_sgl.page_hash import PromptPages
from block_sgl.predictor.perf_model import OnlineCalibrator, fit_profile, scaled
from block_sgl.predictor.step_model import DEFAULT_H100_LLAMA2_7B, StepModel
from block_sgl.router.config import RouterConfig
from block_sgl.router.lengths import OutputLengthStats
from block_sgl.router.policies import InstanceView, Policy, RequestView, make_policy
from block_sgl.router.prefix_index import PrefixIndex
from block_sgl.router.state import instance_config, instance_state, snapshot_age

logger = logging.getLogger("block_sgl.router")


@dataclasses.dataclass
class PendingRequest:
    """A request dispatched by this router that the instance's snapshot does not show yet."""

    key: int
    input_len: int
    prefix_len: int
    max_new_tokens: int
    ignore_eos: bool
    pred_output_len: int
    dispatched_at: float
    """time.time() at dispatch."""


@dataclasses.dataclass
class Worker:
    index: int
    url: str
    endpoint: str | None = None
    """Its block_sgl publish endpoint (None until discovered)."""
    healthy: bool = True
    """Circuit breaker closed: the instance gets new requests."""
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    in_flight: int = 0
    pending: dict = dataclasses.field(default_factory=dict)
    """key → PendingRequest."""
    rid_pred: dict = dataclasses.field(default_factory=dict)
    """SGLang rid → predicted output length, for this router's requests the snapshot shows."""
    seen_rids: frozenset = frozenset()
    speculative: dict = dataclasses.field(default_factory=dict)
    """page hash → expiry (time.monotonic())."""
    calibrator: OnlineCalibrator | None = None
    base_model: StepModel | None = None
    stream: object = None
    """Its ``ingest.InstanceState`` (the subscriber replaces the messages inside)."""
    _snapshot_seen: object = None
    arrivals: collections.deque = dataclasses.field(default_factory=collections.deque)
    """(rid, input_len, snapshot time) of requests new in a snapshot (``completions_from_stream``
    only; appended by the subscriber thread, consumed by the deciding thread)."""
    departures: collections.deque = dataclasses.field(default_factory=collections.deque)
    """(rid, last seen output length) of requests gone from the snapshots (same)."""
    _tracked: dict = dataclasses.field(default_factory=dict)
    """rid → output length (0 while waiting) in the last snapshot (subscriber thread only)."""
    _load: tuple = (0, 0, 0, 0, 0, 0)
    """Figures of the last snapshot: running, waiting, queued prefill, used KV, free KV, total."""
    _pending_queued: int = 0
    _pending_table: object = None
    """Kernel layout of ``pending`` (``fastsim.RequestTable.packed_rows``); None: rebuild."""
    _pending_times: tuple | None = None
    """(snapshot, pending table, when each pending request reached the instance after the
    snapshot: float64, non-decreasing)."""
    _fscal: tuple | None = None
    """(base state, a copy of its fscal whose elapsed_s each decision overwrites)."""
    _oldest_pending: float = 0.0
    _state_cache: tuple | None = None
    """(snapshot, fastsim.InstanceState without pending, hello)."""
    _config: tuple | None = None
    """(hello, its fastsim.InstanceConfig)."""
    _coeffs: tuple | None = None

    @property
    def step_model(self) -> StepModel:
        if self.calibrator is not None and self.calibrator.model is not None:
            return self.calibrator.model
        return self.base_model or DEFAULT_H100_LLAMA2_7B

    def coeff_array(self) -> np.ndarray:
        model = self.step_model
        if self._coeffs is None or self._coeffs[0] is not model:
            self._coeffs = (model, np.ascontiguousarray(model.as_array(), dtype=np.float64))
        return self._coeffs[1]


@dataclasses.dataclass
class Decision:
    worker: int
    request: RequestView
    views: list[InstanceView]
    chosen: InstanceView
    pages: PromptPages | None
    """The prompt's page hashes at the chosen instance's page size (lazy)."""
    page_size: int
    decided_in_s: float
    key: int = 0


class NoInstanceAvailable(RuntimeError):
    """Every instance is out of rotation (failed health checks or excluded by retries)."""


def prefill_step_s(coeffs, input_len: int, cached_prefix_tokens: int) -> float:
    """The step time of prefilling one request alone: its uncached tokens (SGLang recomputes
    at least one: a fully cached prompt still prefills its last token) attending to the cached
    prefix and causally to each other — the step model's form (``predictor/step_model.py``)
    with the pair count fastsim uses for an extend."""
    extend = max(input_len - cached_prefix_tokens, 1)
    prefix = max(input_len - extend, 0)
    return step_time(coeffs, extend, extend * (prefix + (extend + 1) / 2.0), 0, 0)


_SCALAR_QUEUE_MAX = 16
"""Queues up to this long get their predicted lengths request by request (numpy's fixed
cost per call outweighs its per-element speed below it)."""


class Router:
    """Routing state shared by one router replica's request handlers."""

    def __init__(self, config: RouterConfig, *, length_predictor=None,
                 subscriber_factory: Callable | None = None, clock=time.time):
        self.config = config
        self.policy: Policy = make_policy(config.policy, seed=config.seed,
                                          cache_aware=dataclasses.asdict(config.cache_aware))
        self.length_predictor = length_predictor
        self.prefix_index = PrefixIndex()
        self.workers = [Worker(i, url.rstrip("/")) for i, url in enumerate(config.worker_urls)]
        self._rng = random.Random(config.seed)
        self._keys = itertools.count(1)
        self._clock = clock
        self._by_endpoint: dict[str, Worker] = {}
        self.subscriber = None
        self._subscriber_factory = subscriber_factory
        self._workspace = fastsim.new_workspace()
        self._buffers: dict[int, tuple] = {}  # K -> _candidate_buffers (decisions run on one thread)
        self._profile_models: dict[tuple, StepModel] = {}
        self.completed_output_tokens = 0
        self.completed_requests = 0
        self.output_lengths = OutputLengthStats()
        """Recent completions' output lengths: running requests' expected totals."""
        self.stats = {"pending_expired": 0, "pending_matched": 0}

    # -- streams ------------------------------------------------------------------------------
    def attach_streams(self, endpoints: Sequence[str]) -> None:
        """Subscribe to every instance's block_sgl stream (one endpoint per worker)."""
        from block_sgl.router.ingest import StreamSubscriber

        if len(endpoints) != len(self.workers):
            raise ValueError(f"{len(endpoints)} endpoints for {len(self.workers)} workers")
        for w, e in zip(self.workers, endpoints):
            w.endpoint = e
            w.calibrator = OnlineCalibrator(
                min_refit_interval_s=self.config.calibration_refit_interval_s)
            self._by_endpoint[e] = w
        factory = self._subscriber_factory or StreamSubscriber
        extra = {"on_snapshot": self._on_snapshot} if self.config.completions_from_stream else {}
        self.subscriber = factory(list(endpoints), stale_after_s=self.config.stale_after_s,
                                  on_cache_event=self._on_cache, on_steps=self._on_steps, **extra)
        for w in self.workers:
            w.stream = self.subscriber.states[w.endpoint]
        self.subscriber.start()

    def close(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()

    def _on_cache(self, endpoint: str, message) -> None:
        self.prefix_index.apply(endpoint, message)

    def _on_steps(self, endpoint: str, records: p.StepRecords) -> None:
        worker = self._by_endpoint.get(endpoint)
        if worker is None or worker.calibrator is None:
            return
        for i in range(len(records.duration_s)):
            worker.calibrator.observe(records.extend_tokens[i], records.prefill_context_tokens[i],
                                      records.decode_reqs[i], records.decode_context_tokens[i],
                                      records.duration_s[i])

    def _on_snapshot(self, endpoint: str, snap: p.Snapshot) -> None:
        """Every snapshot of an instance (``completions_from_stream``): note the requests that
        appeared and those that left since the previous one."""
        worker = self._by_endpoint.get(endpoint)
        if worker is None:
            return
        try:
            current = dict.fromkeys(snap.waiting.rid, 0)
            current.update(dict.fromkeys(snap.chunked.rid, 0))
            current.update(zip(snap.running.rid, snap.running.output_len))
            before = worker._tracked
            for cols in (snap.running, snap.waiting, snap.chunked):
                for rid, n in zip(cols.rid, cols.input_len):
                    if rid not in before:
                        worker.arrivals.append((rid, n, snap.time))
            for rid in before.keys() - current.keys():
                worker.departures.append((rid, before[rid]))
            worker._tracked = current
        except Exception:  # never stop the subscriber thread (every stream depends on it)
            errors = self.stats["snapshot_listener_errors"] = \
                self.stats.get("snapshot_listener_errors", 0) + 1
            if errors == 1:
                logger.exception("following requests in %s's snapshot failed", endpoint)

    def stream_state(self, worker: Worker):
        return worker.stream

    def is_stale(self, worker: Worker) -> bool:
        state = worker.stream
        return state is None or state.is_stale(self.config.stale_after_s)

    # -- output lengths -----------------------------------------------------------------------
    def mean_output_len(self) -> int:
        if self.completed_requests == 0:
            return self.config.default_output_len
        return max(1, round(self.completed_output_tokens / self.completed_requests))

    def predict_output_len(self, prompt, input_len: int, max_new_tokens: int,
                           ignore_eos: bool) -> int:
        if ignore_eos and self.config.use_ignore_eos_hint:
            return max_new_tokens
        if self.length_predictor is not None:
            p50, p_upper = self.length_predictor.predict(prompt, input_len)
            if self.config.length_estimate == "mean":
                p50 = self.length_predictor.expected_tokens(p50, p_upper)
            guess = int(round(p50))
        else:
            guess = self.mean_output_len()
        return max(1, min(guess, max_new_tokens))

    def _snapshot_output_len(self, worker: Worker):
        """Total output length of each request in a snapshot, for fastsim. A request whose
        length is known (the ignore_eos hint) keeps it; one with a length-model prediction it
        has not reached yet keeps that; otherwise — no model, or it outlived its prediction —
        the mean total of recent completions that outlived what it has generated so far
        (``lengths.OutputLengthStats``: without this, fastsim would expect a survivor of a
        heavy-tailed length distribution to finish on its next step). Per request, in order:

        1. ``ignore_eos`` (and ``use_ignore_eos_hint``) → ``max_new_tokens``;
        2. a prediction of this router's (``rid_pred``), with a length model, not yet reached →
           that prediction;
        3. nothing completed yet → that prediction if any, else min(mean, ``max_new_tokens``);
        4. else max(1, min(round(E[L | L > generated]), ``max_new_tokens``)).

        A busy instance sends a new snapshot every ~10 ms, so this runs for most instances at
        most decisions: short queues go request by request (0.4–2 µs each on this VM,
        depending on its phase), longer ones in one numpy pass (20–40 µs of fixed cost, then
        ≈ 0.2 µs per request; measured crossover 16–32 requests)."""
        mean = self.mean_output_len()
        hint = self.config.use_ignore_eos_hint
        model = self.length_predictor is not None
        stats = self.output_lengths
        expected_total = stats.expected_total
        rid_pred = worker.rid_pred

        def one(rid: str, generated: int, max_new_tokens: int, ignore_eos: bool) -> int:
            if ignore_eos and hint:
                return max_new_tokens
            known = rid_pred.get(rid)
            if known is not None and model and generated < known:
                return known
            expected = expected_total(generated)
            if expected is None:  # nothing completed yet
                return known if known is not None else min(mean, max_new_tokens)
            return max(1, min(round(expected), max_new_tokens))

        def predict(cols: p.RequestColumns):
            if len(cols.rid) <= _SCALAR_QUEUE_MAX:
                return [one(*r) for r in zip(cols.rid, cols.output_len, cols.max_new_tokens,
                                             cols.ignore_eos)]
            generated = np.asarray(cols.output_len, dtype=np.int64)
            max_new = np.asarray(cols.max_new_tokens, dtype=np.int64)
            expected = stats.expected_totals(generated)
            if expected is None:  # nothing completed yet
                out = np.minimum(mean, max_new)
            else:
                out = np.maximum(1, np.minimum(np.round(expected), max_new)).astype(np.int64)
            if rid_pred:
                for i, rid in enumerate(cols.rid):
                    known = rid_pred.get(rid)
                    if known is not None and ((model and generated[i] < known)
                                              or expected is None):
                        out[i] = known
            if hint:
                eos = np.asarray(cols.ignore_eos, dtype=bool)
                out = np.where(eos, max_new, out)
            return out
        return predict

    # -- per-worker view ----------------------------------------------------------------------
    def _sync_snapshot(self, worker: Worker, now: float) -> p.Snapshot | None:
        """On a new snapshot: match pending requests against it (a request the snapshot shows
        is no longer pending; matched by prompt length among the rids new in this snapshot)
        and recompute the snapshot's load figures once."""
        state = worker.stream
        snap = state.snapshot if state is not None else None
        if snap is not None and snap is not worker._snapshot_seen:
            worker._snapshot_seen = snap
            rids = {}
            for cols in (snap.running, snap.waiting, snap.chunked):
                rids.update(zip(cols.rid, cols.input_len))
            current = frozenset(rids)
            if not self.config.completions_from_stream:
                for rid in current - worker.seen_rids:
                    self._match_pending(worker, rid, rids[rid], snap.time)
            for rid in worker.seen_rids - current:
                worker.rid_pred.pop(rid, None)
            worker.seen_rids = current
            r, w, c = snap.running, snap.waiting, snap.chunked
            queued = sum(w.input_len) - sum(w.prefix_len)
            if len(c):
                queued += c.input_len[0] - snap.chunked_done_tokens
            worker._load = (len(r), len(w) + len(c), max(queued, 0),
                            sum(r.input_len) + sum(r.output_len),
                            snap.free_tokens + snap.evictable_tokens, snap.max_total_num_tokens)
        if self.config.completions_from_stream:
            self._follow_requests(worker)
        if worker.pending and now - worker._oldest_pending > self.config.pending_ttl_s:
            ttl = self.config.pending_ttl_s
            for k in [k for k, r in worker.pending.items() if now - r.dispatched_at > ttl]:
                self._unpend(worker, k)
                self.stats["pending_expired"] += 1
            worker._oldest_pending = min((r.dispatched_at for r in worker.pending.values()),
                                         default=now)
        return snap

    def _match_pending(self, worker: Worker, rid: str, input_len: int, seen_at: float) -> None:
        """A request new on the instance ends the pending request it most likely is (same
        prompt length, dispatched before the snapshot)."""
        match = next((k for k, r in worker.pending.items()
                      if r.input_len == input_len and r.dispatched_at <= seen_at), None)
        if match is not None:
            worker.rid_pred[rid] = self._unpend(worker, match).pred_output_len
            self.stats["pending_matched"] += 1

    def _follow_requests(self, worker: Worker) -> None:
        """``completions_from_stream``: arrivals and departures from every snapshot since the
        last decision (a request may come and go between two decisions)."""
        arrivals, departures = worker.arrivals, worker.departures
        while arrivals:
            rid, input_len, seen_at = arrivals.popleft()
            self._match_pending(worker, rid, input_len, seen_at)
        while departures:
            rid, output_len = departures.popleft()
            worker.rid_pred.pop(rid, None)
            if output_len > 0:  # its last seen length: a few tokens short at most
                self.completed_requests += 1
                self.completed_output_tokens += output_len
                self.output_lengths.add(output_len)

    @staticmethod
    def _unpend(worker: Worker, key: int) -> PendingRequest:
        r = worker.pending.pop(key)
        worker._pending_queued -= r.input_len - r.prefix_len
        worker._pending_table = None
        return r

    def _fastsim_arrays(self, worker: Worker, snap: p.Snapshot | None, stale: bool,
                        now: float):
        """The instance as fastsim's kernel takes it (``InstanceState.arrays``): the last
        snapshot's state (cached per snapshot) plus this router's pending requests."""
        hello = worker.stream.hello if worker.stream is not None else None
        if hello is None:
            return None
        key = None if stale else snap
        if worker._state_cache is not None and worker._state_cache[0] is key \
                and worker._state_cache[2] is hello:
            base = worker._state_cache[1]
        else:
            if worker._config is None or worker._config[0] is not hello:
                worker._config = (hello, instance_config(hello))
            cfg = worker._config[1]
            if stale or snap is None:
                # Stale stream: only what this router sent there is known (assume no other
                # traffic; documented in README "stale instances").
                base = fastsim.InstanceState(cfg, fastsim.RequestTable.empty(),
                                             fastsim.RequestTable.empty(),
                                             free_kv_tokens=hello.max_total_num_tokens)
            else:
                base = instance_state(cfg, snap, self._snapshot_output_len(worker), now)
            worker._state_cache = (key, base, hello)
        if worker.base_model is None:
            worker.base_model = self._profile_model(hello)
        # fastsim replays from the snapshot: the candidate arrives ``elapsed`` after it, each
        # pending request when this router dispatched it (in transit at the snapshot: at it).
        a = base.arrays
        if key is None:  # no replay: nothing known happened since
            if not worker.pending:
                return a
            return base.arrays_with_pending(self._pending_table(worker))
        if worker._fscal is None or worker._fscal[0] is not base:
            worker._fscal = (base, base.fscal.copy())  # one buffer, no allocation per decision
        fscal = worker._fscal[1]
        fscal[fastsim.FSCAL_ELAPSED] = snapshot_age(snap, now)  # read by this decision's kernel
        if not worker.pending:
            return (a[0], a[1], a[2], a[3], fscal)
        pending = self._pending_table(worker)
        cached = worker._pending_times
        if cached is None or cached[0] is not snap or cached[1] is not pending:
            since = np.fromiter((r.dispatched_at for r in worker.pending.values()),
                                dtype=np.float64, count=len(worker.pending)) - snap.time
            np.maximum.accumulate(np.maximum(since, 0.0, out=since), out=since)
            cached = worker._pending_times = (snap, pending, since)
        return (a[0], a[1], pending, a[3], fscal, None, None, cached[2])

    @staticmethod
    def _pending_table(worker: Worker) -> np.ndarray:
        if worker._pending_table is None:
            rows = [(r.input_len, r.prefix_len, 0, r.max_new_tokens, int(r.ignore_eos),
                     r.pred_output_len) for r in worker.pending.values()]
            worker._pending_table = fastsim.RequestTable.packed_rows(rows)
        return worker._pending_table

    def _profile_model(self, hello: p.Hello) -> StepModel:
        """The step model before the instance's own step records calibrate it: its emulated
        hardware profile (at its time scale), else the H100 default."""
        key = (hello.hardware_profile, hello.time_scale)
        if key not in self._profile_models:
            try:
                model = fit_profile(hello.hardware_profile, time_scale=hello.time_scale) \
                    if hello.hardware_profile else DEFAULT_H100_LLAMA2_7B
            except (KeyError, ValueError):
                model = DEFAULT_H100_LLAMA2_7B
            self._profile_models[key] = model
        return self._profile_models[key]

    def _page_size(self, worker: Worker) -> int | None:
        st = worker.stream
        return st.hello.page_size if st is not None and st.hello is not None else None

    def view(self, worker: Worker, request: RequestView, hashes_by_size: dict, now: float,
             now_mono: float) -> tuple[InstanceView, object]:
        return self.views([worker], request, hashes_by_size, now, now_mono)[0]

    def views(self, workers: list[Worker], request: RequestView, hashes_by_size: dict,
              now: float, now_mono: float) -> list[tuple[InstanceView, object]]:
        """(InstanceView, snapshot) per worker. One loop with the per-worker steps inlined:
        this runs for every instance on every decision (``benchmarks/micro/bench_router.py``)."""
        stale_after = self.config.stale_after_s
        from_stream = self.config.completions_from_stream
        input_len = request.input_len
        max_cached = max(input_len - 1, 0)
        index = self.prefix_index
        out = []
        for worker in workers:
            st = worker.stream
            stale = st is None or st.snapshot is None \
                or now_mono - st.last_message_at > stale_after
            snap = self._sync_snapshot(worker, now)
            hello = st.hello if st is not None else None
            if snap is not None and not stale:
                running, waiting, queued, used, free, total = worker._load
            else:
                running = waiting = queued = used = 0
                total = free = hello.max_total_num_tokens if hello is not None else 0
            cached = 0
            if input_len and hello is not None:
                hashes = hashes_by_size.get(hello.page_size)
                if hashes is not None:  # the longest run of leading pages held or just sent
                    matched = index.matched_pages(worker.endpoint, hashes) \
                        if worker.endpoint else 0
                    if worker.speculative:
                        matched = max(matched, hashes.leading_unexpired(worker.speculative,
                                                                        now_mono))
                    cached = min(matched * hello.page_size, max_cached)
            pending = len(worker.pending)
            out.append((InstanceView(
                worker.index, worker.url, stale,
                running + waiting + pending if from_stream else worker.in_flight, running,
                waiting + pending, queued + worker._pending_queued, used, free, total, cached),
                snap))
        return out

    # -- decision -----------------------------------------------------------------------------
    def request_view(self, *, text: str, token_ids: list[int] | None, max_new_tokens: int,
                     ignore_eos: bool, prompt=None) -> RequestView:
        n = len(token_ids) if token_ids is not None else 0
        pred = self.predict_output_len(prompt if prompt is not None else text, n, max_new_tokens,
                                       ignore_eos)
        return RequestView(rid="", text=text, input_len=n, max_new_tokens=max_new_tokens,
                           pred_output_len=pred, ignore_eos=ignore_eos)

    def decide(self, request: RequestView, token_ids: list[int] | None,
               exclude: frozenset[int] = frozenset()) -> Decision:
        started = time.perf_counter()
        now, now_mono = self._clock(), time.monotonic()
        candidates = [w for w in self.workers if w.healthy and w.index not in exclude]
        if not candidates:
            raise NoInstanceAvailable(
                "no SGLang instance is available: " + "; ".join(
                    f"{w.url}: {w.last_error or 'excluded after a failure'}" for w in self.workers))
        hashes_by_size: dict[int, PromptPages] = {}
        if token_ids and self.policy.needs_tokens:
            for w in candidates:
                size = self._page_size(w)
                if size and size not in hashes_by_size:
                    hashes_by_size[size] = PromptPages(token_ids, size)
        pairs = self.views(candidates, request, hashes_by_size, now, now_mono)
        views = [v for v, _ in pairs]
        if self.policy.needs_prediction:
            views = self._predict(request, candidates, pairs, now)
        choice = self.policy.pick(request, views)
        chosen = next(v for v in views if v.index == choice)
        size = self._page_size(self.workers[choice]) or 0
        return Decision(worker=choice, request=request, views=views, chosen=chosen,
                        pages=hashes_by_size.get(size), page_size=size,
                        decided_in_s=time.perf_counter() - started)

    def assign(self, request: RequestView, token_ids: list[int] | None, index: int) -> Decision:
        """A Decision for a request whose instance was chosen elsewhere (no policy involved,
        e.g. SGLang's ``routed_dp_rank``), so that ``dispatched`` / ``remember_prefix`` account
        for it like for the router's own picks."""
        started = time.perf_counter()
        w = self.workers[index]
        size = self._page_size(w)
        hashes_by_size = {size: PromptPages(token_ids, size)} if token_ids and size else {}
        v, _ = self.view(w, request, hashes_by_size, self._clock(), time.monotonic())
        return Decision(worker=index, request=request, views=[v], chosen=v,
                        pages=hashes_by_size.get(size), page_size=size or 0,
                        decided_in_s=time.perf_counter() - started)

    def _predict(self, request: RequestView, workers: list[Worker], pairs, now: float):
        """Fill predicted TTFT / E2E into the views (all instances, or power-of-k ones)."""
        k = self.config.power_of_k
        chosen = range(len(workers))
        if k and k < len(workers):
            best_prefix = max(range(len(workers)), key=lambda i: pairs[i][0].cached_prefix_tokens)
            chosen = sorted(set(self._rng.sample(range(len(workers)), k)) | {best_prefix})
        arrays, coeffs, scored = [], [], []
        for i in chosen:
            w, (v, snap) = workers[i], pairs[i]
            state_arrays = self._fastsim_arrays(w, snap, v.stale, now)
            if state_arrays is None:
                continue
            arrays.append(state_arrays)
            coeffs.append(w.coeff_array())
            scored.append(v)
        views = [pairs[i][0] for i in chosen]
        if not arrays:
            return views
        cands, rows, out = self._candidate_buffers(len(scored))
        cands[:, 0] = request.input_len
        cands[:, 1] = [v.cached_prefix_tokens for v in scored]
        cands[:, 2] = request.pred_output_len
        cands[:, 3] = request.max_new_tokens
        cands[:, 4] = int(request.ignore_eos)
        fastsim.predict_rows(arrays, rows, coeffs, out, self._workspace)
        for v, (ttft, e2e, _) in zip(scored, out.tolist()):
            v.predicted_ttft_s, v.predicted_e2e_s = ttft, e2e
        if getattr(self.policy, "needs_prefill_cost", False):
            for v, c in zip(scored, coeffs):
                v.predicted_prefill_s = prefill_step_s(c, request.input_len,
                                                       v.cached_prefix_tokens)
        return views

    def _candidate_buffers(self, k: int) -> tuple[np.ndarray, list, np.ndarray]:
        """Reused per K: the (K, 5) candidate array, its rows as views (the kernel's input:
        making K row objects per decision cost ~4 µs at K = 16) and the (K, 3) output."""
        buffers = self._buffers.get(k)
        if buffers is None:
            cands = np.zeros((k, 5), dtype=np.int64)
            buffers = self._buffers[k] = (cands, list(cands), np.empty((k, 3)))
        return buffers

    # -- bookkeeping --------------------------------------------------------------------------
    def dispatched(self, decision: Decision) -> int:
        """Record that the request went to ``decision.worker``; returns its pending key."""
        w = self.workers[decision.worker]
        w.in_flight += 1
        key = next(self._keys)
        r = decision.request
        if not w.pending:
            w._oldest_pending = self._clock()
        pending = PendingRequest(key, r.input_len, decision.chosen.cached_prefix_tokens,
                                 r.max_new_tokens, r.ignore_eos, r.pred_output_len, self._clock())
        w.pending[key] = pending
        w._pending_queued += pending.input_len - pending.prefix_len
        w._pending_table = None
        decision.key = key
        return key

    def remember_prefix(self, decision: Decision) -> None:
        """Count the dispatched prompt's pages as cached on its instance until the TTL (the
        instance's cache events confirm them later). Hashes the whole prompt: the proxy calls
        this once the request is on its way, off the decision's critical path."""
        w = self.workers[decision.worker]
        if decision.pages is not None and len(decision.pages):
            expiry = time.monotonic() + self.config.speculative_prefix_ttl_s
            for h in decision.pages.all():
                w.speculative[h] = expiry
            if len(w.speculative) > 200_000:
                now = time.monotonic()
                w.speculative = {h: e for h, e in w.speculative.items() if e >= now}

    def finished(self, decision: Decision, output_tokens: int | None) -> None:
        """The request ended (any outcome). ``output_tokens``: completion tokens when known."""
        w = self.workers[decision.worker]
        w.in_flight = max(0, w.in_flight - 1)
        if decision.key in w.pending:
            self._unpend(w, decision.key)
        if output_tokens is not None and output_tokens > 0:
            self.completed_requests += 1
            self.completed_output_tokens += output_tokens
            self.output_lengths.add(output_tokens)
        try:
            self.policy.on_complete(decision.worker, decision.request)
        except Exception:  # a policy bug must not leak in-flight counts
            logger.exception("policy %s on_complete failed", self.policy.name)

    # -- health -------------------------------------------------------------------------------
    def mark_failure(self, index: int, error: str, *, immediate: bool = False) -> bool:
        """Count a failed check/request; returns True if this took the instance out."""
        w = self.workers[index]
        w.consecutive_failures += 1
        w.consecutive_successes = 0
        w.last_error = error
        if w.healthy and (immediate or w.consecutive_failures >= self.config.health.failures_to_open):
            w.healthy = False
            logger.warning("instance %s out of rotation: %s", w.url, error)
            return True
        return False

    def mark_success(self, index: int) -> bool:
        """Count a passed check; returns True if this put the instance back."""
        w = self.workers[index]
        w.consecutive_failures = 0
        w.consecutive_successes += 1
        if not w.healthy and w.consecutive_successes >= self.config.health.successes_to_close:
            w.healthy = True
            w.last_error = None
            logger.warning("instance %s back in rotation", w.url)
            return True
        return False

    # -- provisioning -------------------------------------------------------------------------
    def provisioning(self) -> dict:
        """Predicted headroom and a scale recommendation (``GET /block/provisioning``).

        Probe: a typical request (mean prompt of recent decisions is not tracked; a 512-token
        prompt with the mean output) is simulated on every healthy instance; utilisation is KV
        in use / capacity. Recommendation: ``scale_out`` when even the best instance's predicted
        TTFT exceeds the SLO (or, without an SLO, every instance is above 85 % KV use or has a
        queue); ``scale_in`` when more than one instance is healthy and all are below 30 % KV
        use with empty queues; else ``hold``.
        """
        now, now_mono = self._clock(), time.monotonic()
        probe = RequestView(rid="probe", text="", input_len=512, max_new_tokens=4096,
                            pred_output_len=self.mean_output_len())
        healthy = [w for w in self.workers if w.healthy]
        rows = []
        pairs = [self.view(w, probe, {}, now, now_mono) for w in healthy]
        views = self._predict(probe, healthy, pairs, now) if healthy else []
        for v in views:
            util = (1 - v.free_kv_tokens / v.max_total_tokens) if v.max_total_tokens else float("nan")
            rows.append({"url": v.url, "stale": v.stale, "running": v.running,
                         "waiting": v.waiting, "kv_utilisation": util,
                         "predicted_probe_ttft_s": v.predicted_ttft_s,
                         "predicted_probe_e2e_s": v.predicted_e2e_s})
        slo = self.config.slo_ttft_ms / 1e3 if self.config.slo_ttft_ms else None
        ttfts = [r["predicted_probe_ttft_s"] for r in rows if not math.isnan(r["predicted_probe_ttft_s"])]
        utils = [r["kv_utilisation"] for r in rows if not math.isnan(r["kv_utilisation"])]
        best = min(ttfts) if ttfts else float("nan")
        if not healthy:
            rec = "scale_out"
        elif slo is not None and ttfts and best > slo:
            rec = "scale_out"
        elif utils and all(u > 0.85 or r["waiting"] > 0 for u, r in zip(utils, rows)) and (
                slo is None or not ttfts):
            rec = "scale_out"
        elif len(healthy) > 1 and utils and all(u < 0.3 for u in utils) and all(
                r["waiting"] == 0 for r in rows):
            rec = "scale_in"
        else:
            rec = "hold"
        headroom = (1 - best / slo) if slo is not None and ttfts else (
            1 - float(np.mean(utils)) if utils else float("nan"))
        return {"instances": rows, "healthy": len(healthy), "total": len(self.workers),
                "slo_ttft_s": slo, "best_probe_ttft_s": best, "headroom": headroom,
                "recommendation": rec}
