"""The routing core over synthetic instance streams (no network): pending accounting, prefix
matching, predictive picks, stale instances, health, provisioning."""

import math
import time

import msgspec
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from block_sgl import protocol as p
from block_sgl.page_hash import page_hashes
from block_sgl.router.config import ConfigError, RouterConfig
from block_sgl.router.core import NoInstanceAvailable, Router
from block_sgl.router.ingest import InstanceState
from block_sgl.router.state import MAX_SNAPSHOT_AGE_S

URLS = ("http://w0:1", "http://w1:1")
ENDPOINTS = ["tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"]


class FakeSubscriber:
    def __init__(self, endpoints, stale_after_s, on_cache_event, on_steps):
        self.states = {e: InstanceState(endpoint=e) for e in endpoints}
        self.on_cache_event, self.on_steps = on_cache_event, on_steps

    def start(self):
        pass

    def stop(self):
        pass


def hello(i):
    return p.Hello(instance_id=f"i{i}", url=URLS[i], model="m", page_size=16,
                   max_total_num_tokens=65536, max_running_requests=64, chunked_prefill_size=4096,
                   max_prefill_tokens=16384, schedule_policy="fcfs",
                   hardware_profile="h100-llama2-7b", time_scale=1.0)


def cols(n, input_len=1000, output_len=0, start=0, max_new=256):
    return p.RequestColumns(rid=[f"r{start + k}" for k in range(n)], input_len=[input_len] * n,
                            prefix_len=[0] * n, output_len=[output_len] * n,
                            max_new_tokens=[max_new] * n, ignore_eos=[True] * n)


def snapshot(i, running=0, waiting=0, **kw):
    return p.Snapshot(instance_id=f"i{i}", time=time.time(), forward_ct=1,
                      running=cols(running, output_len=10, start=1000 * i),
                      waiting=cols(waiting, start=1000 * i + 500),
                      free_tokens=60000, evictable_tokens=0, max_total_num_tokens=65536,
                      new_token_ratio=0.7, **kw)


def make_router(policy="block", clock=time.time, **kw):
    router = Router(RouterConfig(worker_urls=URLS, policy=policy, seed=0, **kw),
                    subscriber_factory=FakeSubscriber, clock=clock)
    router.attach_streams(ENDPOINTS)
    for i, e in enumerate(ENDPOINTS):
        feed(router, i, snapshot(i))
    return router


def feed(router, i, snap):
    st = router.subscriber.states[ENDPOINTS[i]]
    st.hello = hello(i)
    st.snapshot = snap
    st.last_message_at = time.monotonic()


def request(router, n_tokens=800, max_new=100, tokens=None):
    ids = tokens if tokens is not None else list(range(1, n_tokens + 1))
    rv = router.request_view(text="t", token_ids=ids, max_new_tokens=max_new, ignore_eos=True)
    return rv, ids


def test_block_avoids_the_instance_with_a_long_queue():
    router = make_router()
    feed(router, 0, snapshot(0, running=30, waiting=20))
    rv, ids = request(router)
    d = router.decide(rv, ids)
    assert d.worker == 1
    busy, idle = sorted(d.views, key=lambda v: v.index)
    assert busy.predicted_ttft_s > idle.predicted_ttft_s > 0
    assert busy.waiting == 20 and busy.running == 30


def test_dispatched_requests_count_as_pending_until_a_snapshot_shows_them():
    router = make_router(policy="least_requests")
    rv, ids = request(router)
    d = router.decide(rv, ids)
    router.dispatched(d)
    w = router.workers[d.worker]
    v = router.decide(rv, ids).views[d.worker]
    assert v.waiting == 1 and v.queued_prefill_tokens == 800 and w.in_flight == 1
    # The instance's next snapshot shows a new waiting request with that prompt length.
    snap = snapshot(d.worker)
    snap.waiting = cols(1, input_len=800, start=77)
    feed(router, d.worker, snap)
    v = router.decide(rv, ids).views[d.worker]
    assert v.waiting == 1 and not w.pending and w.rid_pred == {"r77": 100}
    router.finished(d, output_tokens=100)
    assert w.in_flight == 0 and router.mean_output_len() == 100


def test_pending_requests_expire_after_their_ttl():
    now = [time.time()]
    router = make_router(policy="least_requests", pending_ttl_s=5, clock=lambda: now[0])
    rv, ids = request(router)
    d = router.decide(rv, ids)
    router.dispatched(d)
    now[0] += 4.9
    assert router.decide(rv, ids).views[d.worker].waiting == 1
    now[0] += 0.2
    v = router.decide(rv, ids).views[d.worker]
    assert v.waiting == 0 and v.queued_prefill_tokens == 0
    assert router.stats["pending_expired"] == 1


def test_fastsim_replays_from_the_snapshot_to_the_decision_with_pending_dispatch_times():
    """The kernel gets, at every decision, the time since the snapshot (the candidate's
    arrival) and when each pending request was dispatched, relative to the snapshot (at it if
    dispatched before: in transit when the snapshot was taken)."""
    t0 = time.time()
    now = [t0]
    router = make_router(policy="least_requests", clock=lambda: now[0])
    snap = msgspec.structs.replace(snapshot(0, running=2), time=t0)
    feed(router, 0, snap)
    rv, ids = request(router)
    w = router.workers[0]
    for dt in (0.2, 0.3):
        now[0] = t0 + dt
        d = router.decide(rv, ids)
        d.worker, d.chosen = 0, d.views[0]
        router.dispatched(d)
    for dt in (0.5, 0.75):  # the same snapshot, later decisions: the arrival moves with them
        now[0] = t0 + dt
        arrays = router._fastsim_arrays(w, snap, False, now[0])
        assert len(arrays) == 8 and arrays[4][4] == pytest.approx(dt)
        assert arrays[7].tolist() == pytest.approx([0.2, 0.3])
        assert arrays[2].shape == (6, 2)
    later = msgspec.structs.replace(snap, time=t0 + 0.25)  # shows neither of them yet
    feed(router, 0, later)
    arrays = router._fastsim_arrays(w, later, False, now[0])
    assert arrays[4][4] == pytest.approx(0.5) and arrays[7].tolist() == pytest.approx([0.0, 0.05])
    stale = router._fastsim_arrays(w, later, True, now[0])  # no usable snapshot: no replay
    assert stale[4][4] == 0.0 and len(stale) == 5
    now[0] = t0 + 60  # a snapshot older than fastsim replays
    assert router._fastsim_arrays(w, later, False, now[0])[4][4] == MAX_SNAPSHOT_AGE_S


def test_cached_prefix_from_cache_events_and_speculative_entries():
    router = make_router(policy="lmetric")
    rv, ids = request(router, 800)
    hashes = page_hashes(ids, 16)
    router.subscriber.on_cache_event(ENDPOINTS[1], p.CacheStored(
        instance_id="i1", block_hashes=hashes[:30], parent_block_hash=None, block_size=16))
    d = router.decide(rv, ids)
    by_index = {v.index: v for v in d.views}
    assert by_index[1].cached_prefix_tokens == 480 and by_index[0].cached_prefix_tokens == 0
    assert d.worker == 1
    # A prompt just sent to w0 counts as cached there (speculatively) until its TTL.
    other, other_ids = request(router, tokens=list(range(5000, 5800)))
    d0 = router.decide(other, other_ids)
    d0.worker, d0.chosen = 0, next(v for v in d0.views if v.index == 0)
    router.dispatched(d0)
    router.remember_prefix(d0)
    again = router.decide(other, other_ids)
    assert {v.index: v for v in again.views}[0].cached_prefix_tokens == 799  # 50 full pages, capped at n-1 (SGLang recomputes the last token)


def test_block_prefers_the_instance_holding_the_prefix_when_loads_are_equal():
    router = make_router()
    rv, ids = request(router, 3000)
    router.subscriber.on_cache_event(ENDPOINTS[0], p.CacheStored(
        instance_id="i0", block_hashes=page_hashes(ids, 16), parent_block_hash=None, block_size=16))
    d = router.decide(rv, ids)
    assert d.worker == 0
    v0, v1 = sorted(d.views, key=lambda v: v.index)
    assert v0.predicted_ttft_s < v1.predicted_ttft_s


def test_block_marginal_prices_the_prefill_stall_the_selfish_objective_ignores():
    # w0 holds the prompt's prefix but decodes 20 requests; w1 decodes 10 and holds nothing.
    # The selfish objective takes the miss (the candidate decodes faster beside 10 than beside
    # 20, more than paying for its 3000-token prefill); that prefill would stall w1's 10
    # running requests, which block_marginal adds, so it takes the hit.
    picks = {}
    for policy in ("block", "block_marginal"):
        router = make_router(policy=policy)
        feed(router, 0, snapshot(0, running=20))
        feed(router, 1, snapshot(1, running=10))
        rv, ids = request(router, 3000)
        router.subscriber.on_cache_event(ENDPOINTS[0], p.CacheStored(
            instance_id="i0", block_hashes=page_hashes(ids, 16), parent_block_hash=None,
            block_size=16))
        d = router.decide(rv, ids)
        picks[policy] = d.worker
        v0, v1 = sorted(d.views, key=lambda v: v.index)
        assert v0.predicted_e2e_s > v1.predicted_e2e_s  # the selfish ranking: w1 first
        if policy == "block":
            assert math.isnan(v0.predicted_prefill_s)  # only computed when the policy asks
            continue
        for v in (v0, v1):  # the candidate's prefill alone, in the instance's step model
            extend = max(3000 - v.cached_prefix_tokens, 1)
            prefix = 3000 - extend
            expected = router.workers[v.index].step_model.step_time(
                extend, extend * (prefix + (extend + 1) / 2), 0, 0)
            assert v.predicted_prefill_s == pytest.approx(expected)
        assert v1.predicted_prefill_s > 5 * v0.predicted_prefill_s
        assert (v0.predicted_e2e_s + 20 * v0.predicted_prefill_s
                < v1.predicted_e2e_s + 10 * v1.predicted_prefill_s)
    assert picks == {"block": 1, "block_marginal": 0}


def test_running_requests_past_the_mean_are_expected_to_run_long():
    # Completed so far: 80 short answers (100 tokens) and 20 long ones (1500): mean 380.
    # Both instances are full (64 running = max_running_requests); w0's requests have made
    # 600 tokens each, w1's 50. The mean says w0's are overdue and free their slots on the
    # next step; the completions say requests that outlive 600 tokens run to 1500, while
    # w1's have ~330 to go — so the candidate gets a slot sooner on w1.
    def full(i, generated):
        running = p.RequestColumns(
            rid=[f"r{i}-{k}" for k in range(64)], input_len=[100] * 64, prefix_len=[0] * 64,
            output_len=[generated] * 64, max_new_tokens=[4000] * 64, ignore_eos=[False] * 64)
        return p.Snapshot(instance_id=f"i{i}", time=time.time(), forward_ct=1, running=running,
                          waiting=cols(0), free_tokens=60000, evictable_tokens=0,
                          max_total_num_tokens=65536, new_token_ratio=0.7)

    router = make_router()
    for n in [100] * 80 + [1500] * 20:
        router.finished(router.assign(*request(router), 0), output_tokens=n)
    feed(router, 0, full(0, 600))
    feed(router, 1, full(1, 50))
    ids = list(range(1, 201))
    rv = router.request_view(text="t", token_ids=ids, max_new_tokens=4000, ignore_eos=False)
    assert rv.pred_output_len == 380
    d = router.decide(rv, ids)
    v0, v1 = sorted(d.views, key=lambda v: v.index)
    assert d.worker == 1 and v1.predicted_ttft_s < v0.predicted_ttft_s
    # What fastsim was told: w0's survivors run to 1500, w1's to the mean of those past 50.
    predict = router._snapshot_output_len(router.workers[0])
    queue = p.RequestColumns(rid=["r0-0", "r1-0", "r1-0", "r0-0"], input_len=[100] * 4,
                             prefix_len=[0] * 4, output_len=[600, 50, 50, 600],
                             max_new_tokens=[4000, 4000, 1000, 1200], ignore_eos=[False] * 4)
    assert list(predict(queue)) == [1500, 380, 380, 1200]  # the last capped by max_new_tokens


def test_stale_instance_is_routed_on_the_routers_own_accounting():
    router = make_router(stale_after_s=0.5)
    feed(router, 0, snapshot(0, running=40, waiting=30))
    router.subscriber.states[ENDPOINTS[0]].last_message_at -= 10  # silent for 10 s
    rv, ids = request(router)
    d = router.decide(rv, ids)
    v0 = next(v for v in d.views if v.index == 0)
    assert v0.stale and v0.running == 0 and v0.waiting == 0  # the old queue is not trusted
    assert v0.predicted_ttft_s > 0


def test_health_breaker_takes_instances_out_and_back():
    router = make_router(policy="round_robin")
    assert router.mark_failure(0, "refused", immediate=True)
    rv, ids = request(router)
    assert {router.decide(rv, ids).worker for _ in range(4)} == {1}
    assert router.mark_failure(1, "timeout") is False  # 1 of 3 failures to open
    assert router.mark_failure(1, "timeout") is False
    assert router.mark_failure(1, "timeout") is True
    with pytest.raises(NoInstanceAvailable, match="http://w0:1: refused"):
        router.decide(rv, ids)
    assert router.mark_success(0)
    assert router.decide(rv, ids).worker == 0


def test_step_records_calibrate_the_instance_model():
    router = make_router()
    w = router.workers[0]
    before = w.step_model
    n = 200
    router.subscriber.on_steps(ENDPOINTS[0], p.StepRecords(
        instance_id="i0", forward_mode=["decode"] * n, num_reqs=[8] * n, extend_tokens=[0] * n,
        prefix_tokens=[0] * n, prefill_context_tokens=[0.0] * n, decode_reqs=[8] * n,
        decode_context_tokens=[8000 + k for k in range(n)], kv_tokens=[8000] * n,
        duration_s=[0.05] * n, end_time=[0.0] * n))
    after = w.step_model
    assert after is not before
    assert after.step_time(0, 0, 8, 8000) == pytest.approx(0.05, rel=0.1)


def test_provisioning_recommends_scale_out_when_the_slo_cannot_be_met():
    router = make_router(slo_ttft_ms=50)
    for i in range(2):
        feed(router, i, snapshot(i, running=60, waiting=60))
    report = router.provisioning()
    assert report["recommendation"] == "scale_out" and report["best_probe_ttft_s"] > 0.05
    idle = make_router(slo_ttft_ms=5000)
    assert idle.provisioning()["recommendation"] == "scale_in"


def test_invalid_configurations_are_refused_with_the_setting_named():
    with pytest.raises(ConfigError, match="--publish-endpoints: got 1 endpoints for 2"):
        RouterConfig(worker_urls=URLS, publish_endpoints=("tcp://127.0.0.1:1",))
    with pytest.raises(ConfigError, match="--power-of-k applies"):
        RouterConfig(worker_urls=URLS, policy="round_robin", power_of_k=2)
    with pytest.raises(ConfigError, match="listed twice"):
        RouterConfig(worker_urls=(URLS[0], URLS[0]))
    with pytest.raises(ConfigError, match="--policy 'fastest' is unknown"):
        RouterConfig(worker_urls=URLS, policy="fastest")
    with pytest.raises(ConfigError, match="--calibration-refit-interval must be >= 0"):
        RouterConfig(worker_urls=URLS, calibration_refit_interval_s=-1.0)
    with pytest.raises(ConfigError, match="upstream_keepalive_s must be > 0"):
        RouterConfig(worker_urls=URLS, upstream_keepalive_s=0.0)
    with pytest.raises(ConfigError, match="--length-estimate mean applies .* --length-model"):
        RouterConfig(worker_urls=URLS, length_estimate="mean")
    RouterConfig(worker_urls=URLS, length_estimate="p50")  # the default: fine without a model
    with pytest.raises(ConfigError, match="--length-estimate must be one of p50, mean"):
        RouterConfig(worker_urls=URLS, length_model="/m", length_estimate="p90")


class FixedLengthModel:
    """A length predictor that answers (P50, P90) = (100, 300) for every prompt."""

    def predict(self, prompt, tokens):
        return 100.0, 300.0

    def expected_tokens(self, p50, p_upper):
        from block_sgl.predictor.length import lognormal_mean
        return lognormal_mean(p50, p_upper, (0.5, 0.9), 10_000.0)


@pytest.mark.parametrize("estimate", [None, "p50", "mean"])
def test_length_estimate_chooses_what_a_prediction_becomes(estimate):
    kw = {} if estimate is None else {"length_estimate": estimate}
    router = Router(RouterConfig(worker_urls=URLS, length_model="/m", **kw),
                    length_predictor=FixedLengthModel(), subscriber_factory=FakeSubscriber)
    got = router.predict_output_len("a prompt", 10, 4096, ignore_eos=False)
    sigma = math.log(3.0) / 1.2815515655446004
    want = 100 if estimate != "mean" else round(100 * math.exp(sigma ** 2 / 2))
    assert got == want and (estimate != "mean" or got > 100)
    assert router.predict_output_len("a prompt", 10, 50, ignore_eos=False) == 50  # the cap


def test_pooled_connections_are_dropped_before_sglang_closes_them():
    """A request written on a keep-alive connection SGLang is closing fails like a dead
    instance; the router's idle limit must stay under SGLang's (uvicorn's) keep-alive timeout."""
    envs = pytest.importorskip("sglang.srt.environ").envs
    assert RouterConfig(worker_urls=URLS).upstream_keepalive_s < envs.SGLANG_TIMEOUT_KEEP_ALIVE.get()


def test_instance_state_from_a_snapshot_equals_the_column_tables():
    """``router.state.instance_state`` builds fastsim's tables in one array per queue; they
    hold the snapshot's columns (prefix clipped to the prompt, the chunked request first in
    the waiting table) and the predicted lengths; ragged columns are refused by name."""
    from block_sgl.fastsim import RequestTable
    from block_sgl.router.state import instance_config, instance_state

    hello = p.Hello(instance_id="i0", url="http://a", model="m", page_size=1,
                    max_total_num_tokens=10_000, max_running_requests=8,
                    chunked_prefill_size=512, max_prefill_tokens=4096, schedule_policy="fcfs")
    running = p.RequestColumns(rid=["a", "b"], input_len=[100, 40], prefix_len=[20, 90],
                               output_len=[5, 0], max_new_tokens=[64, 32],
                               ignore_eos=[False, True])
    waiting = p.RequestColumns(rid=["c"], input_len=[300], prefix_len=[0], output_len=[0],
                               max_new_tokens=[128], ignore_eos=[False])
    chunked = p.RequestColumns(rid=["d"], input_len=[2000], prefix_len=[0], output_len=[0],
                               max_new_tokens=[16], ignore_eos=[False])
    snap = p.Snapshot(instance_id="i0", time=100.0, forward_ct=3, running=running,
                      waiting=waiting, chunked=chunked, chunked_done_tokens=512,
                      free_tokens=7000, evictable_tokens=300, max_total_num_tokens=10_000,
                      new_token_ratio=0.4)
    predicted = {"a": 50, "b": 32, "c": 77, "d": 9}
    state = instance_state(instance_config(hello), snap,
                           lambda cols: [predicted[r] for r in cols.rid], now=100.25)
    expect_running = RequestTable([100, 40], [20, 40], [5, 0], [64, 32], [0, 1], [50, 32])
    expect_waiting = RequestTable([2000, 300], [0, 0], [0, 0], [16, 128], [0, 0], [9, 77])
    assert np.array_equal(state.running.packed, expect_running.packed)
    assert np.array_equal(state.waiting.packed, expect_waiting.packed)
    assert (state.chunked_idx, state.chunked_prefilled) == (0, 512)
    assert (state.free_kv_tokens, state.evictable_tokens, state.elapsed_s) == (7000, 300, 0.25)
    ragged = p.Snapshot(instance_id="i0", time=100.0, forward_ct=3,
                        running=p.RequestColumns(rid=["a", "b"], input_len=[100],
                                                 prefix_len=[0, 0], output_len=[0, 0],
                                                 max_new_tokens=[8, 8], ignore_eos=[False] * 2),
                        waiting=p.RequestColumns(), free_tokens=1, evictable_tokens=0,
                        max_total_num_tokens=10_000, new_token_ratio=0.5)
    with pytest.raises(ValueError, match="input_len has 1 entries, rid has 2"):
        instance_state(instance_config(hello), ragged, lambda cols: [1] * len(cols))


@settings(max_examples=60, deadline=None)
@given(completed=st.lists(st.integers(1, 3000), max_size=40),
       requests=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 4000), st.booleans(),
                                   st.one_of(st.none(), st.integers(1, 3000),
                                             st.integers(-2, 2).map(lambda d: ("near", d)))),
                         max_size=40),
       with_model=st.booleans(), hint=st.booleans())
@example(completed=[100], requests=[(50, 4000, False, ("near", 0))], with_model=True, hint=True)
@example(completed=[100], requests=[(50, 4000, False, ("near", 0))] * 20, with_model=True,
         hint=True)
def test_snapshot_lengths_follow_the_per_request_rule(completed, requests, with_model, hint):
    """``_snapshot_output_len`` gives every request what the per-request rule in its docstring
    gives, on short queues (request by request) and long ones (one numpy pass)."""
    router = make_router(use_ignore_eos_hint=hint)
    if with_model:
        router.length_predictor = FixedLengthModel()
    for n in completed:
        router.output_lengths.add(n)
        router.completed_requests += 1
        router.completed_output_tokens += n
    worker = router.workers[0]
    # ("near", d): this router predicted d tokens more than the request has generated (the
    # boundary of "not yet reached")
    requests = [(g, m, e, max(1, g + k[1]) if isinstance(k, tuple) else k)
                for g, m, e, k in requests]
    rids = [f"q{i}" for i in range(len(requests))]
    worker.rid_pred = {rid: known for rid, (_, _, _, known) in zip(rids, requests)
                       if known is not None}
    cols = p.RequestColumns(rid=rids, input_len=[10] * len(rids), prefix_len=[0] * len(rids),
                            output_len=[g for g, _, _, _ in requests],
                            max_new_tokens=[m for _, m, _, _ in requests],
                            ignore_eos=[e for _, _, e, _ in requests])
    mean = router.mean_output_len()

    def rule(rid, generated, max_new, ignore_eos):
        if ignore_eos and hint:
            return max_new
        known = worker.rid_pred.get(rid)
        if known is not None and with_model and generated < known:
            return known
        expected = router.output_lengths.expected_total(generated)
        if expected is None:
            return known if known is not None else min(mean, max_new)
        return max(1, min(round(expected), max_new))

    got = router._snapshot_output_len(worker)(cols)
    assert [int(x) for x in got] == [rule(r, g, m, e) for r, (g, m, e, _) in zip(rids, requests)]
