"""The instance hooks on real SGLang: the state stream agrees with SGLang itself."""

import json
import signal
import socket
import threading
import time
import urllib.request

import pytest

from block_sgl.page_hash import page_hashes
from block_sgl.router.ingest import StreamSubscriber
from block_sgl.router.prefix_index import PrefixIndex
from block_sgl.testing.cluster import ClusterConfig, ClusterError, LocalCluster

from ..conftest import TIME_SCALE, publish_endpoints, stream_report


def post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def stream(cluster):
    index = PrefixIndex()
    sub = StreamSubscriber(cluster.publish_endpoints, stale_after_s=3.0, on_cache_event=index.apply)
    sub.start()
    assert sub.wait_until(lambda s: s.stale() == [], 30), \
        f"{stream_report(sub)}\n{cluster.diagnose()}"
    yield sub, index
    sub.stop()


def quiescent(state):
    s = state.snapshot
    return s is not None and len(s.running) == 0 and len(s.waiting) == 0 and s.chunked_rid is None


def test_hello_describes_the_instance(cluster, stream):
    sub, _ = stream
    for url, endpoint in zip(cluster.urls, cluster.publish_endpoints):
        hello = sub.states[endpoint].hello
        assert hello.url == url and hello.page_size == 16
        assert hello.max_total_num_tokens == 65536 and hello.chunked_prefill_size == 4096
        assert hello.hardware_profile == "h100-llama2-7b" and hello.time_scale == TIME_SCALE


def test_quiescent_snapshot_agrees_with_v1_loads(cluster, stream):
    sub, _ = stream
    url, endpoint = cluster.urls[0], cluster.publish_endpoints[0]
    post(f"{url}/generate", {"input_ids": list(range(900, 1000)), "sampling_params": {"max_new_tokens": 4}})
    state = sub.states[endpoint]
    assert sub.wait_until(lambda s: quiescent(state), 10)
    time.sleep(1.2)  # one idle heartbeat later the snapshot is of the settled scheduler
    snap = state.snapshot
    load = get(f"{url}/v1/loads")["loads"][0]
    assert (len(snap.running), len(snap.waiting)) == (load["num_running_reqs"], load["num_waiting_reqs"])
    assert snap.max_total_num_tokens == load["max_total_num_tokens"]
    assert snap.max_total_num_tokens - snap.free_tokens - snap.evictable_tokens == load["num_used_tokens"]
    assert snap.evictable_tokens > 0  # the finished request's pages stay in the radix cache


def test_running_request_appears_with_growing_output(cluster, stream):
    sub, _ = stream
    url, endpoint = cluster.urls[1], cluster.publish_endpoints[1]
    ids = list(range(500, 800))
    done = threading.Event()
    t = threading.Thread(target=lambda: (post(f"{url}/generate", {
        "input_ids": ids, "rid": "watch-me",
        "sampling_params": {"max_new_tokens": 60, "ignore_eos": True}}), done.set()))
    t.start()
    state = sub.states[endpoint]
    seen = []

    def observe(_):
        s = state.snapshot
        if s is not None and "watch-me" in s.running.rid:
            i = s.running.rid.index("watch-me")
            seen.append((s.running.input_len[i], s.running.output_len[i], s.running.max_new_tokens[i],
                         s.running.ignore_eos[i]))
        return done.is_set()

    assert sub.wait_until(observe, 60)
    t.join()
    assert seen, "the request never appeared in a snapshot"
    assert {x[0] for x in seen} == {300} and {x[2] for x in seen} == {60} and all(x[3] for x in seen)
    outputs = [x[1] for x in seen]
    assert outputs == sorted(outputs) and outputs[-1] - outputs[0] >= 20


def test_the_snapshot_after_a_prefill_step_shows_the_prefilled_request(cluster, stream):
    """The snapshot published with a prefill step's record shows the request that step
    prefilled, as running with its first token (SGLang merges it into running_batch only at the
    next scheduling round, after the hook)."""
    sub, _ = stream
    url, endpoint = cluster.urls[0], cluster.publish_endpoints[0]
    assert sub.wait_until(lambda s: quiescent(sub.states[endpoint]), 10)
    events = []  # in stream order (one subscriber thread): steps records, then their snapshot
    watcher = StreamSubscriber(
        [endpoint],
        on_steps=lambda e, m: events.append(("steps", list(zip(m.forward_mode, m.num_reqs)))),
        on_snapshot=lambda e, snap: events.append(("snapshot", snap)))
    watcher.start()
    try:
        assert watcher.wait_until(lambda s: not s.stale(), 30)
        post(f"{url}/generate", {"input_ids": list(range(3000, 3300)), "rid": "just-prefilled",
                                 "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}})
        prefills = lambda: [k for k, (kind, x) in enumerate(events)  # noqa: E731
                            if kind == "steps" and x[-1] == ("extend", 1)]
        assert watcher.wait_until(lambda s: any(k + 1 < len(events) for k in prefills()), 10), \
            events
    finally:
        watcher.stop()
    k = prefills()[0]
    kind, snap = events[k + 1]
    assert kind == "snapshot", events[k:k + 2]
    assert "just-prefilled" in snap.running.rid, (snap.running, snap.waiting)
    assert snap.running.output_len[snap.running.rid.index("just-prefilled")] == 1


def test_repeated_prompt_shows_its_cached_prefix_and_router_hashes_match(cluster, stream):
    sub, index = stream
    url, endpoint = cluster.urls[0], cluster.publish_endpoints[0]
    ids = [(i * 104729) % 25000 + 50 for i in range(1000)]
    hashes = page_hashes(ids, 16)
    assert index.matched_pages(endpoint, hashes) == 0
    post(f"{url}/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}})
    # every full page of the prompt is stored, under exactly the hashes computed here
    assert sub.wait_until(lambda s: index.matched_pages(endpoint, hashes) == len(hashes), 10), \
        (index.matched_pages(endpoint, hashes), len(hashes))
    state = sub.states[endpoint]
    done = threading.Event()
    t = threading.Thread(target=lambda: (post(f"{url}/generate", {
        "input_ids": ids, "rid": "again", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}),
        done.set()))
    t.start()
    prefix = []

    def observe(_):
        s = state.snapshot
        if s is not None and "again" in s.running.rid:
            prefix.append(s.running.prefix_len[s.running.rid.index("again")])
        return done.is_set()

    assert sub.wait_until(observe, 60)
    t.join()
    assert prefix and min(prefix) >= 1000 - 16


def test_flush_cache_clears_the_index(cluster, stream):
    sub, index = stream
    url, endpoint = cluster.urls[1], cluster.publish_endpoints[1]
    ids = list(range(2000, 2400))
    post(f"{url}/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}})
    assert sub.wait_until(lambda s: index.matched_pages(endpoint, page_hashes(ids, 16)) == 25, 10)
    state = sub.states[endpoint]
    assert sub.wait_until(lambda s: quiescent(state), 10)
    urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", method="POST"), timeout=30).read()
    assert sub.wait_until(lambda s: index.size(endpoint) == 0, 10)


def test_late_subscriber_recovers_the_full_state(cluster, stream):
    sub, index = stream
    endpoint = cluster.publish_endpoints[0]
    late_index = PrefixIndex()
    late = StreamSubscriber([endpoint], on_cache_event=late_index.apply)
    late.start()
    try:
        state = late.states[endpoint]
        assert late.wait_until(lambda s: state.snapshot is not None and state.hello is not None, 10)
        assert state.full_states == 1
        assert late.wait_until(lambda s: late_index.size(endpoint) == index.size(endpoint) > 0, 10)
    finally:
        late.stop()


def test_sglang_flag_is_listed_in_help():
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}).stdout
    for flag in ("--block-publish", "--block-strict", "--block-snapshot-interval-ms"):
        assert flag in out
    wrapper = subprocess.run([sys.executable, "-m", "block_sgl.launch_server", "--help"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"})
    assert wrapper.returncode == 0 and "--block-publish" in wrapper.stdout and "--model-path" in wrapper.stdout


@pytest.fixture(scope="module")
def faulty_instance(tmp_path_factory):
    """One instance whose snapshot code raises on its first 5 calls (BLOCK_SGL_FAULT_INJECT)."""
    endpoint = publish_endpoints(1)[0]
    config = ClusterConfig(instances=1, log_dir=str(tmp_path_factory.mktemp("faulty")),
                           env=(("BLOCK_SGL_PUBLISH", endpoint), ("BLOCK_SGL_FAULT_INJECT", "snapshot:5"),
                                ("BLOCK_SGL_HEARTBEAT_INTERVAL_MS", "200")))
    with LocalCluster(config) as c:
        yield c, endpoint


def test_exception_in_snapshot_code_does_not_stop_serving_and_dead_instance_goes_stale(faulty_instance):
    cluster, endpoint = faulty_instance
    sub = StreamSubscriber([endpoint], stale_after_s=1.0)
    sub.start()
    try:
        state = sub.states[endpoint]
        assert sub.wait_until(lambda s: state.hello is not None, 15)
        for _ in range(3):
            out = post(f"{cluster.urls[0]}/generate", {"text": "still serving?",
                                                        "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
            assert out["meta_info"]["completion_tokens"] == 5
        log = cluster.instances[0].log_path.read_text()
        assert log.count("block_sgl hook 'snapshot' failed") == 1  # logged once per kind
        # After the faults, snapshots flow again and report them.
        assert sub.wait_until(lambda s: state.snapshot is not None and not state.is_stale(1.0), 10)
        assert state.snapshot.errors_total == 5
        cluster.stop_instance(0, sig=signal.SIGKILL)  # a crash, not a clean shutdown
        killed_at = time.monotonic()
        assert sub.wait_until(lambda s: state.is_stale(1.0), 5)
        assert time.monotonic() - killed_at < 1.0 + 0.5
    finally:
        sub.stop()


def test_unbindable_endpoint_disables_block_sgl_but_serves(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env = (("BLOCK_SGL_PUBLISH", f"tcp://127.0.0.1:{port}"),)
        with LocalCluster(ClusterConfig(instances=1, env=env, log_dir=str(tmp_path / "lenient"))) as c:
            out = post(f"{c.urls[0]}/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 3}})
            assert out["meta_info"]["completion_tokens"] == 3
            log = c.instances[0].log_path.read_text()
            assert f"ERROR block_sgl: cannot publish on tcp://127.0.0.1:{port}" in log
            assert "block_sgl is DISABLED" in log
        strict = LocalCluster(ClusterConfig(instances=1, env=env + (("BLOCK_SGL_STRICT", "1"),),
                                            log_dir=str(tmp_path / "strict")))
        with pytest.raises(ClusterError, match="refusing to start"):
            strict.start()
