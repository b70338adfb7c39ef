"""Hooks in SGLang's scheduler that stream its state (``block_sgl.protocol``) to subscribers.

Hook targets (``sglang/srt/managers/scheduler.py``, class ``Scheduler``):
* ``__init__`` AFTER: on the publishing rank (pp / attn-tp / attn-cp rank 0) bind the publisher
  at the configured port + DP rank and send Hello;
* ``run_batch`` BEFORE: remember when the step started;
* ``process_batch_result`` AFTER: a StepRecord for the step (batched), and a Snapshot at most
  every ``snapshot_interval_ms``. A step's duration is its cadence: from the end of the
  previous step (back to back) or from ``run_batch`` (after idle) to the end of this one — what
  a busy instance really spends per step, scheduler CPU work included, and what fastsim sums;
* ``on_idle`` AFTER: a Heartbeat and a Snapshot every ``heartbeat_interval_ms``.
Radix-cache events come through SGLang's own KV-event path: block_sgl registers an
``EventPublisher`` named ``block_sgl`` and sets ``--kv-events-config`` to it, so cache events enter
the same ordered stream.

Nothing here may hurt the scheduler: every hook body catches its exceptions (counted, logged once
per kind), and publishing is a non-blocking queue put.

What runs where (costs: ``benchmarks/micro/README_hooks.md``): per step the scheduler thread
appends one step record; per published snapshot it captures only what can change while a request
lives — which requests are running / waiting / chunked, their output and prefix lengths, the
scalar fields — and queues that with the batched step records in one put. The publisher thread
then finishes the Snapshot (``_CapturedSnapshot``: the static columns rid, input_len,
max_new_tokens, ignore_eos come from a per-request cache, reused whole while a group holds the
same requests) and encodes it. Subscribers receive the same messages as when everything was read
on the scheduler thread.
"""

from __future__ import annotations

import logging
import os
import time

from block_sgl import protocol as p
from block_sgl.hooks import capture
from block_sgl.hooks.flags import HookSettings, parse_endpoint
from block_sgl.hooks.publisher import Deferred, Publisher, PublisherError

logger = logging.getLogger(__name__)

SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
"""Routes SGLang's radix-cache events to block_sgl's in-process publisher. An empty endpoint
keeps SGLang's own load publisher (which derives ports from it) off."""
FAULT_ENV = "BLOCK_SGL_FAULT_INJECT"
"""Tests only: ``snapshot`` or ``snapshot:N`` makes snapshot building raise (every time, or the
first N times), to prove SGLang keeps serving and block_sgl recovers."""


def endpoints_for_rank(publish: str, dp_rank: int) -> tuple[str, str]:
    host, port = parse_endpoint("BLOCK_SGL_PUBLISH", publish)
    host = f"[{host}]" if ":" in host else host
    return (f"tcp://{host}:{port + dp_rank}",
            f"tcp://{host}:{port + p.REPLAY_PORT_OFFSET + dp_rank}")


_EMPTY_LIST: list = []
_NOTHING = (_EMPTY_LIST, _EMPTY_LIST, _EMPTY_LIST)
_EMPTY_COLUMNS = p.RequestColumns()
"""Shared by every snapshot with an empty group (nothing mutates a published message)."""


class _Group:
    """The static columns (rid, input_len, max_new_tokens, ignore_eos) of one group of requests
    (running, waiting or chunked), kept from one snapshot to the next."""

    __slots__ = ("reqs", "rows", "static")

    def __init__(self):
        self.reqs: list = _EMPTY_LIST  # the requests behind ``static`` (held: `is` stays sound)
        self.rows: dict = {}           # id(req) -> static row, for exactly these requests
        self.static: tuple = (_EMPTY_LIST,) * 4

    def update(self, reqs: list, sources: tuple) -> None:
        """Make ``static`` describe ``reqs`` (a list nobody mutates), reusing the rows of
        ``sources`` (every group's rows as of the previous snapshot: requests move between
        groups)."""
        if capture.same_requests(reqs, self.reqs):
            return
        rows: dict = {}
        self.static = capture.gather_static(reqs, sources, rows)
        self.reqs, self.rows = reqs, rows  # releases the rows of requests no longer here


class _SnapshotAssembler:
    """Turns captured snapshots into ``Snapshot`` messages; used by one thread at a time (the
    publisher thread). A request's rid, input_len, max_new_tokens and ignore_eos are fixed once
    SGLang has queued it (``Scheduler.handle_generate_request`` pads, truncates, clips and aborts
    before ``_add_request_to_queue``), so they are read once per request and a group's static
    columns are reused while it holds the same requests in the same order."""

    def __init__(self):
        self.groups = (_Group(), _Group(), _Group())  # running, waiting, chunked

    @property
    def rows(self) -> dict:
        """id(req) -> static row of every request held (tests)."""
        return {k: v for group in self.groups for k, v in group.rows.items()}

    def assemble(self, captured: tuple, fields: dict) -> p.Snapshot:
        columns = []
        sources = tuple(group.rows for group in self.groups)
        for group, (reqs, prefix_len, output_len) in zip(self.groups, captured):
            group.update(reqs, sources)
            if reqs:
                rid, input_len, max_new, ignore_eos = group.static
                columns.append(p.RequestColumns(
                    rid=rid, input_len=input_len, prefix_len=prefix_len, output_len=output_len,
                    max_new_tokens=max_new, ignore_eos=ignore_eos))
            else:
                columns.append(_EMPTY_COLUMNS)
        running, waiting, chunked = columns
        return p.Snapshot(running=running, waiting=waiting, chunked=chunked, **fields)


class _CapturedSnapshot(Deferred):
    """A snapshot as the scheduler thread took it (requests, their output and prefix lengths,
    the scalar fields); the publisher thread makes the ``Snapshot`` out of it (``finish``)."""

    __slots__ = ("tap", "captured", "fields")

    def __init__(self, tap: "SchedulerTap", captured: tuple, fields: dict):
        self.tap, self.captured, self.fields = tap, captured, fields

    def finish(self) -> p.Snapshot | None:
        try:
            return self.tap._assembler.assemble(self.captured, self.fields)
        except Exception:
            self.tap._failed("snapshot")
            return None


def _mode_name(mode) -> str:
    if mode.is_idle():
        return "idle"
    if mode.is_decode():
        return "decode"
    if mode.is_mixed():
        return "mixed"
    return "extend"


class SchedulerTap:
    """One per scheduler process; created by ``register()`` and bound to the hooks."""

    def __init__(self, settings: HookSettings):
        self.settings = settings
        self.publisher: Publisher | None = None
        self.instance_id = ""
        self._snapshot_interval = settings.snapshot_interval_ms / 1e3
        self._heartbeat_interval = settings.heartbeat_interval_ms / 1e3
        self._last_snapshot = 0.0
        self._step_started: float | None = None
        self._previous_step_end: float | None = None
        self._steps = p.StepRecords(instance_id="")
        self._steps_total = 0
        self._modes: dict = {}  # forward mode -> (name, is_decode)
        self._assembler = _SnapshotAssembler()  # the publisher thread's (see _CapturedSnapshot)
        self.errors = 0
        self.hook_seconds = 0.0
        self._logged_kinds: set[str] = set()
        fault, _, count = os.environ.get(FAULT_ENV, "").partition(":")
        self._fault = fault
        self._faults_left = int(count) if count.isdigit() else -1

    # -- safety ---------------------------------------------------------------------------
    def _failed(self, kind: str) -> None:
        self.errors += 1
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            logger.exception("block_sgl hook %r failed (logged once; counted in errors_total)", kind)

    # -- hooks ----------------------------------------------------------------------------
    def after_init(self, result, scheduler, *args, **kwargs):
        try:
            self._attach(scheduler)
        except PublisherError as e:
            message = f"block_sgl: cannot publish on {self.settings.publish}: {e}"
            if self.settings.strict:
                raise RuntimeError(message + " (BLOCK_SGL_STRICT=1: refusing to start)") from None
            # SGLang's log format has no level name: say ERROR in the text so operators see it.
            logger.error("ERROR %s; block_sgl is DISABLED on this instance, SGLang keeps serving",
                         message)
            self.publisher = None
        except Exception:
            if self.settings.strict:
                raise
            self._failed("init")
            self.publisher = None
        return None

    def _attach(self, scheduler) -> None:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        if par.pp_rank != 0 or par.attn_tp_rank != 0 or getattr(par, "attn_cp_rank", 0) != 0:
            return
        dp_rank = par.dp_rank if par.dp_rank is not None else 0
        args = scheduler.server_args
        url = f"http://{args.host}:{args.port}"
        self.instance_id = self.settings.instance_id or url
        if dp_rank:
            self.instance_id += f"#dp{dp_rank}"
        self._steps = p.StepRecords(instance_id=self.instance_id)
        endpoint, replay = endpoints_for_rank(self.settings.publish, dp_rank)
        publisher = Publisher(endpoint, replay, self.instance_id)
        publisher.start()
        self.publisher = publisher
        publisher.submit(p.Hello(
            instance_id=self.instance_id, url=url, model=str(args.served_model_name or args.model_path),
            page_size=int(scheduler.page_size), max_total_num_tokens=int(scheduler.max_total_num_tokens),
            max_running_requests=int(scheduler.max_running_requests),
            chunked_prefill_size=int(scheduler.chunked_prefill_size or -1),
            max_prefill_tokens=int(scheduler.max_prefill_tokens),
            schedule_policy=str(args.schedule_policy), dp_rank=dp_rank,
            hardware_profile=self.settings.emulate, time_scale=self.settings.time_scale,
            started_at=time.time()))
        self._publish_snapshot(scheduler, time.perf_counter())
        logger.info("block_sgl publishing %s on %s (replay %s)", self.instance_id, endpoint, replay)

    def before_run_batch(self, scheduler, *args, **kwargs):
        if self.publisher is not None:
            self._step_started = time.perf_counter()
        return None

    def after_process_batch_result(self, result, scheduler, batch, *args, **kwargs):
        if self.publisher is None:
            return None
        try:
            now = time.perf_counter()
            self._record_step(batch, now)
            if now - self._last_snapshot >= self._snapshot_interval:
                self._publish_snapshot(scheduler, now, batch)
        except Exception:
            self._failed("process_batch_result")
        self.hook_seconds += time.perf_counter() - now
        return None

    def after_on_idle(self, result, scheduler, *args, **kwargs):
        if self.publisher is None:
            return None
        self._previous_step_end = None  # idle: the next step does not follow back to back
        try:
            now = time.perf_counter()
            if now - self._last_snapshot >= self._heartbeat_interval:
                self.publisher.submit(p.Heartbeat(instance_id=self.instance_id, time=time.time()))
                self._publish_snapshot(scheduler, now)
        except Exception:
            self._failed("on_idle")
        return None

    # -- work -----------------------------------------------------------------------------
    def _record_step(self, batch, now: float) -> None:
        s = self._steps
        mode = batch.forward_mode
        known = self._modes.get(mode)  # SGLang's ForwardMode: an IntEnum, one entry per member
        if known is None:
            known = self._modes[mode] = (_mode_name(mode), bool(mode.is_decode()))
        name, is_decode = known
        started = self._previous_step_end or self._step_started or now
        self._step_started = None
        self._previous_step_end = now
        reqs = len(batch.reqs)
        kv_tokens = int(batch.seq_lens_sum or 0)
        if is_decode:
            extend, prefix, pairs, decode_reqs, decode_ctx = 0, 0, 0.0, reqs, kv_tokens
        else:
            extend_lens = batch.extend_lens or []
            prefix_lens = batch.prefix_lens or [0] * len(extend_lens)
            extend, prefix = int(sum(extend_lens)), int(sum(prefix_lens))
            pairs = float(sum(e * (q + (e + 1) / 2.0) for e, q in zip(extend_lens, prefix_lens)))
            decode_reqs, decode_ctx = 0, 0
        s.forward_mode.append(name)
        s.num_reqs.append(reqs)
        s.extend_tokens.append(extend)
        s.prefix_tokens.append(prefix)
        s.prefill_context_tokens.append(pairs)
        s.decode_reqs.append(decode_reqs)
        s.decode_context_tokens.append(decode_ctx)
        s.kv_tokens.append(kv_tokens)
        s.duration_s.append(now - started)
        s.end_time.append(time.time())
        self._steps_total += 1

    def _take_steps(self) -> p.StepRecords | None:
        """The step records batched since the last publish (None if there are none)."""
        steps = self._steps
        if not steps.num_reqs:
            return None
        self._steps = p.StepRecords(instance_id=self.instance_id)
        return steps

    def capture_snapshot(self, scheduler, batch=None) -> _CapturedSnapshot:
        """The scheduler thread's part of a Snapshot: which requests, the per-step values.
        ``batch``: the batch whose result was just processed (the hook's argument), if any."""
        if self._fault == "snapshot" and self._faults_left != 0:
            self._faults_left -= 1
            raise RuntimeError("injected fault (BLOCK_SGL_FAULT_INJECT=snapshot)")
        running = scheduler.running_batch.reqs
        chunked = scheduler.chunked_req
        # The requests of an EXTEND batch are in neither running_batch nor the waiting queue
        # until the next scheduling round merges them (``get_next_batch_to_run(last_batch=…)``;
        # ``event_loop_normal`` sets ``last_batch`` only AFTER ``process_batch_result``, so at
        # this hook ``scheduler.last_batch`` is the previous, already merged batch). The batch
        # in flight is ``cur_batch_for_debug`` (set before ``run_batch`` in both event loops;
        # under the overlap loop it is the batch launched after the one just processed); the
        # hook's own ``batch`` where an SGLang lacks it. Reported as running: they are.
        fresh = getattr(scheduler, "cur_batch_for_debug", None)
        if fresh is None:
            fresh = batch
        if fresh is not None and not fresh.forward_mode.is_decode() and fresh.reqs:
            seen = {r.rid for r in running}
            running = list(running) + [r for r in fresh.reqs if r.rid not in seen
                                       and r is not chunked and not r.finished()]
        # One C loop per list (block_sgl._capture): the finished filter, max(cached_tokens,
        # prefix_len) and len(output_ids); always new lists, since SGLang mutates its own in
        # place after this returns and the publisher thread reads ours later.
        waiting = scheduler.waiting_queue
        captured = (capture.capture_requests(running if type(running) is list else list(running), True),
                    capture.capture_requests(waiting if type(waiting) is list else list(waiting), False),
                    capture.capture_requests([chunked], False) if chunked is not None else _NOTHING)
        return _CapturedSnapshot(self, captured, dict(
            instance_id=self.instance_id, time=time.time(), forward_ct=int(scheduler.forward_ct),
            chunked_rid=chunked.rid if chunked is not None else None,
            chunked_done_tokens=int(chunked.prefix_len) if chunked is not None else 0,
            free_tokens=int(scheduler.token_to_kv_pool_allocator.available_size()),
            evictable_tokens=int(scheduler.tree_cache.evictable_size()),
            max_total_num_tokens=int(scheduler.max_total_num_tokens),
            new_token_ratio=float(scheduler.new_token_ratio_tracker.current),
            steps_total=self._steps_total, dropped_total=self.publisher.dropped,
            errors_total=self.errors, hook_seconds_total=self.hook_seconds))

    def build_snapshot(self, scheduler) -> p.Snapshot:
        """A whole Snapshot on the calling thread (tests, tools; not the publishing path), without
        the publisher thread's cache of static columns."""
        captured = self.capture_snapshot(scheduler)
        return _SnapshotAssembler().assemble(captured.captured, captured.fields)

    def _publish_snapshot(self, scheduler, now: float, batch=None) -> None:
        self._last_snapshot = now
        steps = self._take_steps()
        try:
            snapshot = self.capture_snapshot(scheduler, batch)
        except Exception:
            self._failed("snapshot")
            if steps is not None:
                self.publisher.submit(steps)
            return
        # One queue item, one wake-up of the publisher thread; the steps go first, as before.
        if steps is not None:
            self.publisher.submit(steps, snapshot)
        else:
            self.publisher.submit(snapshot)

    # -- radix-cache events (SGLang EventPublisher interface) ------------------------------
    def make_kv_event_publisher(self, **config):
        from sglang.srt.disaggregation.kv_events import EventPublisher

        tap = self

        class BlockSglKvEvents(EventPublisher):
            """Receives SGLang's KVEventBatch objects in-process and forwards them."""

            def publish(self, batch) -> None:
                tap.forward_kv_events(batch.events)

            def shutdown(self) -> None:
                if tap.publisher is not None:
                    tap.publisher.close()

        return BlockSglKvEvents()

    def forward_kv_events(self, events) -> None:
        if self.publisher is None:
            return
        try:
            for ev in events:
                name = type(ev).__name__
                if name == "BlockStored":
                    self.publisher.submit(p.CacheStored(
                        instance_id=self.instance_id, block_hashes=list(ev.block_hashes),
                        parent_block_hash=ev.parent_block_hash, block_size=int(ev.block_size)))
                elif name == "BlockRemoved":
                    self.publisher.submit(p.CacheRemoved(instance_id=self.instance_id,
                                                         block_hashes=list(ev.block_hashes)))
                elif name == "AllBlocksCleared":
                    self.publisher.submit(p.CacheCleared(instance_id=self.instance_id))
        except Exception:
            self._failed("kv_events")


def install(settings: HookSettings) -> SchedulerTap:
    """Register the scheduler hooks and the KV-event publisher for this process."""
    from sglang.srt.disaggregation.kv_events import EventPublisherFactory
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    tap = SchedulerTap(settings)
    HookRegistry.register(f"{SCHEDULER}.__init__", tap.after_init, HookType.AFTER)
    HookRegistry.register(f"{SCHEDULER}.run_batch", tap.before_run_batch, HookType.BEFORE)
    HookRegistry.register(f"{SCHEDULER}.process_batch_result", tap.after_process_batch_result,
                          HookType.AFTER)
    HookRegistry.register(f"{SCHEDULER}.on_idle", tap.after_on_idle, HookType.AFTER)
    EventPublisherFactory.register_publisher("block_sgl", tap.make_kv_event_publisher)
    return tap
