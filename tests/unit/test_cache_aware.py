"""sglang-router 0.3.2 cache_aware reproduction: the approximate tree and the policy."""

import copy
import heapq
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from block_sgl.router.policies.base import InstanceView, RequestView
from block_sgl.router.policies.cache_aware import (EMPTY_TENANT, ApproxTree, CacheAwarePolicy,
                                                   _common_len)


def req(text):
    return RequestView(rid="r", text=text, input_len=0, max_new_tokens=16, pred_output_len=16)


def views(loads):
    return [InstanceView(index=i, url=f"http://w{i}", in_flight=n) for i, n in enumerate(loads)]


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def check_invariants(tree):
    """Children keyed by their first char, parent links, a child's tenants owned by its parent,
    maintained char counts == recomputed ones."""
    stack = [tree.root]
    while stack:
        node = stack.pop()
        for c, ch in node.children.items():
            assert ch.text and ch.text[0] == c
            assert ch.parent is node
            assert set(ch.tenants) <= set(node.tenants)
            stack.append(ch)
    used = tree.used_size_per_tenant()
    counts = tree.tenant_char_count
    assert counts == {t: used.get(t, 0) for t in counts}
    assert set(used) <= set(counts) | {EMPTY_TENANT}


# -- tree ---------------------------------------------------------------------------------------
def test_cold_start():
    assert ApproxTree().prefix_match("hello") == (0, EMPTY_TENANT)


def test_exact_and_partial_matches():
    t = ApproxTree()
    t.insert("hello", "a")
    t.insert("apple", "b")
    t.insert("banana", "c")
    assert t.prefix_match("hello") == (5, "a")
    assert t.prefix_match("apple") == (5, "b")
    assert t.prefix_match("banana") == (6, "c")
    assert t.prefix_match("help me") == (3, "a")  # partial match inside the "hello" edge
    assert t.prefix_match("apples and pears") == (5, "b")
    assert t.prefix_match("zzz")[0] == 0
    assert t.prefix_match("")[0] == 0


def test_insert_splits_edges_and_counts():
    t = ApproxTree()
    t.insert("hello", "a")
    t.insert("help", "b")
    (hel,) = t.root.children.values()
    assert hel.text == "hel" and set(hel.children) == {"l", "p"}
    assert hel.children["l"].text == "lo" and hel.children["p"].text == "p"
    assert set(hel.tenants) == {"a", "b"}
    assert set(hel.children["l"].tenants) == {"a"} and set(hel.children["p"].tenants) == {"b"}
    # the split node keeps the creator of the original edge as its cached tenant
    assert t.prefix_match("hel") == (3, "a")
    assert t.prefix_match("help") == (4, "b")
    assert t.tenant_char_count == {"a": 5, "b": 4}
    t.insert("he", "c")  # split at the end of the new text
    (he,) = t.root.children.values()
    assert he.text == "he" and he.children["l"].text == "l"
    assert t.prefix_match("he") == (2, "a")
    assert t.tenant_char_count == {"a": 5, "b": 4, "c": 2}
    check_invariants(t)


def test_char_counts_match_rust_test_tenant_char_count():
    t = ApproxTree()
    for text, ten in [("apple", 1), ("apricot", 1), ("banana", 1), ("amplify", 2),
                      ("application", 2), ("apartment", 1), ("appetite", 2), ("ball", 1),
                      ("box", 2), ("zebra", 1), ("zebra", 2), ("zero", 1), ("zero", 2)]:
        t.insert(text, ten)
        check_invariants(t)
    t.evict_tenant_by_size(10)
    check_invariants(t)
    assert all(n <= 10 for n in t.tenant_char_count.values())


def test_utf8_characters_are_code_points():
    t = ApproxTree()
    t.insert("你好嗎", "a")
    t.insert("你好喔", "b")
    assert t.prefix_match("你好嗎") == (3, "a")
    assert t.prefix_match("你好喔") == (3, "b")
    assert t.prefix_match("你好") == (2, "a")
    assert t.tenant_char_count == {"a": 3, "b": 3}  # "你好" (shared) + "喔"


def test_eviction_removes_least_recently_used_leaves():
    # tree.rs test_simple_eviction
    t = ApproxTree()
    t.insert("hello", "t1")
    t.insert("hello", "t2")
    t.insert("world", "t2")
    assert t.used_size_per_tenant() == {"t1": 5, "t2": 10}
    t.evict_tenant_by_size(5)
    assert t.used_size_per_tenant() == {"t1": 5, "t2": 5}  # t1 untouched, t2's older leaf gone
    assert t.prefix_match_tenant("hello", "t2") == 0
    assert t.prefix_match_tenant("hello", "t1") == 5
    assert t.prefix_match("world") == (5, "t2")


def test_eviction_walks_up_and_unlinks_empty_nodes():
    t = ApproxTree()
    t.insert("aaaa-old", "x")
    t.insert("bbbb-mid", "x")
    t.insert("aaaa-new", "x")   # refreshes nothing on "aaaa-": intermediate stays at epoch 0
    t.insert("cccc-newest", "x")
    assert t.tenant_char_count["x"] == 5 + 3 + 3 + 8 + 11
    t.evict_tenant_by_size(14)
    # oldest leaf first: "old" (epoch 0) -> 27, "bbbb-mid" (1) -> 19, "new" (2) -> 16; then
    # "aaaa-" is a leaf (intermediate timestamp 0) -> 11 <= 14: "cccc-newest" stays
    assert t.tenant_char_count["x"] == 11
    assert t.prefix_match_tenant("cccc-newest", "x") == 11
    assert set(t.root.children) == {"c"}
    check_invariants(t)


def test_eviction_leaves_small_tenants_alone():
    t = ApproxTree()
    t.insert("shared prefix one", "big")
    t.insert("shared prefix two", "big")
    t.insert("shared prefix one", "small")
    before = dict(t.tenant_char_count)
    t.evict_tenant_by_size(17)
    assert t.tenant_char_count["small"] == before["small"] == 17
    assert t.tenant_char_count["big"] <= 17
    assert t.prefix_match_tenant("shared prefix one", "small") == 17
    check_invariants(t)


def test_remove_tenant():
    # tree.rs test_complex_tenant_eviction
    t = ApproxTree()
    for text, ten in [("apple", 1), ("application", 1), ("apple", 2), ("appetite", 2),
                      ("banana", 1), ("banana", 2), ("ball", 2)]:
        t.insert(text, ten)
    t.remove_tenant(1)
    sizes = t.used_size_per_tenant()
    assert 1 not in sizes and 1 not in t.tenant_char_count
    assert sizes[2] == 5 + 5 + 6 + 2
    assert t.prefix_match_tenant("application", 1) == 0
    assert t.prefix_match_tenant("appetite", 2) == 8
    t.insert("hello", "a")
    t.insert("hello", "b")
    t.prefix_match("hello")
    t.remove_tenant("a")
    assert t.prefix_match("hello") == (5, "b")  # stale cached tenant replaced
    check_invariants(t)


def test_common_len():
    base = "x" * 1000
    for k in [1, 2, 15, 16, 17, 100, 999]:
        other = base[:k] + "y" + base[k + 1:]
        assert _common_len(other, 0, base) == k
        assert _common_len("zz" + other, 2, base) == k
    assert _common_len("xx", 0, base) == 2
    assert _common_len(base + "tail", 0, base) == 1000


texts = st.text(alphabet="abc\u00e9\u4e2d", max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(texts, st.integers(0, 3)), max_size=25), texts)
def test_property_prefix_match_is_longest_common_prefix(inserts, query):
    t = ApproxTree()
    for text, ten in inserts:
        t.insert(text, ten)
    check_invariants(t)
    for text, ten in inserts:
        matched, tenant = t.prefix_match(text)
        assert matched == len(text)
        # the returned tenant inserted a string that has this text as a prefix
        assert text == "" or any(s.startswith(text) and o == tenant for s, o in inserts)
        assert t.prefix_match_tenant(text, ten) == len(text)
    expected = max([len(os.path.commonprefix([query, s])) for s, _ in inserts], default=0)
    assert t.prefix_match(query)[0] == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(texts, st.integers(0, 3)), max_size=30), st.integers(0, 20))
def test_property_eviction_bounds_every_tenant(inserts, max_size):
    t = ApproxTree()
    for text, ten in inserts:
        t.insert(text, ten)
    before = dict(t.tenant_char_count)
    t.evict_tenant_by_size(max_size)
    check_invariants(t)
    for ten, n in t.tenant_char_count.items():
        assert n <= max_size
        if before[ten] <= max_size:
            assert n == before[ten]


def evict_literal(tree, max_size):
    """tree.rs evict_tenant_by_size transcribed without the over-size pre-filter."""
    heap, seq, stack = [], 0, [tree.root]
    while stack:
        curr = stack.pop()
        stack.extend(curr.children.values())
        below = {t for ch in curr.children.values() for t in ch.tenants}
        for t, ts in curr.tenants.items():
            if t not in below:
                heap.append((ts, seq, t, curr))
                seq += 1
    heapq.heapify(heap)
    counts = tree.tenant_char_count
    while heap:
        _, _, t, node = heapq.heappop(heap)
        if t in counts and counts[t] <= max_size:
            continue
        if t not in node.tenants or any(t in c.tenants for c in node.children.values()):
            continue
        if t in counts:
            counts[t] = max(0, counts[t] - len(node.text))
        del node.tenants[t]
        parent = node.parent
        if parent is not None:
            if not node.children and not node.tenants:
                parent.children.pop(node.text[0], None)
            if t in parent.tenants and not any(t in c.tenants for c in parent.children.values()):
                heapq.heappush(heap, (parent.tenants[t], seq, t, parent))
                seq += 1


def dump(tree):
    out, stack = [], [("", tree.root)]
    while stack:
        path, node = stack.pop()
        out.append((path + node.text, tuple(sorted(node.tenants.items(), key=repr))))
        stack.extend((path + node.text, c) for c in node.children.values())
    return sorted(out), tree.tenant_char_count


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(texts, st.integers(0, 3)), max_size=30), texts, st.integers(0, 20))
def test_property_eviction_matches_literal_transcription(inserts, query, max_size):
    t = ApproxTree()
    for text, ten in inserts:
        t.insert(text, ten)
        t.prefix_match(query)  # moves timestamps (1 match in 8)
    ref = copy.deepcopy(t)
    t.evict_tenant_by_size(max_size)
    evict_literal(ref, max_size)
    assert dump(t) == dump(ref)


# -- policy -------------------------------------------------------------------------------------
def test_attributes_and_defaults():
    p = CacheAwarePolicy()
    assert (p.name, p.needs_tokens, p.needs_prediction) == ("cache_aware", False, False)
    assert (p.cache_threshold, p.balance_abs_threshold, p.balance_rel_threshold,
            p.max_tree_size, p.eviction_interval_s) == (0.3, 64, 1.5, 2 ** 26, 60.0)


@pytest.mark.parametrize("kwargs, field", [
    ({"cache_threshold": 1.5}, "cache_threshold"),
    ({"cache_threshold": -0.1}, "cache_threshold"),
    ({"cache_threshold": float("nan")}, "cache_threshold"),
    ({"balance_abs_threshold": -1}, "balance_abs_threshold"),
    ({"balance_abs_threshold": 2.5}, "balance_abs_threshold"),
    ({"balance_rel_threshold": 0.9}, "balance_rel_threshold"),
    ({"max_tree_size": 0}, "max_tree_size"),
    ({"max_tree_size": 1.0}, "max_tree_size"),
    ({"eviction_interval_s": 0}, "eviction_interval_s"),
    ({"eviction_interval_s": float("inf")}, "eviction_interval_s"),
    ({"clock": 3}, "clock"),
])
def test_invalid_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CacheAwarePolicy(**kwargs)


def test_repeated_prefix_goes_to_first_worker():
    p = CacheAwarePolicy()
    loads = [0, 0, 0, 0]
    first = p.pick(req("Translate to French: the cat sat on the mat"), views(loads))
    loads[first] += 3  # balanced: 3 - 0 <= 64
    for text in ["Translate to French: the cat sat on the mat",
                 "Translate to French: the cat sat on the mat please",
                 "Translate to French: the cat"]:
        assert p.pick(req(text), views(loads)) == first
    # Rust test_cache_aware_with_balanced_load
    p = CacheAwarePolicy()
    a = p.pick(req("hello world"), views([0, 0]))
    assert p.pick(req("hello world"), views([0, 0])) == a
    assert p.pick(req("hello"), views([0, 0])) == a


def test_unmatched_request_goes_to_least_loaded_not_smallest_tree():
    p = CacheAwarePolicy()
    assert p.pick(req("a" * 500), views([0, 0, 0])) == 0       # tie: first candidate
    assert p.pick(req("b" * 10), views([1, 0, 0])) == 1
    # worker 0 has the biggest tree, worker 2 the smallest (empty); 0.3.2 takes min load
    assert p.pick(req("c" * 10), views([0, 5, 3])) == 0
    assert p.pick(req("d" * 10), views([4, 5, 3])) == 2
    # below the threshold (0.3) counts as unmatched: 2 of 10 chars match "bb..."
    assert p.pick(req("bbxxxxxxxx"), views([2, 1, 0])) == 2
    assert p.tree.tenant_char_count[2] > 0


def test_match_rate_must_exceed_threshold():
    p = CacheAwarePolicy(cache_threshold=0.5)
    assert p.pick(req("abcde"), views([0, 0])) == 0
    assert p.pick(req("abcdeFGHIJ"), views([1, 0])) == 1    # 5/10 = 0.5 is not > 0.5: min load
    assert p.pick(req("abcdeXYZ"), views([1, 0])) == 0      # 5/8 > 0.5: "abcde" was 0's first
    assert p.pick(req("abcdeFGHI"), views([0, 1])) == 1     # 9/9 inside 1's "FGHIJ" edge


def test_imbalance_needs_both_thresholds():
    p = CacheAwarePolicy()
    p.pick(req("shared prompt " * 20), views([0, 0, 0]))   # tree: worker 0
    text = "shared prompt " * 20 + "question"
    assert p.pick(req(text), views([65, 1, 1])) == 0     # abs 64 not exceeded
    assert p.pick(req(text), views([300, 210, 210])) == 0  # 90 > 64 but 300 <= 210 * 1.5
    assert p.pick(req(text), views([200, 120, 130])) == 1  # both: least loaded
    assert p.pick(req(text), views([66, 1, 0])) == 2
    # the imbalanced pick still feeds the tree
    assert p.tree.prefix_match_tenant(text, 2) == len(text)
    # Rust test_cache_aware_with_imbalanced_load
    q = CacheAwarePolicy(cache_threshold=0.5, balance_abs_threshold=5, balance_rel_threshold=2.0)
    for _ in range(5):
        assert q.pick(req("test"), views([20, 0])) == 1


def test_hotspot_shared_system_prompt_goes_to_one_worker():
    """Documented behaviour: with default thresholds and < 64 in flight, prompts sharing a long
    prefix (one system prompt + different questions) all go to the same worker."""
    p = CacheAwarePolicy()
    system = "You are a helpful assistant. Answer precisely and cite sources. " * 30
    loads = [0] * 8
    picks = []
    for i in range(65):
        w = p.pick(req(system + f"Question {i}: what is {i} * {i + 7}?"), views(loads))
        picks.append(w)
        loads[w] += 1  # none completes
    assert set(picks) == {0} and loads[0] == 65
    # 65 - 0 > 64 and 65 > 0 * 1.5: only now does load balancing kick in
    assert p.pick(req(system + "Question: one more"), views(loads)) == 1


def test_matched_worker_not_available_is_dropped_from_tree():
    p = CacheAwarePolicy()
    p.pick(req("test1 " * 10), views([0, 0]))             # -> 0
    p.pick(req("test2 " * 10), views([1, 0]))             # -> 1
    only_1 = [InstanceView(index=1, url="http://w1")]
    assert p.pick(req("test1 " * 10), only_1) == 1        # stale tenant 0 removed, no insert
    assert 0 not in p.tree.tenant_char_count
    assert p.tree.prefix_match_tenant("test1 " * 10, 1) == 4  # only the shared "test" edge
    assert p.pick(req("test1 " * 10), only_1) == 1


def test_eviction_runs_from_pick_on_the_clock():
    clock = FakeClock()
    p = CacheAwarePolicy(max_tree_size=100, eviction_interval_s=10, clock=clock)
    for i in range(20):
        p.pick(req(f"{i:02d}" + "x" * 48), views([0, 0]))
    assert p.evictions == 0 and p.tree.tenant_char_count[0] == 20 * 50 - 18  # "0", "1" shared
    clock.t = 9.9
    p.pick(req("zz"), views([1, 0]))
    assert p.evictions == 0
    clock.t = 10.0
    p.pick(req("yy"), views([1, 0]))
    assert p.evictions == 1
    assert p.tree.tenant_char_count[0] <= 100
    # the most recent prompts survive, the oldest went
    assert p.tree.prefix_match_tenant("19" + "x" * 48, 0) == 50
    assert p.tree.prefix_match_tenant("00" + "x" * 48, 0) == 0
    clock.t = 15.0
    p.pick(req("ww"), views([1, 0]))
    assert p.evictions == 1


def test_on_complete_is_a_noop():
    p = CacheAwarePolicy()
    p.pick(req("hello"), views([0, 0]))
    before = dict(p.tree.tenant_char_count)
    p.on_complete(0, req("hello"))
    assert p.tree.tenant_char_count == before
