"""In-engine DP routing on real SGLang: ``--dp-size 2 --block-dp-policy block`` (one shared
server, H100 speed emulated at TIME_SCALE), the refusals at start, and stock SGLang without
the flag. Servers run one at a time (a --dp-size 2 server holds ≈ 5 GB): the stock one first,
then the shared block one."""

import json
import threading
import time
import urllib.request

import pytest

from block_sgl.hooks.flags import DP_POLICIES
from block_sgl.router.ingest import StreamSubscriber
from block_sgl.testing.cluster import ClusterConfig, ClusterError, LocalCluster, free_port, port_in_use

from ..conftest import EMULATED_PROFILE, TIME_SCALE

START_TIMEOUT_S = 600.0  # two ranks load on a shared 2-core machine
pytestmark = [pytest.mark.slow,  # ≈ 4 server starts: 2.5 min idle, ≈ 10 min on a busy box
              pytest.mark.timeout(START_TIMEOUT_S + 300)]  # a server start counts for a test


def post(url, body, timeout=180):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def dp_publish_endpoint(ranks=2):
    """A loopback endpoint whose ports for every rank (PORT+r) and replay (+1000) are free."""
    while True:
        port = free_port()
        ports = [port + r for r in range(ranks)] + [port + 1000 + r for r in range(ranks)]
        if max(ports) < 65536 and not any(port_in_use(q) for q in ports[1:]):
            return f"tcp://127.0.0.1:{port}"


def dp_config(log_dir, *extra, env=()):
    return ClusterConfig(instances=1, emulate=EMULATED_PROFILE, time_scale=TIME_SCALE,
                         extra_args=("--dp-size", "2") + tuple(extra), env=tuple(env),
                         log_dir=str(log_dir), start_timeout_s=START_TIMEOUT_S)


def generate(url, ids, max_new=4, **extra):
    body = {"input_ids": list(ids), "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True,
                                                        "temperature": 0}, **extra}
    meta = post(f"{url}/generate", body)["meta_info"]
    return meta["dp_rank"], meta["cached_tokens"]


def prompt(seed, n):
    return [(seed * 7919 + k * 31) % 30000 + 100 for k in range(n)]


# -- stock SGLang (runs first: one server at a time) ------------------------------------------

def test_without_the_flag_sglang_dispatches_as_stock_round_robin(tmp_path):
    """Plugin installed, publishing on, no --block-dp-policy: SGLang's default round robin."""
    c = LocalCluster(dp_config(tmp_path, env=(("BLOCK_SGL_PUBLISH", dp_publish_endpoint()),)))
    with c:
        ids = prompt(1, 600)
        ranks = [generate(c.urls[0], ids)[0] for _ in range(4)]
        log = c.instances[0].log_path.read_text()
    assert ranks in ([0, 1, 0, 1], [1, 0, 1, 0])  # alternates even though the prompt is cached
    assert "block_sgl DP routing" not in log and "block_sgl publishing" in log


def test_bad_policy_name_refuses_to_start_listing_the_valid_ones(tmp_path):
    bad = LocalCluster(dp_config(tmp_path / "name", "--block-dp-policy", "fastest",
                                 env=(("BLOCK_SGL_PUBLISH", dp_publish_endpoint()),)))
    with pytest.raises(ClusterError) as err:
        bad.start()
    assert "BLOCK_SGL_DP_POLICY='fastest'" in str(err.value)
    assert "valid values: " + ", ".join(DP_POLICIES) in str(err.value)
    assert bad.instances[0].process is None  # torn down after the failed start
    # (a conflicting --load-balance-method and a missing --block-publish are refused by the same
    # from_cli_args hook: tests/unit/test_dp_policy.py)


# -- the shared --block-dp-policy block server ------------------------------------------------

@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    endpoint = dp_publish_endpoint()
    c = LocalCluster(dp_config(tmp_path_factory.mktemp("dp-block"), "--block-dp-policy", "block",
                               env=(("BLOCK_SGL_PUBLISH", endpoint),)))
    with c:
        host, port = endpoint.rsplit(":", 1)
        endpoints = [f"{host}:{int(port) + r}" for r in range(2)]
        sub = StreamSubscriber(endpoints, stale_after_s=3.0)
        sub.start()
        try:
            assert sub.wait_until(lambda s: s.stale() == [], 30), sub.errors
            yield c, sub, endpoints
        finally:
            sub.stop()


def test_block_policy_dispatches_and_sets_total_tokens(dp_server):
    c, sub, _ = dp_server
    info = get(f"{c.urls[0]}/server_info")
    assert info.get("load_balance_method", "total_tokens") == "total_tokens"
    ranks = {generate(c.urls[0], prompt(100 + k, 300))[0] for k in range(4)}
    assert ranks <= {0, 1}
    log = c.instances[0].log_path.read_text()
    assert "block_sgl DP routing active: policy block over 2 DP ranks" in log
    assert "block_sgl DP routing failed" not in log  # no fallback to total_tokens


def test_repeated_long_prefix_goes_to_the_rank_that_cached_it(dp_server):
    c, _, _ = dp_server
    for seeded_rank, seed in ((1, 11), (0, 12)):
        shared = prompt(seed, 2048)
        rank, _ = generate(c.urls[0], shared + [5], routed_dp_rank=seeded_rank)
        assert rank == seeded_rank  # routed_dp_rank is honoured
        for k in range(3):
            rank, cached = generate(c.urls[0], shared + [6 + k])
            assert rank == seeded_rank and cached >= 2048 - 16, (k, rank, cached)


def test_busy_rank_is_avoided(dp_server):
    c, sub, endpoints = dp_server
    long_done = []

    def occupy(k):
        long_done.append(generate(c.urls[0], prompt(500 + k, 1500), max_new=150, routed_dp_rank=0))

    threads = [threading.Thread(target=occupy, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        busy = sub.states[endpoints[0]]
        assert sub.wait_until(lambda s: busy.snapshot is not None and len(busy.snapshot.running) >= 4, 60)
        ranks = [generate(c.urls[0], prompt(900 + k, 400))[0] for k in range(4)]
        assert ranks == [1, 1, 1, 1]
    finally:
        for t in threads:
            t.join(300)
    assert [r for r, _ in long_done] == [0] * 6
