"""Protocol, publisher and subscriber together, without SGLang (pure ZMQ on loopback)."""

import msgspec
import pytest

from block_sgl import protocol as p
from block_sgl.hooks.publisher import Publisher, PublisherError
from block_sgl.router.ingest import StreamSubscriber, replay_endpoint_for
from block_sgl.router.prefix_index import PrefixIndex
from block_sgl.testing.cluster import free_port, port_in_use


def endpoint():
    while True:
        port = free_port()
        if port + p.REPLAY_PORT_OFFSET < 65536 and not port_in_use(port + p.REPLAY_PORT_OFFSET):
            return f"tcp://127.0.0.1:{port}"


def hello(started_at=1.0):
    return p.Hello(instance_id="i0", url="http://x", model="m", page_size=16,
                   max_total_num_tokens=1000, max_running_requests=8, chunked_prefill_size=512,
                   max_prefill_tokens=1024, schedule_policy="fcfs", started_at=started_at)


def snapshot(forward_ct):
    return p.Snapshot(instance_id="i0", time=0.0, forward_ct=forward_ct, running=p.RequestColumns(),
                      waiting=p.RequestColumns(), free_tokens=1000, evictable_tokens=0,
                      max_total_num_tokens=1000, new_token_ratio=0.7)


@pytest.fixture
def publisher():
    e = endpoint()
    pub = Publisher(e, replay_endpoint_for(e), "i0", buffer_size=50)
    pub.start()
    yield pub
    pub.close()


def test_codec_round_trip_and_schema_check():
    codec = p.Codec()
    for message in (hello(), snapshot(3), p.CacheStored(instance_id="i0", block_hashes=[1, -2],
                                                        parent_block_hash=None, block_size=16)):
        assert codec.decode(codec.encode(message)) == message
    future = msgspec.msgpack.encode({"type": "snapshot", "schema": 99, "instance_id": "i0"})
    with pytest.raises(p.SchemaMismatch, match="version 99"):
        codec.decode(future)
    with pytest.raises(msgspec.DecodeError):
        codec.decode(b"\x00garbage")


def test_bind_clash_names_the_endpoint(publisher):
    clash = Publisher(publisher.endpoint, endpoint(), "i1")
    with pytest.raises(PublisherError, match=publisher.endpoint.replace(".", r"\.")):
        clash.start()


def test_fresh_subscriber_gets_the_full_state(publisher):
    index = PrefixIndex()
    publisher.submit(hello())
    publisher.submit(p.CacheStored(instance_id="i0", block_hashes=[1, 2, 3], parent_block_hash=None, block_size=16))
    publisher.submit(p.CacheRemoved(instance_id="i0", block_hashes=[3]))
    publisher.submit(snapshot(7))
    sub = StreamSubscriber([publisher.endpoint], on_cache_event=index.apply)
    sub.start()
    try:
        state = sub.states[publisher.endpoint]
        assert sub.wait_until(lambda s: state.snapshot is not None and index.size(publisher.endpoint) == 2, 5)
        assert state.hello.model == "m" and state.snapshot.forward_ct == 7
        assert index.matched_pages(publisher.endpoint, [1, 2, 3]) == 2
        publisher.submit(snapshot(8))  # the live stream continues after the state
        assert sub.wait_until(lambda s: state.snapshot.forward_ct == 8, 5)
        assert state.full_states == 1
    finally:
        sub.stop()


def test_seq_gap_is_repaired_by_replay(publisher):
    index = PrefixIndex()
    publisher.submit(hello())
    sub = StreamSubscriber([publisher.endpoint], on_cache_event=index.apply)
    sub.start()
    try:
        state = sub.states[publisher.endpoint]
        assert sub.wait_until(lambda s: state.next_seq is not None, 5)
        # Simulate lost PUB frames: the subscriber believes it is behind by two messages.
        publisher.submit(p.CacheStored(instance_id="i0", block_hashes=[10], parent_block_hash=None, block_size=16))
        publisher.submit(p.CacheStored(instance_id="i0", block_hashes=[11], parent_block_hash=10, block_size=16))
        assert sub.wait_until(lambda s: index.size(publisher.endpoint) == 2, 5)
        state.next_seq -= 2
        index.apply(publisher.endpoint, p.CacheCleared(instance_id="i0"))
        publisher.submit(snapshot(9))
        assert sub.wait_until(lambda s: state.snapshot is not None and state.snapshot.forward_ct == 9, 5)
        assert state.gaps_repaired >= 1
        assert index.matched_pages(publisher.endpoint, [10, 11]) == 2  # replayed in order
    finally:
        sub.stop()


def test_gap_older_than_the_buffer_falls_back_to_full_state(publisher):
    publisher.submit(hello())
    sub = StreamSubscriber([publisher.endpoint])
    sub.start()
    try:
        state = sub.states[publisher.endpoint]
        assert sub.wait_until(lambda s: state.next_seq is not None, 5)
        for i in range(120):  # the buffer holds 50
            publisher.submit(snapshot(i))
        assert sub.wait_until(lambda s: state.snapshot is not None and state.snapshot.forward_ct == 119, 5)
        state.next_seq = 0  # pretend we are far behind
        publisher.submit(snapshot(500))
        assert sub.wait_until(lambda s: state.full_states >= 2 and state.snapshot.forward_ct == 500, 5)
    finally:
        sub.stop()


def test_full_queue_drops_and_counts():
    e = endpoint()
    pub = Publisher(e, replay_endpoint_for(e), "i0", queue_size=3)  # not started: nothing drains
    results = [pub.submit(snapshot(i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert pub.dropped == 2


def test_silent_instance_becomes_stale(publisher):
    publisher.submit(hello())
    publisher.submit(snapshot(1))
    sub = StreamSubscriber([publisher.endpoint], stale_after_s=0.3)
    sub.start()
    try:
        assert sub.wait_until(lambda s: s.stale() == [], 5)
        assert sub.wait_until(lambda s: s.stale() == [publisher.endpoint], 5)
    finally:
        sub.stop()


def test_bad_endpoint_is_named():
    with pytest.raises(ValueError, match="127.0.0.1-5600"):
        StreamSubscriber(["tcp://127.0.0.1-5600"])


def test_unknown_schema_is_refused_with_the_version(publisher):
    sub = StreamSubscriber([publisher.endpoint])
    sub.start()
    try:
        publisher.submit(hello())
        assert sub.wait_until(lambda s: s.states[publisher.endpoint].next_seq is not None, 5)
        publisher.submit(p.Heartbeat(instance_id="i0", time=0.0, schema=42))
        assert sub.wait_until(lambda s: any("version 42" in e for e in s.errors), 5)
    finally:
        sub.stop()
