"""In-engine DP routing (``block_sgl.hooks.dp``) without SGLang: a fake DataParallelController,
synthetic rank streams, the router core's stream-side accounting, and the settings checks."""

import argparse
import time
from array import array
from types import SimpleNamespace

import pytest

from block_sgl import protocol as p
from block_sgl.hooks import dp, require_total_tokens
from block_sgl.hooks.flags import DP_POLICIES, HookSettings, SettingsError, add_cli_args, export_cli_args
from block_sgl.page_hash import page_hashes
from block_sgl.router.config import RouterConfig
from block_sgl.router.core import Router
from block_sgl.router.ingest import InstanceState

PUBLISH = "tcp://127.0.0.1:7100"
ENDPOINTS = ["tcp://127.0.0.1:7100", "tcp://127.0.0.1:7101", "tcp://127.0.0.1:7102"]


class FakeSubscriber:
    def __init__(self, endpoints, stale_after_s, on_cache_event, on_steps, on_snapshot=None):
        self.states = {e: InstanceState(endpoint=e) for e in endpoints}
        self.on_cache_event, self.on_steps, self.on_snapshot = on_cache_event, on_steps, on_snapshot

    def start(self):
        pass

    def stop(self):
        pass


def hello(i):
    return p.Hello(instance_id=f"i{i}", url="http://x:1", model="m", page_size=16,
                   max_total_num_tokens=65536, max_running_requests=64, chunked_prefill_size=4096,
                   max_prefill_tokens=16384, schedule_policy="fcfs", dp_rank=i,
                   hardware_profile="h100-llama2-7b", time_scale=1.0)


def cols(rids, input_len=1000, output_len=0):
    n = len(rids)
    return p.RequestColumns(rid=list(rids), input_len=[input_len] * n, prefix_len=[0] * n,
                            output_len=[output_len] * n if isinstance(output_len, int) else output_len,
                            max_new_tokens=[512] * n, ignore_eos=[False] * n)


def snapshot(i, running=(), waiting=(), output_len=10):
    return p.Snapshot(instance_id=f"i{i}", time=time.time(), forward_ct=1,
                      running=cols(running, output_len=output_len), waiting=cols(waiting),
                      free_tokens=60000, evictable_tokens=0, max_total_num_tokens=65536,
                      new_token_ratio=0.7)


def feed(router, i, snap):
    st = router.subscriber.states[ENDPOINTS[i]]
    st.hello = hello(i)
    st.snapshot = snap
    st.last_message_at = time.monotonic()
    if router.subscriber.on_snapshot is not None:
        router.subscriber.on_snapshot(ENDPOINTS[i], snap)


class FakeController:
    """The parts of SGLang's DataParallelController the hook touches."""

    def __init__(self, n=2):
        self.workers = [f"sock{r}" for r in range(n)]
        self._active_workers = list(range(n))
        self.status = [True] * n
        self.max_req_input_len = 4096
        self.sent = []
        self.original_calls = []

    def maybe_external_dp_rank_routing(self, req):
        if req.routed_dp_rank is not None:
            if req.routed_dp_rank not in self._active_workers:
                raise ValueError(f"DP rank {req.routed_dp_rank} is not active.")
            self.sent.append((req.rid, req.routed_dp_rank))
            return True
        return False

    def send(self, sock, req):
        self.sent.append((req.rid, self.workers.index(sock)))

    def original(self, ctrl, req):
        self.original_calls.append(req.rid)
        self.sent.append((req.rid, 0))


def req(rid, ids, max_new=64, ignore_eos=False, text=None, routed=None):
    return SimpleNamespace(rid=rid, input_ids=array("i", ids), input_text=text,
                           sampling_params=SimpleNamespace(max_new_tokens=max_new, ignore_eos=ignore_eos),
                           routed_dp_rank=routed)


def make(policy="block", n=2):
    settings = HookSettings.from_env({"BLOCK_SGL_PUBLISH": PUBLISH, "BLOCK_SGL_DP_POLICY": policy})

    def factory(config, predictor):
        return Router(config, length_predictor=predictor, subscriber_factory=FakeSubscriber)

    routing = dp.DPRouting(settings, router_factory=factory)
    ctrl = FakeController(n)
    router = routing.ensure_router(ctrl)
    for i in range(n):
        feed(router, i, snapshot(i))
    return routing, ctrl, router


def dispatch(routing, ctrl, r):
    routing.dispatch(ctrl, r, ctrl.original, ctrl.send)
    return ctrl.sent[-1][1]


def test_router_over_synthetic_rank_urls_and_the_ranks_streams():
    routing, ctrl, router = make()
    assert [w.url for w in router.workers] == ["http://dp-rank-0.invalid:1", "http://dp-rank-1.invalid:1"]
    assert [w.endpoint for w in router.workers] == ENDPOINTS[:2]
    assert router.config.completions_from_stream


def test_block_avoids_the_busy_rank_and_counts_decisions():
    routing, ctrl, router = make()
    feed(router, 0, snapshot(0, running=[f"a{k}" for k in range(30)], waiting=[f"w{k}" for k in range(20)]))
    assert dispatch(routing, ctrl, req("r1", range(1, 801))) == 1
    assert routing.per_rank == [0, 1] and not routing.fallbacks


def test_repeated_prefix_goes_to_the_rank_that_caches_it():
    routing, ctrl, router = make()
    ids = list(range(1, 3001))
    router.subscriber.on_cache_event(ENDPOINTS[1], p.CacheStored(
        instance_id="i1", block_hashes=page_hashes(ids, 16), parent_block_hash=None, block_size=16))
    assert dispatch(routing, ctrl, req("r1", ids + [7, 8, 9])) == 1


def test_only_active_ranks_are_candidates():
    routing, ctrl, router = make(policy="round_robin", n=3)
    ctrl._active_workers = [0, 2]
    ranks = [dispatch(routing, ctrl, req(f"r{k}", range(1, 50))) for k in range(4)]
    assert set(ranks) == {0, 2}
    ctrl.status[2] = False  # reported down (update_active_ranks)
    assert {dispatch(routing, ctrl, req(f"s{k}", range(1, 50))) for k in range(3)} == {0}


def test_round_robin_alternates_and_least_tokens_balances():
    routing, ctrl, _ = make(policy="round_robin")
    assert [dispatch(routing, ctrl, req(f"r{k}", range(1, 50))) for k in range(4)] == [0, 1, 0, 1]
    routing, ctrl, router = make(policy="least_tokens")
    feed(router, 0, snapshot(0, running=["a"]))
    assert dispatch(routing, ctrl, req("r", range(1, 50))) == 1


def test_routed_dp_rank_is_honoured_and_counted_as_pending_there():
    routing, ctrl, router = make(policy="least_tokens")
    dispatch(routing, ctrl, req("ext", range(1, 2001), routed=0))
    assert ctrl.sent[-1] == ("ext", 0) and routing.external == 1 and routing.per_rank == [0, 0]
    assert len(router.workers[0].pending) == 1
    # The pending prompt on rank 0 makes rank 1 the least loaded one.
    assert dispatch(routing, ctrl, req("r", range(5000, 5100))) == 1
    with pytest.raises(ValueError, match="not active"):  # SGLang's own error, left as it is
        routing.dispatch(ctrl, req("bad", range(1, 9), routed=5), ctrl.original, ctrl.send)


def test_an_exception_falls_back_to_sglang_total_tokens_logged_once(caplog, monkeypatch):
    routing, ctrl, router = make()

    def boom(*a, **k):
        raise KeyError("broken")
    monkeypatch.setattr(router, "decide", boom)
    with caplog.at_level("ERROR", logger="block_sgl.hooks.dp"):
        for k in range(3):
            routing.dispatch(ctrl, req(f"r{k}", range(1, 50)), ctrl.original, ctrl.send)
    assert ctrl.original_calls == ["r0", "r1", "r2"] and len(ctrl.sent) == 3
    assert routing.fallbacks == {"decide:KeyError": 3}
    assert sum("falling back" in r.message for r in caplog.records) == 1


def test_a_failing_router_start_falls_back_and_retries_later():
    settings = HookSettings.from_env({"BLOCK_SGL_PUBLISH": PUBLISH, "BLOCK_SGL_DP_POLICY": "block"})
    now = [0.0]
    calls = []

    def factory(config, predictor):
        calls.append(1)
        raise OSError("no streams")
    routing = dp.DPRouting(settings, router_factory=factory, clock=lambda: now[0])
    ctrl = FakeController()
    for k in range(3):
        routing.dispatch(ctrl, req(f"r{k}", range(1, 50)), ctrl.original, ctrl.send)
    assert len(ctrl.original_calls) == 3 and len(calls) == 1  # not rebuilt on every request
    now[0] += dp.REBUILD_AFTER_S + 1
    routing.dispatch(ctrl, req("r9", range(1, 50)), ctrl.original, ctrl.send)
    assert len(calls) == 2


def test_request_fields_and_cache_aware_text():
    text, ids, max_new, ignore_eos = dp.request_fields(req("r", [5, 6, 7], max_new=None, ignore_eos=True))
    assert text is None and ids == [5, 6, 7] and max_new == dp.DEFAULT_MAX_NEW_TOKENS and ignore_eos
    assert dp.ids_as_text([65, 66, 67]) == "ABC"
    routing, ctrl, router = make(policy="cache_aware")
    rv, _ = routing.request_view(router, req("r", [65, 66], text=None))
    assert rv.text == "AB" and rv.input_len == 2
    rv, _ = routing.request_view(router, req("r", [65, 66], text="hello"))
    assert rv.text == "hello"
    # cache_aware keeps sending a shared prefix to the same rank.
    first = dispatch(routing, ctrl, req("a", range(100, 400)))
    assert all(dispatch(routing, ctrl, req(f"b{k}", list(range(100, 400)) + [k])) == first for k in range(3))


def test_original_method_unwraps_hook_wrappers():
    import functools

    def original(self, req):
        return "sglang"

    @functools.wraps(original)
    def wrapper(*a, **k):
        return "hook"
    wrapper.__wrapped__ = original
    cls = type("C", (), {dp.HOOKED_METHOD: wrapper})
    assert dp.original_method(cls) is original


# -- the router core's stream-side accounting (RouterConfig options used in-engine) ---------

def stream_router(policy="cache_aware", **kw):
    router = Router(RouterConfig(worker_urls=("http://a:1", "http://b:1"), policy=policy, **kw),
                    subscriber_factory=FakeSubscriber)
    router.attach_streams(ENDPOINTS[:2])
    for i in range(2):
        feed(router, i, snapshot(i))
    return router


def test_in_flight_from_stream_is_running_waiting_and_pending():
    router = stream_router(completions_from_stream=True)
    feed(router, 0, snapshot(0, running=["a", "b"], waiting=["c"]))
    rv = router.request_view(text="x", token_ids=list(range(1, 40)), max_new_tokens=8, ignore_eos=False)
    d = router.decide(rv, list(range(1, 40)), exclude=frozenset({1}))
    router.dispatched(d)
    v0 = router.decide(rv, list(range(1, 40))).views[0]
    assert v0.in_flight == 4  # 2 running + 1 waiting + 1 pending
    legacy = stream_router()
    feed(legacy, 0, snapshot(0, running=["a", "b"], waiting=["c"]))
    assert legacy.decide(rv, list(range(1, 40))).views[0].in_flight == 0  # the router's own count


def test_a_request_seen_only_between_two_decisions_ends_its_pending_entry():
    """The controller decides rarely; a request that came and went between two decisions
    (never in the latest snapshot) is still matched, and its output length is learnt."""
    ids = list(range(1, 40))
    for follow in (True, False):
        router = stream_router(completions_from_stream=follow, policy="least_requests")
        rv = router.request_view(text="x", token_ids=ids, max_new_tokens=8, ignore_eos=False)
        d = router.decide(rv, ids, exclude=frozenset({1}))
        router.dispatched(d)
        time.sleep(0.001)
        snap = snapshot(0, running=["r1"], output_len=[3])
        snap.running.input_len = [39]
        feed(router, 0, snap)  # the subscriber sees it...
        feed(router, 0, snapshot(0))  # ...and it is gone before the next decision
        v0 = router.decide(rv, ids).views[0]
        if follow:
            assert v0.waiting == 0 and not router.workers[0].pending and v0.in_flight == 0
            assert router.completed_requests == 1 and router.mean_output_len() == 3
        else:  # the HTTP router's accounting: finished() ends it, the snapshots never showed it
            assert v0.waiting == 1 and router.completed_requests == 0


def test_output_len_learnt_from_requests_leaving_the_snapshots():
    router = stream_router(completions_from_stream=True)
    rv = router.request_view(text="x", token_ids=[1, 2], max_new_tokens=8, ignore_eos=False)
    feed(router, 0, snapshot(0, running=["a", "b"], output_len=[100, 50]))
    feed(router, 0, snapshot(0, running=["b"], output_len=[60]))
    router.decide(rv, [1, 2])
    assert router.completed_requests == 1 and router.mean_output_len() == 100
    feed(router, 0, snapshot(0))
    router.decide(rv, [1, 2])
    assert router.completed_requests == 2 and router.mean_output_len() == 80
    off = stream_router()
    feed(off, 0, snapshot(0, running=["a"], output_len=[100]))
    off.decide(rv, [1, 2])
    feed(off, 0, snapshot(0))
    off.decide(rv, [1, 2])
    assert off.completed_requests == 0


# -- settings ---------------------------------------------------------------------------------

def test_dp_policy_setting_validation():
    env = {"BLOCK_SGL_PUBLISH": PUBLISH}
    assert HookSettings.from_env({**env, "BLOCK_SGL_DP_POLICY": "block_ttft"}).dp_policy == "block_ttft"
    with pytest.raises(SettingsError, match="valid values: " + ", ".join(DP_POLICIES)):
        HookSettings.from_env({**env, "BLOCK_SGL_DP_POLICY": "fastest"})
    with pytest.raises(SettingsError, match="needs the DP ranks' state streams.*BLOCK_SGL_PUBLISH"):
        HookSettings.from_env({"BLOCK_SGL_DP_POLICY": "block"})
    with pytest.raises(SettingsError, match="BLOCK_SGL_DP_LENGTH_MODEL.*not a length-model directory"):
        HookSettings.from_env({**env, "BLOCK_SGL_DP_POLICY": "block", "BLOCK_SGL_DP_LENGTH_MODEL": "/nonexistent"})
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    out = {}
    s = export_cli_args(parser.parse_args(["--block-dp-policy", "cache_aware", "--block-publish", PUBLISH]), out)
    assert out["BLOCK_SGL_DP_POLICY"] == "cache_aware" and s.dp_policy == "cache_aware"


def test_load_balance_method_is_set_or_refused():
    args = SimpleNamespace(dp_size=2, attn_dp_size=1, load_balance_method="auto", disaggregation_mode="null")
    require_total_tokens(args, "block")
    assert args.load_balance_method == "total_tokens"
    require_total_tokens(args, "block")  # total_tokens given explicitly: fine
    args.load_balance_method = "round_robin"
    with pytest.raises(SettingsError, match="--load-balance-method round_robin conflicts"):
        require_total_tokens(args, "block")
    with pytest.raises(SettingsError, match="--dp-size N"):
        require_total_tokens(SimpleNamespace(dp_size=1, attn_dp_size=1, load_balance_method="auto"), "block")


def test_every_dp_policy_is_a_router_policy():
    from block_sgl.router.policies import POLICY_NAMES, PREDICTIVE_POLICIES

    assert set(DP_POLICIES) <= set(POLICY_NAMES)
    assert set(PREDICTIVE_POLICIES) <= set(DP_POLICIES)  # every fastsim policy works in-engine too
