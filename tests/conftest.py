"""Shared fixtures. Integration tests share ONE real SGLang cluster per session (a server takes
~20-45 s to start on the CI machine)."""

import importlib.util

import pytest

from block_sgl.testing.cluster import ClusterConfig, LocalCluster

EMULATED_PROFILE = "h100-llama2-7b"
TIME_SCALE = 4.0


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Two real SGLang 0.5.23 servers (tiny model, CPU), H100 speed emulated at 4x time scale."""
    if importlib.util.find_spec("sglang") is None:
        pytest.fail("integration tests need SGLang: run scripts/setup.sh")
    config = ClusterConfig(instances=2, emulate=EMULATED_PROFILE, time_scale=TIME_SCALE,
                           log_dir=str(tmp_path_factory.mktemp("cluster-logs")))
    with LocalCluster(config) as c:
        yield c
