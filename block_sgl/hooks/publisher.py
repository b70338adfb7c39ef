"""ZMQ PUB + replay ROUTER fed by a bounded queue and one background thread.

The scheduler thread only calls ``submit()`` (a non-blocking put; when the queue is full the
messages are dropped and counted). The publisher thread finishes ``Deferred`` messages (what the
scheduler thread need not do itself, see ``hooks.scheduler``), encodes them, and owns both
sockets: it numbers messages (seq), sends them, keeps the last ``buffer_size`` for replay, tracks
the full state (Hello, latest Snapshot, the set of cached page hashes) to answer a fresh
subscriber, and answers replay requests. Framing and the replay protocol: ``block_sgl.protocol``.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading

import zmq

from block_sgl import protocol as p

logger = logging.getLogger(__name__)


class PublisherError(RuntimeError):
    """The publish or replay endpoint could not be bound."""


class Deferred:
    """A message that the publisher thread completes (``finish()``, returning the protocol message,
    or None to skip it) just before encoding it: work that need not be done on the scheduler
    thread."""

    __slots__ = ()

    def finish(self):
        raise NotImplementedError


class Publisher:
    def __init__(self, endpoint: str, replay_endpoint: str, instance_id: str,
                 queue_size: int = 8192, buffer_size: int = 20000):
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.instance_id = instance_id
        self._topic = instance_id.encode()
        # Items are tuples of messages. SimpleQueue (C): put() costs the scheduler thread a
        # fraction of Queue.put_nowait(); the bound is checked in submit() (the scheduler thread
        # is the only producer).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queue_size = queue_size
        self._buffer: collections.deque = collections.deque(maxlen=buffer_size)
        self._codec = p.Codec()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._pub = self._router = None
        self._next_seq = 0
        self._hello: p.Hello | None = None
        self._snapshot: p.Snapshot | None = None
        self._cached_pages: dict[int, None] = {}
        self.dropped = 0
        self.sent = 0

    # -- scheduler thread ---------------------------------------------------------------
    def start(self) -> None:
        """Bind both sockets (errors raise PublisherError here, synchronously), start the thread."""
        self._ctx = zmq.Context()
        try:
            self._pub = self._bind(zmq.PUB, self.endpoint)
            self._router = self._bind(zmq.ROUTER, self.replay_endpoint)
        except PublisherError:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="block_sgl-publisher", daemon=True)
        self._thread.start()

    def _bind(self, kind: int, endpoint: str):
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.PUB:
            sock.setsockopt(zmq.SNDHWM, 100_000)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close()
            raise PublisherError(f"cannot bind {endpoint}: {e}") from None
        return sock

    def submit(self, *messages) -> bool:
        """Queue messages for publishing, in this order; never blocks. They travel as one queue
        item, so the publisher thread is woken once for all of them. False (and each message
        counted in ``dropped``) when the queue is full."""
        q = self._queue
        if q.qsize() >= self._queue_size:
            self.dropped += len(messages)
            return False
        q.put(messages)
        return True

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(0)
        self._pub = self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- publisher thread -----------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                messages = self._queue.get(timeout=0.005)
            except queue.Empty:
                messages = None
            try:
                while messages is not None:
                    for message in messages:
                        self._send(message)
                    try:
                        messages = self._queue.get_nowait()
                    except queue.Empty:
                        messages = None
                while poller.poll(0):
                    self._serve_replay()
            except Exception:  # never let the thread die silently; keep publishing
                logger.exception("block_sgl publisher thread error")

    def prepare(self, message):
        """The publisher thread's work on one submitted message before it is sent: finish it if
        deferred, encode it. Returns (message, payload), or None when there is nothing to send."""
        if isinstance(message, Deferred):
            message = message.finish()
            if message is None:
                return None
        return message, self._codec.encode(message)

    def _send(self, message) -> None:
        prepared = self.prepare(message)
        if prepared is None:
            return
        message, payload = prepared
        seq = self._next_seq
        self._next_seq += 1
        self._pub.send_multipart([self._topic, p.pack_seq(seq), payload], copy=False)
        self._buffer.append((seq, payload))
        self.sent += 1
        if isinstance(message, p.Snapshot):
            self._snapshot = message
        elif isinstance(message, p.Hello):
            self._hello = message
        elif isinstance(message, p.CacheStored):
            self._cached_pages.update(dict.fromkeys(message.block_hashes))
        elif isinstance(message, p.CacheRemoved):
            for h in message.block_hashes:
                self._cached_pages.pop(h, None)
        elif isinstance(message, p.CacheCleared):
            self._cached_pages.clear()

    def _serve_replay(self) -> None:
        frames = self._router.recv_multipart()
        if len(frames) != 3:
            return  # malformed request: ignore (a DEALER sends [identity, b"", request])
        identity, _, request = frames
        last = p.pack_seq(max(self._next_seq - 1, 0))
        if request == p.STATE_REQUEST:
            state = [m for m in (self._hello, self._snapshot) if m is not None]
            state.append(p.CacheDump(instance_id=self.instance_id, block_hashes=list(self._cached_pages)))
            for m in state:
                self._router.send_multipart([identity, b"", self._topic, last, self._codec.encode(m)])
        else:
            try:
                start = p.unpack_seq(request)
            except ValueError:
                start = None
            if start is not None:
                if self._buffer and start < self._buffer[0][0]:
                    gap = p.ReplayGap(instance_id=self.instance_id, oldest_seq=self._buffer[0][0])
                    self._router.send_multipart([identity, b"", self._topic, last, self._codec.encode(gap)])
                else:
                    for seq, payload in self._buffer:
                        if seq >= start:
                            self._router.send_multipart([identity, b"", self._topic, p.pack_seq(seq), payload])
        self._router.send_multipart([identity, b"", self._topic, p.END_SEQ, b""])
