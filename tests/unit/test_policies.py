"""The routing policies as pure functions over built cluster views."""

import math

import pytest

from block_sgl.router.policies import POLICY_NAMES, InstanceView, RequestView, make_policy

REQ = RequestView(rid="r", text="hello", input_len=1000, max_new_tokens=100, pred_output_len=50)


def views(*specs):
    return [InstanceView(index=i, url=f"http://w{i}", **s) for i, s in enumerate(specs)]


def test_every_name_builds_and_unknown_names_are_refused():
    for name in POLICY_NAMES:
        assert make_policy(name, seed=0).name == name
    with pytest.raises(ValueError, match="unknown policy 'nope'.*round_robin"):
        make_policy("nope")


def test_round_robin_cycles_and_skips_filtered_instances():
    p = make_policy("round_robin")
    vs = views({}, {}, {})
    assert [p.pick(REQ, vs) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    without_1 = [vs[0], vs[2]]
    assert [p.pick(REQ, without_1) for _ in range(3)] == [0, 2, 0]


def test_random_is_seeded_and_covers_all():
    a, b = make_policy("random", seed=3), make_policy("random", seed=3)
    vs = views({}, {}, {}, {})
    picks = [a.pick(REQ, vs) for _ in range(200)]
    assert picks == [b.pick(REQ, vs) for _ in range(200)]
    assert set(picks) == {0, 1, 2, 3}


def test_least_requests_and_least_tokens_follow_their_load_figure():
    vs = views({"running": 5, "waiting": 1, "used_kv_tokens": 100},
               {"running": 2, "waiting": 0, "used_kv_tokens": 9000},
               {"running": 3, "waiting": 3, "used_kv_tokens": 50, "queued_prefill_tokens": 10})
    assert make_policy("least_requests").pick(REQ, vs) == 1
    assert make_policy("least_tokens").pick(REQ, vs) == 2


def test_ties_break_on_router_in_flight_then_index():
    vs = views({"in_flight": 3}, {"in_flight": 1}, {"in_flight": 1})
    assert make_policy("least_requests").pick(REQ, vs) == 1


def test_power_of_two_picks_the_lighter_of_its_pair():
    p = make_policy("power_of_two", seed=1)
    vs = views({"running": 9}, {"running": 0})
    assert all(p.pick(REQ, vs) == 1 for _ in range(20))  # with 2 instances the pair is both


def test_lmetric_weighs_uncached_prefill_by_batch_size():
    # w0: big batch but the prompt is cached there; w1: idle but must prefill 1000 tokens.
    vs = views({"running": 3, "cached_prefix_tokens": 990},
               {"running": 0, "cached_prefix_tokens": 0})
    # w0: (0 + 10) * 4 = 40 ; w1: (0 + 1000) * 1 = 1000
    assert make_policy("lmetric").pick(REQ, vs) == 0
    vs = views({"running": 3, "queued_prefill_tokens": 500, "cached_prefix_tokens": 990},
               {"running": 0})
    assert make_policy("lmetric").pick(REQ, vs) == 1  # 510*4 = 2040 > 1000


def test_llumnix_prefers_most_free_kv_per_request():
    vs = views({"free_kv_tokens": 10_000, "running": 9},   # 1000 per request
               {"free_kv_tokens": 3_000, "running": 1})    # 1500 per request
    assert make_policy("llumnix").pick(REQ, vs) == 1


def test_block_minimises_predicted_e2e_and_block_ttft_predicted_ttft():
    vs = views({"predicted_ttft_s": 0.10, "predicted_e2e_s": 2.0},
               {"predicted_ttft_s": 0.30, "predicted_e2e_s": 1.5},
               {"predicted_ttft_s": math.nan, "predicted_e2e_s": math.nan})
    assert make_policy("block").pick(REQ, vs) == 1
    assert make_policy("block_ttft").pick(REQ, vs) == 0


def test_block_marginal_adds_the_prefill_stall_of_everyone_on_the_instance():
    # w0: E2E 1.0 s, prefill 0.01 s, 20 requests there -> 1.2; w1: 0.9 + 0.08 * 5 = 1.3.
    vs = views({"predicted_e2e_s": 1.0, "predicted_prefill_s": 0.01, "running": 12, "waiting": 8},
               {"predicted_e2e_s": 0.9, "predicted_prefill_s": 0.08, "running": 5})
    assert make_policy("block").pick(REQ, vs) == 1
    assert make_policy("block_marginal").pick(REQ, vs) == 0
    # With nobody to stall on w1 its own latency decides again.
    vs[1].running = 0
    assert make_policy("block_marginal").pick(REQ, vs) == 1
    # An instance fastsim could not score still ranks last.
    vs[1].predicted_e2e_s = math.nan
    vs[0].predicted_e2e_s = 50.0
    assert make_policy("block_marginal").pick(REQ, vs) == 0


def test_block_ranks_unscored_instances_last_but_still_picks_one():
    vs = views({"predicted_e2e_s": math.nan, "in_flight": 2},
               {"predicted_e2e_s": math.nan, "in_flight": 0})
    assert make_policy("block").pick(REQ, vs) == 1
