"""From an instance's stream (Hello + Snapshot) to fastsim's ``InstanceState``.

Requests whose real output length is unknown get a predicted total output length from a
callable (the length model at the router; the true length in oracle runs and accuracy checks).
SGLang keeps the chunked request outside both queues; fastsim wants it in the waiting table at
``chunked_idx`` with its prefilled tokens, so it is put first.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from block_sgl import protocol as p
from block_sgl.fastsim import InstanceConfig, InstanceState, RequestTable

OutputLengthOracle = Callable[[p.RequestColumns], Sequence[int]]
"""A queue's columns (rid, input_len, output_len so far, max_new_tokens, ignore_eos, ...) →
the predicted total output length of each of its requests, in order."""


def instance_config(hello: p.Hello) -> InstanceConfig:
    return InstanceConfig(
        max_total_num_tokens=hello.max_total_num_tokens,
        max_running_requests=hello.max_running_requests, page_size=hello.page_size,
        chunked_prefill_size=hello.chunked_prefill_size, max_prefill_tokens=hello.max_prefill_tokens,
        schedule_policy=hello.schedule_policy if hello.schedule_policy in ("fcfs", "lpm") else "fcfs")


def request_table(cols: p.RequestColumns, predict_output: OutputLengthOracle) -> RequestTable:
    if not len(cols):
        return RequestTable.empty()
    for name in ("input_len", "prefix_len", "output_len", "max_new_tokens", "ignore_eos"):
        if len(getattr(cols, name)) != len(cols.rid):
            raise ValueError(f"snapshot columns: {name} has {len(getattr(cols, name))} entries, "
                             f"rid has {len(cols.rid)}")
    pred = predict_output(cols)
    if len(pred) != len(cols.rid):
        raise ValueError(f"predict_output gave {len(pred)} lengths for {len(cols.rid)} requests")
    # One array in the kernel's layout (RequestTable's column order), not six then a stack.
    packed = np.array([cols.input_len, cols.prefix_len, cols.output_len, cols.max_new_tokens,
                       cols.ignore_eos, pred], dtype=np.int64)
    np.minimum(packed[1], packed[0], out=packed[1])  # a prefix never exceeds its prompt
    return RequestTable.from_packed(packed)


MAX_SNAPSHOT_AGE_S = 5.0
"""fastsim replays at most this long from a snapshot (an older one is replayed as if the
candidate arrived this long after it; a stream silent for ``stale_after_s`` is stale anyway)."""


def snapshot_age(snap: p.Snapshot, now: float) -> float:
    """Seconds from the snapshot to ``now`` (time.time()), within [0, MAX_SNAPSHOT_AGE_S]
    (clocks of two hosts may disagree by a little)."""
    return min(max(0.0, now - snap.time), MAX_SNAPSHOT_AGE_S)


def instance_state(config: InstanceConfig, snap: p.Snapshot, predict_output: OutputLengthOracle,
                   now: float | None = None) -> InstanceState:
    """fastsim's view of a snapshot; the candidate arrives at ``now`` (time.time()): fastsim
    replays the instance from the snapshot's time to then (``InstanceState.elapsed_s``)."""
    waiting = request_table(snap.waiting, predict_output)
    chunked_idx, prefilled = -1, 0
    if len(snap.chunked):
        waiting = request_table(snap.chunked, predict_output).concat(waiting)
        chunked_idx, prefilled = 0, snap.chunked_done_tokens
    return InstanceState(
        config=config, running=request_table(snap.running, predict_output), waiting=waiting,
        free_kv_tokens=snap.free_tokens, evictable_tokens=snap.evictable_tokens,
        new_token_ratio=snap.new_token_ratio, chunked_idx=chunked_idx,
        chunked_prefilled=prefilled,
        elapsed_s=snapshot_age(snap, time.time() if now is None else now))
