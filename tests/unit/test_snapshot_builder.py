"""SchedulerTap's incremental snapshot building (no SGLang): same messages as a plain rebuild,
with the compiled capture (``block_sgl._capture``) and with its pure-Python specification."""

import random
import types

import pytest

from block_sgl import protocol as p
from block_sgl.hooks import capture
from block_sgl.hooks.flags import HookSettings
from block_sgl.hooks.publisher import Publisher
from block_sgl.hooks.scheduler import SchedulerTap


class Req:
    """The Req attributes the hooks read (sglang/srt/managers/schedule_batch.py)."""

    def __init__(self, i, rng):
        self.rid = f"r{i}"
        self.origin_input_ids = [0] * rng.randint(1, 900)
        self.output_ids = []
        self.cached_tokens = 0
        self.prefix_len = 0
        self.sampling_params = types.SimpleNamespace(max_new_tokens=rng.randint(1, 500),
                                                     ignore_eos=rng.choice([True, False, 0, 1]))
        self.finished_reason = None

    def finished(self):
        return self.finished_reason is not None


class Mode:
    def __init__(self, decode):
        self.decode = decode

    def is_decode(self):
        return self.decode

    def is_idle(self):
        return False

    def is_mixed(self):
        return False


DECODE, EXTEND = Mode(True), Mode(False)


def reference_columns(reqs):
    """What SchedulerTap published before it cached anything: every field read every time."""
    reqs = list(reqs)
    return p.RequestColumns(
        rid=[r.rid for r in reqs], input_len=[len(r.origin_input_ids) for r in reqs],
        prefix_len=[max(r.cached_tokens, r.prefix_len) for r in reqs],
        output_len=[len(r.output_ids) for r in reqs],
        max_new_tokens=[r.sampling_params.max_new_tokens for r in reqs],
        ignore_eos=[bool(r.sampling_params.ignore_eos) for r in reqs])


def reference_groups(sched, batch=None):
    """``batch``: the one the hook was called for. The requests of the extend batch in flight
    (``cur_batch_for_debug``, else ``batch``) are not merged into running_batch yet."""
    running = list(sched.running_batch.reqs)
    chunked = sched.chunked_req
    fresh = getattr(sched, "cur_batch_for_debug", None)
    fresh = batch if fresh is None else fresh
    if fresh is not None and not fresh.forward_mode.is_decode():
        seen = {r.rid for r in running}
        running += [r for r in fresh.reqs if r.rid not in seen and r is not chunked and not r.finished()]
    running = [r for r in running if not r.finished()]
    return (reference_columns(running), reference_columns(sched.waiting_queue),
            reference_columns([chunked] if chunked is not None else []))


@pytest.fixture(autouse=True, params=["compiled", "python"])
def capture_implementation(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(capture, "capture_requests", capture.capture_requests_py)
        monkeypatch.setattr(capture, "same_requests", capture.same_requests_py)
        monkeypatch.setattr(capture, "gather_static", capture.gather_static_py)
    elif capture.implementation() != "compiled":
        pytest.skip("the pure-Python capture was requested (BLOCK_SGL_CAPTURE_PURE=1)")
    return request.param


def scheduler():
    return types.SimpleNamespace(
        running_batch=types.SimpleNamespace(reqs=[]), waiting_queue=[], last_batch=None,
        cur_batch_for_debug=None, chunked_req=None, forward_ct=0,
        token_to_kv_pool_allocator=types.SimpleNamespace(available_size=lambda: 1000),
        tree_cache=types.SimpleNamespace(evictable_size=lambda: 10), max_total_num_tokens=5000,
        new_token_ratio_tracker=types.SimpleNamespace(current=0.5))


def tap():
    t = SchedulerTap(HookSettings(snapshot_interval_ms=1e-6))
    t.publisher = Publisher("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "t")  # never started
    t.instance_id = "t"
    return t


def drain(publisher):
    """What the publisher thread would send, in order (finished, as decoded by a subscriber)."""
    out, codec = [], p.Codec()
    while publisher._queue.qsize():
        for message in publisher._queue.get_nowait():
            prepared = publisher.prepare(message)
            if prepared is not None:
                assert codec.decode(prepared[1]) == prepared[0]
                out.append(prepared[0])
    return out


def test_incremental_columns_match_a_full_rebuild_through_a_random_workload():
    rng = random.Random(7)
    sched, t, codec = scheduler(), tap(), p.Codec()
    running, waiting = sched.running_batch.reqs, sched.waiting_queue  # mutated in place, as SGLang does
    next_id, reused, previous = 0, 0, (None, None)
    for step in range(400):
        sched.forward_ct = step
        # SGLang's event_loop_normal: last_batch is the previous batch (merged already).
        sched.last_batch = sched.cur_batch_for_debug if hasattr(sched, "cur_batch_for_debug") \
            else None
        extended = None
        for r in [r for r in running if r.finished()]:
            running.remove(r)
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            waiting.append(Req(next_id, rng))
            next_id += 1
        if rng.random() < 0.1 and waiting:
            waiting.pop(rng.randrange(len(waiting)))  # aborted while queued
        for r in waiting:
            if rng.random() < 0.3:
                r.prefix_len = rng.randint(0, len(r.origin_input_ids))  # a fresh prefix match
        if sched.chunked_req is not None and rng.random() < 0.5:
            r, sched.chunked_req = sched.chunked_req, None  # last chunk done: joins next round
            r.cached_tokens = r.prefix_len
            extended = [r]
            running.append(r)
        elif waiting and rng.random() < 0.4:
            admitted = [waiting.pop(0) for _ in range(min(len(waiting), rng.randint(1, 3)))]
            if sched.chunked_req is None and rng.random() < 0.3:
                sched.chunked_req = admitted.pop()
                sched.chunked_req.prefix_len += 64
            extended = admitted + ([sched.chunked_req] if sched.chunked_req is not None else [])
            if rng.random() < 0.5:
                running.extend(admitted)  # else (as in SGLang) only the batch in flight has them
        for r in running:
            r.output_ids.append(1)
            if rng.random() < 0.05 or len(r.output_ids) >= r.sampling_params.max_new_tokens:
                r.finished_reason = "stop"
        if rng.random() < 0.02:
            running.reverse()  # reordered (e.g. a retraction's sort): same requests, new order
        batch = types.SimpleNamespace(forward_mode=DECODE if extended is None else EXTEND,
                                      reqs=list(running) if extended is None else extended,
                                      seq_lens_sum=5, extend_lens=[3, 4], prefix_lens=[0, 1])
        if rng.random() < 0.2:  # an SGLang without cur_batch_for_debug: the hook's batch
            vars(sched).pop("cur_batch_for_debug", None)
        else:
            sched.cur_batch_for_debug = batch
        t.after_process_batch_result(None, sched, batch)
        expected = reference_groups(sched, batch)
        for r in running + waiting:  # the scheduler moves on before the publisher thread runs
            r.output_ids.append(2)
            r.cached_tokens += 1
        sent = drain(t.publisher)
        assert [type(m) for m in sent] == [p.StepRecords, p.Snapshot]
        snap = sent[1]
        assert (snap.running, snap.waiting, snap.chunked) == expected, step
        assert snap.chunked_rid == (sched.chunked_req.rid if sched.chunked_req else None)
        assert codec.decode(codec.encode(snap)) == snap
        held = {id(r) for group in t._assembler.groups for r in group.reqs}
        assert set(t._assembler.rows) == held
        assert len(held) == len(snap.running) + len(snap.waiting) + len(snap.chunked)
        reused += not any(len(g) and g.rid is not prev for g, prev in zip(
            (snap.running, snap.waiting), previous)) and len(snap.running) > 0
        previous = (snap.running.rid, snap.waiting.rid)
    assert t.errors == 0 and t._steps_total == 400
    assert 50 < reused < 350  # both the cached and the rebuilt path were exercised


def test_a_group_that_empties_releases_its_requests():
    rng = random.Random(1)
    sched, t = scheduler(), tap()
    sched.running_batch.reqs[:] = [Req(i, rng) for i in range(5)]
    batch = types.SimpleNamespace(forward_mode=DECODE, reqs=[], seq_lens_sum=0)
    t.after_process_batch_result(None, sched, batch)
    drain(t.publisher)
    assert len(t._assembler.rows) == 5
    for r in sched.running_batch.reqs:
        r.finished_reason = "stop"
    t.after_process_batch_result(None, sched, batch)
    snap = drain(t.publisher)[-1]
    assert len(snap.running) == 0 and t._assembler.rows == {}
    assert all(g.reqs == [] for g in t._assembler.groups)


def test_build_snapshot_matches_the_published_one():
    rng = random.Random(3)
    sched, t = scheduler(), tap()
    sched.running_batch.reqs[:] = [Req(i, rng) for i in range(6)]
    sched.waiting_queue[:] = [Req(i, rng) for i in range(6, 9)]
    sched.chunked_req = Req(9, rng)
    direct = t.build_snapshot(sched)
    batch = types.SimpleNamespace(forward_mode=DECODE, reqs=[], seq_lens_sum=0)
    t.after_process_batch_result(None, sched, batch)
    published = drain(t.publisher)[-1]
    assert (direct.running, direct.waiting, direct.chunked) == reference_groups(sched)
    assert (published.running, published.waiting, published.chunked) == reference_groups(sched)
    assert direct.chunked_rid == published.chunked_rid == "r9"


def test_steps_and_snapshot_go_out_as_one_item_in_order_and_drops_count_each():
    sched, t = scheduler(), tap()
    t.publisher._queue_size = 1
    batch = types.SimpleNamespace(forward_mode=DECODE, reqs=[], seq_lens_sum=0)
    t.after_process_batch_result(None, sched, batch)
    assert t.publisher._queue.qsize() == 1
    t.after_process_batch_result(None, sched, batch)  # queue full: both messages dropped
    assert t.publisher.dropped == 2
    steps, snap = drain(t.publisher)
    assert isinstance(steps, p.StepRecords) and steps.num_reqs == [0] and steps.forward_mode == ["decode"]
    assert isinstance(snap, p.Snapshot) and snap.steps_total == 1


def test_a_failing_snapshot_still_sends_the_steps(monkeypatch):
    monkeypatch.setenv("BLOCK_SGL_FAULT_INJECT", "snapshot:1")
    sched, t = scheduler(), tap()
    batch = types.SimpleNamespace(forward_mode=DECODE, reqs=[], seq_lens_sum=0)
    t.after_process_batch_result(None, sched, batch)
    assert [type(m) for m in drain(t.publisher)] == [p.StepRecords]
    assert t.errors == 1
    t.after_process_batch_result(None, sched, batch)
    sent = drain(t.publisher)
    assert [type(m) for m in sent] == [p.StepRecords, p.Snapshot] and sent[1].errors_total == 1


def test_a_request_that_cannot_be_read_costs_one_snapshot_and_is_counted():
    rng = random.Random(5)
    sched, t = scheduler(), tap()
    bad = Req(0, rng)
    del bad.sampling_params  # its static row is read on the publisher thread
    sched.running_batch.reqs[:] = [bad]
    batch = types.SimpleNamespace(forward_mode=DECODE, reqs=[], seq_lens_sum=0)
    t.after_process_batch_result(None, sched, batch)
    assert [type(m) for m in drain(t.publisher)] == [p.StepRecords] and t.errors == 1
    sched.running_batch.reqs[:] = [Req(1, rng)]
    t.after_process_batch_result(None, sched, batch)
    sent = drain(t.publisher)
    assert sent[1].running.rid == ["r1"] and sent[1].errors_total == 1


@pytest.mark.parametrize("sglang_has_cur_batch", [True, False])
def test_requests_of_the_extend_batch_just_run_are_running(sglang_has_cur_batch):
    """At ``process_batch_result`` SGLang's freshly prefilled requests are in neither
    running_batch nor the waiting queue, and ``last_batch`` is still the previous batch
    (``event_loop_normal`` updates it after the hook): the snapshot must show them anyway."""
    rng = random.Random(5)
    sched, t = scheduler(), tap()
    old, new, queued = Req(0, rng), Req(1, rng), Req(2, rng)
    old.output_ids, new.output_ids = [1] * 7, [1]
    sched.running_batch.reqs[:] = [old]
    sched.waiting_queue[:] = [queued]
    sched.last_batch = types.SimpleNamespace(forward_mode=DECODE, reqs=[old])
    batch = types.SimpleNamespace(forward_mode=EXTEND, reqs=[new], seq_lens_sum=5,
                                  extend_lens=[len(new.origin_input_ids)], prefix_lens=[0])
    if sglang_has_cur_batch:
        sched.cur_batch_for_debug = batch
    else:
        del sched.cur_batch_for_debug
    t.after_process_batch_result(None, sched, batch)
    snap = drain(t.publisher)[-1]
    assert snap.running.rid == ["r0", "r1"] and snap.running.output_len == [7, 1]
    assert snap.waiting.rid == ["r2"]
    # The next round merged it; the previous extend batch (now last_batch) adds no duplicate.
    sched.running_batch.reqs[:] = [old, new]
    sched.last_batch = batch
    decode = types.SimpleNamespace(forward_mode=DECODE, reqs=[old, new], seq_lens_sum=5)
    if sglang_has_cur_batch:
        sched.cur_batch_for_debug = decode
    t.after_process_batch_result(None, sched, decode)
    assert drain(t.publisher)[-1].running.rid == ["r0", "r1"]
