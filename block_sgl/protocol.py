"""The wire contract between block_sgl's instance hooks and its subscribers (routers, DP hook).

The only module both sides import; it imports only msgspec.

Frames on the PUB socket: ``[topic, seq, payload]`` — topic = instance id (UTF-8), seq = u64
big-endian, counting from 0 per publisher start; payload = msgpack of one tagged Struct below.
Every message carries ``schema`` = ``SCHEMA_VERSION``; a subscriber refuses a stream whose schema
it does not know (``SchemaMismatch``).

Replay (ROUTER socket at the publish port + ``REPLAY_PORT_OFFSET``), requests from a DEALER:
* ``[b"", seq(8 bytes)]`` → ``[b"", topic, seq, payload]`` for every buffered message with
  a seq ≥ the one asked, then ``[b"", topic, END_SEQ, b""]``. If the asked seq is older than the
  buffer, the first reply is a ``ReplayGap`` (ask for the full state instead).
* ``[b"", STATE_REQUEST]`` → the full state: ``Hello``, the latest ``Snapshot``, and one
  ``CacheDump`` of every page hash the instance holds, each framed with the seq of the last
  message it reflects, then the end marker. A fresh subscriber always starts here.
"""

from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1
REPLAY_PORT_OFFSET = 1000
"""The replay ROUTER binds at the publish port + this (+ the DP rank, like the PUB)."""
END_SEQ = b"\xff" * 8
STATE_REQUEST = b"state"


class SchemaMismatch(ValueError):
    """A message's schema version is not the one this side speaks."""


class Hello(msgspec.Struct, tag="hello", kw_only=True):
    schema: int = SCHEMA_VERSION
    instance_id: str
    url: str | None
    model: str
    page_size: int
    max_total_num_tokens: int
    max_running_requests: int
    chunked_prefill_size: int
    max_prefill_tokens: int
    schedule_policy: str
    dp_rank: int = 0
    hardware_profile: str | None = None
    """The emulated GPU profile id (BLOCK_SGL_EMULATE) or None on real hardware."""
    time_scale: float = 1.0
    started_at: float = 0.0


class RequestColumns(msgspec.Struct, kw_only=True):
    """Columnar per-request state (one entry per request, same order in every list)."""

    rid: list[str] = []
    input_len: list[int] = []
    prefix_len: list[int] = []
    """Tokens of the prompt served from the radix cache (running: at admission; waiting: the
    last match the scheduler computed, 0 if none yet)."""
    output_len: list[int] = []
    max_new_tokens: list[int] = []
    ignore_eos: list[bool] = []

    def __len__(self) -> int:
        return len(self.rid)


class Snapshot(msgspec.Struct, tag="snapshot", kw_only=True):
    schema: int = SCHEMA_VERSION
    instance_id: str
    time: float
    """Wall-clock (time.time()) when the snapshot was taken."""
    forward_ct: int
    running: RequestColumns
    waiting: RequestColumns
    chunked_rid: str | None = None
    chunked: RequestColumns = msgspec.field(default_factory=RequestColumns)
    """The request in the middle of a chunked prefill (0 or 1 entries; SGLang keeps it outside
    both the running batch and the waiting queue)."""
    chunked_done_tokens: int = 0
    """Prompt tokens of the chunked request already prefilled (its KV is allocated)."""
    free_tokens: int
    evictable_tokens: int
    max_total_num_tokens: int
    new_token_ratio: float
    steps_total: int = 0
    dropped_total: int = 0
    """Messages dropped by the publisher because its queue was full."""
    errors_total: int = 0
    """Exceptions caught inside block_sgl's hooks."""
    hook_seconds_total: float = 0.0
    """Scheduler-thread time spent inside block_sgl's step hooks (their overhead)."""


class StepRecords(msgspec.Struct, tag="steps", kw_only=True):
    """Measured forward steps since the previous StepRecords (columnar)."""

    schema: int = SCHEMA_VERSION
    instance_id: str
    forward_mode: list[str] = []
    """'extend', 'decode', 'mixed' or 'idle'."""
    num_reqs: list[int] = []
    extend_tokens: list[int] = []
    prefix_tokens: list[int] = []
    prefill_context_tokens: list[float] = []
    """Causal (query, key) pairs of the extend part (see predictor.gpu_profiles.StepShape)."""
    decode_reqs: list[int] = []
    decode_context_tokens: list[int] = []
    kv_tokens: list[int] = []
    duration_s: list[float] = []
    end_time: list[float] = []


class CacheStored(msgspec.Struct, tag="cache_stored", kw_only=True):
    """Pages entered the radix cache. Hashes: SGLang's chained SHA-256 per page, as int64."""

    schema: int = SCHEMA_VERSION
    instance_id: str
    block_hashes: list[int]
    parent_block_hash: int | None
    block_size: int


class CacheRemoved(msgspec.Struct, tag="cache_removed", kw_only=True):
    schema: int = SCHEMA_VERSION
    instance_id: str
    block_hashes: list[int]


class CacheCleared(msgspec.Struct, tag="cache_cleared", kw_only=True):
    schema: int = SCHEMA_VERSION
    instance_id: str


class CacheDump(msgspec.Struct, tag="cache_dump", kw_only=True):
    """Every page hash the instance's radix cache holds (sent on a full-state request)."""

    schema: int = SCHEMA_VERSION
    instance_id: str
    block_hashes: list[int]


class Heartbeat(msgspec.Struct, tag="heartbeat", kw_only=True):
    schema: int = SCHEMA_VERSION
    instance_id: str
    time: float


class ReplayGap(msgspec.Struct, tag="replay_gap", kw_only=True):
    """The asked seq is no longer buffered; the oldest buffered seq is ``oldest_seq``."""

    schema: int = SCHEMA_VERSION
    instance_id: str
    oldest_seq: int


Message = (Hello | Snapshot | StepRecords | CacheStored | CacheRemoved | CacheCleared | CacheDump
           | Heartbeat | ReplayGap)


class _Envelope(msgspec.Struct):
    schema: int = -1


class Codec:
    """msgpack encoder/decoder for ``Message``, built once per user."""

    def __init__(self):
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)
        self._envelope = msgspec.msgpack.Decoder(_Envelope)

    def encode(self, message: Message) -> bytes:
        return self._encoder.encode(message)

    def decode(self, payload: bytes) -> Message:
        """Decode one payload; ``SchemaMismatch`` names an unknown schema version."""
        try:
            message = self._decoder.decode(payload)
        except msgspec.DecodeError as e:
            try:
                schema = self._envelope.decode(payload).schema
            except msgspec.DecodeError:
                schema = None
            if schema is not None and schema != SCHEMA_VERSION:
                raise SchemaMismatch(f"block_sgl stream schema version {schema} is not supported "
                                     f"(this side speaks {SCHEMA_VERSION})") from e
            raise
        if message.schema != SCHEMA_VERSION:
            raise SchemaMismatch(f"block_sgl stream schema version {message.schema} is not "
                                 f"supported (this side speaks {SCHEMA_VERSION})")
        return message


def pack_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def unpack_seq(raw: bytes) -> int:
    if len(raw) != 8:
        raise ValueError(f"a seq frame has 8 bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")
