"""Subscriber side of the instance streams: connect to N instances, keep the latest consistent
state of each, repair seq gaps through replay, mark silent instances stale.

Used by the router and by the in-engine DP hook. Imports neither sglang nor torch.

One background thread owns every socket (ZMQ sockets are not thread-safe). Per instance it
1. asks the replay socket for the full state (Hello, latest Snapshot, CacheDump) and starts
   from the seq that state reflects;
2. reads the PUB stream; a message whose seq skips ahead triggers a replay of the missing
   range (a ``ReplayGap`` answer — the range is gone — falls back to the full state);
3. treats a ``Hello`` with an older seq as a restarted instance (fresh full state).
Readers get immutable messages (``InstanceState`` holds references that the thread replaces).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

import zmq

from block_sgl import protocol as p

logger = logging.getLogger(__name__)


def replay_endpoint_for(publish_endpoint: str) -> str:
    """The replay ROUTER of a publish endpoint (port + REPLAY_PORT_OFFSET)."""
    head, _, port = publish_endpoint.rpartition(":")
    if not head.startswith("tcp://") or not port.isdigit():
        raise ValueError(f"not a publish endpoint: {publish_endpoint!r}; expected tcp://HOST:PORT")
    return f"{head}:{int(port) + p.REPLAY_PORT_OFFSET}"


@dataclasses.dataclass
class InstanceState:
    endpoint: str
    instance_id: str | None = None
    hello: p.Hello | None = None
    snapshot: p.Snapshot | None = None
    last_message_at: float = 0.0
    """time.monotonic() of the last message (any kind) from this instance."""
    next_seq: int | None = None
    gaps_repaired: int = 0
    full_states: int = 0
    steps: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=64))

    def is_stale(self, stale_after_s: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.snapshot is None or now - self.last_message_at > stale_after_s


CacheListener = Callable[[str, object], None]
"""Called (in the subscriber thread) with (publish endpoint, CacheStored | CacheRemoved |
CacheCleared | CacheDump) in stream order."""

StepsListener = Callable[[str, p.StepRecords], None]
"""Called (in the subscriber thread) with (publish endpoint, StepRecords) in stream order;
records replayed after a gap are delivered too, a full-state reload carries none."""

SnapshotListener = Callable[[str, p.Snapshot], None]
"""Called (in the subscriber thread) with (publish endpoint, Snapshot) for every snapshot
applied, in stream order (replayed ones and the one of a full-state reload included)."""


class StreamSubscriber:
    def __init__(self, publish_endpoints: list[str], stale_after_s: float = 3.0,
                 on_cache_event: CacheListener | None = None, replay_timeout_s: float = 2.0,
                 on_steps: StepsListener | None = None,
                 on_snapshot: SnapshotListener | None = None):
        if not publish_endpoints:
            raise ValueError("at least one publish endpoint is needed")
        for e in publish_endpoints:
            replay_endpoint_for(e)  # validate early, with the value in the message
        self.stale_after_s = stale_after_s
        self.replay_timeout_s = replay_timeout_s
        self._on_cache_event = on_cache_event
        self._on_steps = on_steps
        self._on_snapshot = on_snapshot
        self.states = {e: InstanceState(endpoint=e) for e in publish_endpoints}
        self._codec = p.Codec()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # -- public ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="block_sgl-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def stale(self) -> list[str]:
        now = time.monotonic()
        return [e for e, s in self.states.items() if s.is_stale(self.stale_after_s, now)]

    def wait_until(self, predicate: Callable[["StreamSubscriber"], bool], timeout: float) -> bool:
        """Poll ``predicate(self)`` until it is true or ``timeout`` passes (for tests/tools)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.01)
        return predicate(self)

    # -- thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = zmq.Context()
        subs, dealers = {}, {}
        poller = zmq.Poller()
        try:
            for endpoint in self.states:
                sub = ctx.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(endpoint)
                subs[sub] = endpoint
                poller.register(sub, zmq.POLLIN)
                dealers[endpoint] = self._dealer(ctx, endpoint)
            last_state_try = {}
            while not self._stop.is_set():
                for endpoint, state in self.states.items():
                    # (Re)load the full state when we have none; retry at most once a second.
                    if state.next_seq is None and time.monotonic() - last_state_try.get(endpoint, -9) > 1:
                        last_state_try[endpoint] = time.monotonic()
                        dealers[endpoint] = self._load_full_state(ctx, dealers[endpoint], state)
                for sock, _ in poller.poll(50):
                    topic, seq_raw, payload = sock.recv_multipart()
                    endpoint = subs[sock]
                    dealers[endpoint] = self._on_frame(ctx, dealers[endpoint], self.states[endpoint],
                                                       p.unpack_seq(seq_raw), payload)
        except Exception as e:  # pragma: no cover - reported, never silent
            logger.exception("block_sgl ingest thread stopped")
            self.errors.append(repr(e))
        finally:
            for s in list(subs) + list(dealers.values()):
                s.close(0)
            ctx.term()

    def _dealer(self, ctx, endpoint):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(replay_endpoint_for(endpoint))
        return d

    def _on_frame(self, ctx, dealer, state: InstanceState, seq: int, payload: bytes):
        message = self._decode(state, payload)
        if message is None:
            return dealer
        if state.next_seq is None:
            return dealer  # no baseline yet: the full state will cover this
        if seq < state.next_seq:
            if isinstance(message, p.Hello) and (state.hello is None
                                                 or message.started_at != state.hello.started_at):
                state.next_seq = None  # the instance restarted: start over from its full state
            return dealer  # otherwise a duplicate of something the state already reflects
        if seq > state.next_seq:
            dealer = self._replay(ctx, dealer, state, state.next_seq, seq)
            if state.next_seq is None:
                return dealer
        self._apply(state, message)
        state.next_seq = seq + 1
        return dealer

    def _request(self, ctx, dealer, state: InstanceState, request: bytes):
        """Send one replay request; yield (seq, message) until the end marker. On timeout the
        DEALER is replaced (a half-read answer must not leak into the next request)."""
        dealer.send_multipart([b"", request])
        replies = []
        deadline = time.monotonic() + self.replay_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not dealer.poll(int(left * 1000)):
                dealer.close(0)
                return self._dealer(ctx, state.endpoint), None
            frames = dealer.recv_multipart()
            if len(frames) != 4:
                continue
            _, _topic, seq_raw, payload = frames
            if seq_raw == p.END_SEQ:
                return dealer, replies
            message = self._decode(state, payload)
            if message is not None:
                replies.append((p.unpack_seq(seq_raw), message))

    def _load_full_state(self, ctx, dealer, state: InstanceState):
        dealer, replies = self._request(ctx, dealer, state, p.STATE_REQUEST)
        if not replies:
            return dealer
        for seq, message in replies:
            if isinstance(message, p.Hello):
                state.hello = message
            self._apply(state, message)
            state.next_seq = seq + 1
        state.full_states += 1
        return dealer

    def _replay(self, ctx, dealer, state: InstanceState, start: int, upto: int):
        dealer, replies = self._request(ctx, dealer, state, p.pack_seq(start))
        if replies is None or any(isinstance(m, p.ReplayGap) for _, m in replies):
            state.next_seq = None  # the range is gone: fall back to the full state
            return dealer
        for seq, message in replies:
            if state.next_seq <= seq < upto:
                self._apply(state, message)
                state.next_seq = seq + 1
        state.gaps_repaired += 1
        return dealer

    def _decode(self, state: InstanceState, payload: bytes):
        try:
            return self._codec.decode(payload)
        except p.SchemaMismatch as e:
            message = f"{state.endpoint}: {e}"
            if message not in self.errors:
                logger.error("refusing stream from %s", message)
                self.errors.append(message)
            return None

    def _apply(self, state: InstanceState, message) -> None:
        state.last_message_at = time.monotonic()
        if isinstance(message, p.Snapshot):
            state.snapshot = message
            state.instance_id = message.instance_id
            if self._on_snapshot is not None:
                self._on_snapshot(state.endpoint, message)
        elif isinstance(message, p.Hello):
            state.hello = message
            state.instance_id = message.instance_id
        elif isinstance(message, p.StepRecords):
            state.steps.append(message)
            if self._on_steps is not None:
                self._on_steps(state.endpoint, message)
        elif isinstance(message, (p.CacheStored, p.CacheRemoved, p.CacheCleared, p.CacheDump)):
            if self._on_cache_event is not None:
                self._on_cache_event(state.endpoint, message)
