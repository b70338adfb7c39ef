"""Shared fixtures. Integration tests share ONE real SGLang cluster per session (a server takes
~20-45 s to start on the CI machine)."""

import importlib.util

import pytest

from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port, port_in_use

EMULATED_PROFILE = "h100-llama2-7b"
TIME_SCALE = 4.0
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
def cluster(tmp_path_factory):
    """Two real SGLang 0.5.23 servers (tiny model, CPU), H100 speed emulated at 4x time scale."""
    if importlib.util.find_spec("sglang") is None:
        pytest.fail("integration tests need SGLang: run scripts/setup.sh")
    publish = publish_endpoints(2)
    config = ClusterConfig(instances=2, emulate=EMULATED_PROFILE, time_scale=TIME_SCALE,
                           log_dir=str(tmp_path_factory.mktemp("cluster-logs")),
                           env=STRICT_HOOKS,
                           per_instance_env=tuple((("BLOCK_SGL_PUBLISH", e),) for e in publish))
    with LocalCluster(config) as c:
        c.publish_endpoints = publish
        yield c


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
    import time

    now = time.monotonic()
    lines = [f"subscriber errors: {sub.errors}"]
    for endpoint, s in sub.states.items():
        age = f"{now - s.last_message_at:.1f} s ago" if s.last_message_at else "never"
        lines.append(f"{endpoint}: hello={s.hello is not None} snapshot={s.snapshot is not None} "
                     f"last message {age}, next_seq={s.next_seq}, full_states={s.full_states}, "
                     f"gaps_repaired={s.gaps_repaired}")
    return "\n".join(lines)
