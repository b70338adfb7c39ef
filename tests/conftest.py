"""Shared fixtures. Integration tests share ONE real SGLang cluster per session (a server takes
~20-45 s to start on the CI machine)."""

import importlib.util
import time
import warnings

import pytest

from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port, port_in_use

EMULATED_PROFILE = "h100-llama2-7b"
TIME_SCALE = 6.0
"""Emulated steps must outlast the tiny model's real CPU forward: prefill costs ≈ 70 µs/token of
CPU here, only ≈ 20 % under the H100 profile × 4 (one CI run overshot at 4×); × 6 leaves ≈ 1.8×.
(Measured with the 2-layer tiny model served in float16; the 1-layer float32 model with one
torch thread per instance prefills 2048 tokens in ≈ 45–65 ms, so × 6 now leaves ≈ 4×.)"""
STRICT_HOOKS = (("BLOCK_SGL_STRICT", "1"),)
"""Shared test-bed instances refuse to start when block_sgl's hooks cannot (e.g. the publish
port was taken): the start fails with the log, instead of later tests timing out on a silent
stream."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
    # The e2e smoke test (its own 2-instance cluster and routers, minutes) runs after every
    # other integration test: the tests of the shared cluster's streams then never follow it.
    # (In the CI run of 2026-11-28 every stream test that came after it timed out on a silent
    # stream of the shared cluster while its instances kept serving; not reproduced locally,
    # cold or warm. Those tests now print the subscriber's view and LocalCluster.diagnose().)
    items.sort(key=lambda item: item.path.name == "test_e2e_smoke.py")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, request):
    """Two real SGLang 0.5.23 servers (tiny model, CPU), H100 speed emulated at TIME_SCALE (6x).

    A watch subscribes to both streams for the whole session: the start fails unless both are
    fresh, and the first test after which a stream has gone silent is reported (a warning in
    pytest's summary) — see ``_shared_stream_watch``."""
    from block_sgl.router.ingest import StreamSubscriber

    if importlib.util.find_spec("sglang") is None:
        pytest.fail("integration tests need SGLang: run scripts/setup.sh")
    publish = publish_endpoints(2)
    config = ClusterConfig(instances=2, emulate=EMULATED_PROFILE, time_scale=TIME_SCALE,
                           log_dir=str(tmp_path_factory.mktemp("cluster-logs")),
                           env=STRICT_HOOKS,
                           per_instance_env=tuple((("BLOCK_SGL_PUBLISH", e),) for e in publish))
    with LocalCluster(config) as c:
        c.publish_endpoints = publish
        watch = StreamSubscriber(publish, stale_after_s=WATCH_STALE_S)
        watch.start()
        try:
            assert watch.wait_until(lambda s: s.stale() == [], 60), \
                f"{stream_report(watch)}\n{c.diagnose()}"
            c.stream_watch = watch
            request.session.block_sgl_cluster = c
            yield c
        finally:
            request.session.block_sgl_cluster = None
            watch.stop()


WATCH_STALE_S = 5.0
"""An idle instance heartbeats every 1-2 s (--sleep-on-idle polls once a second)."""


@pytest.fixture(autouse=True)
def _shared_stream_watch(request):
    """After each test: if a stream of the shared cluster has gone silent, warn once, naming the
    test after which it was first seen silent, with what the watch received and the cluster's
    state (diagnosis for CI runs, whose instance logs are gone)."""
    yield
    session = request.session
    c = getattr(session, "block_sgl_cluster", None)
    if c is None or getattr(session, "block_sgl_stream_silent", False):
        return
    if c.stream_watch.stale():
        session.block_sgl_stream_silent = True
        warnings.warn(pytest.PytestWarning(
            f"a block_sgl stream of the shared cluster went silent; first seen after "
            f"{request.node.nodeid}:\n{stream_report(c.stream_watch)}\n{c.diagnose()}"))


def publish_endpoints(n):
    """n loopback publish endpoints whose replay ports (+1000) are free too."""
    out = []
    while len(out) < n:
        port = free_port()
        if port + 1000 < 65536 and not port_in_use(port + 1000) and all(
                abs(port - int(e.rsplit(":", 1)[1])) > 2 for e in out):
            out.append(f"tcp://127.0.0.1:{port}")
    return out


def stream_report(sub) -> str:
    """Per endpoint of a StreamSubscriber: what it has received (for failing tests' messages)."""
    now = time.monotonic()
    lines = [f"subscriber errors: {sub.errors}"]
    for endpoint, s in sub.states.items():
        age = f"{now - s.last_message_at:.1f} s ago" if s.last_message_at else "never"
        port = int(endpoint.rsplit(":", 1)[1])
        # whether anything still listens there (the publisher's PUB and replay ROUTER sockets)
        bound = [p for p in (port, port + 1000) if port_in_use(p)]
        lines.append(f"{endpoint}: hello={s.hello is not None} snapshot={s.snapshot is not None} "
                     f"last message {age}, next_seq={s.next_seq}, full_states={s.full_states}, "
                     f"gaps_repaired={s.gaps_repaired}; ports in use: {bound}")
    return "\n".join(lines)
