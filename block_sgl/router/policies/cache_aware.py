"""sglang-router 0.3.2's ``cache_aware`` policy, reproduced in Python.

Source: the sglang-router 0.3.2 sdist on PyPI (``sglang_router-0.3.2.tar.gz``), which carries
the Rust crate of sgl-project/sglang ``sgl-router/``:

* ``src/policies/cache_aware.rs`` -- ``CacheAwarePolicy::select_worker`` and
  ``select_worker_min_load``: the decision; ``on_request_complete``: a no-op (debug log only).
* ``src/policies/tree.rs`` -- ``Tree``: the character-level approximate radix tree
  (``insert``, ``prefix_match_with_counts``, ``prefix_match_tenant``, ``evict_tenant_by_size``,
  ``remove_tenant``).
* ``src/policies/utils.rs`` -- ``PeriodicTask::spawn``: eviction every
  ``eviction_interval_secs`` on a background thread (here: run from ``pick`` instead).
* ``src/core/worker.rs`` -- ``BasicWorker::load`` / ``WorkerLoadGuard``: "load" is the router's
  own count of in-flight requests on the worker, incremented when the request is sent and
  decremented when the response (body) is done (``src/routers/http/router.rs``
  ``route_typed_request_once``: the guard is taken only for ``cache_aware`` and ``manual``).
* ``src/sglang_router/router_args.py`` -- ``RouterArgs`` defaults (what the launcher uses):
  cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5,
  eviction_interval_secs 60, max_tree_size 2**26.  (``CacheAwareConfig::default`` in
  ``src/policies/mod.rs`` has other values -- 0.5/32/1.1/30/10000 -- used only by Rust tests.)
* ``src/config/validation.rs`` -- ``ConfigValidator``: the argument checks.

See README_cache_aware.md for the deviations.
"""

from __future__ import annotations

import heapq
import math
import struct
import time
from collections import deque
from typing import Callable, Hashable, Sequence

from block_sgl.router.policies.base import InstanceView, RequestView

# tree.rs prefix_match_with_counts: a node without tenants yields the tenant "empty".
EMPTY_TENANT = "empty"

_F32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """Round to IEEE single precision: the Rust code compares f32 values."""
    return _F32.unpack(_F32.pack(x))[0]


def _common_len(text: str, pos: int, node_text: str) -> int:
    """Characters shared by ``text[pos:]`` and ``node_text`` (tree.rs ``shared_prefix_count``).

    Precondition: the first characters are equal (the child was found by it). Gallops then
    bisects with C-level ``startswith`` instead of a per-character Python loop, so the cost grows
    with the mismatch position, not the string lengths.
    """
    limit = min(len(node_text), len(text) - pos)
    if text.startswith(node_text[:limit], pos):
        return limit
    lo, step = 1, 16  # text[pos:pos+lo] == node_text[:lo]
    hi = limit - 1    # the answer is < limit
    while lo + step < hi:
        if text.startswith(node_text[:lo + step], pos):
            lo += step
            step *= 2
        else:
            hi = lo + step - 1
            break
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(node_text[:mid], pos):
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Node:
    """tree.rs ``Node``: edge text, children by first char, per-tenant last access epoch,
    parent pointer, and the cached ``last_tenant`` used by prefix matching."""

    __slots__ = ("children", "text", "tenants", "parent", "last_tenant")

    def __init__(self, text: str, parent: "_Node | None") -> None:
        self.children: dict[str, _Node] = {}
        self.text = text
        self.tenants: dict[Hashable, int] = {}
        self.parent = parent
        self.last_tenant: Hashable | None = None


class ApproxTree:
    """tree.rs ``Tree``: multi-tenant approximate radix tree over characters (Python str code
    points = Rust chars). Timestamps are epochs from a counter (tree.rs ``get_epoch``), kept per
    tree here (a process-wide static in Rust)."""

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.tenant_char_count: dict[Hashable, int] = {}
        self._epoch = 0

    def _next_epoch(self) -> int:
        # tree.rs get_epoch: EPOCH_COUNTER.fetch_add(1) -> the value before the increment
        e = self._epoch
        self._epoch = e + 1
        return e

    # -- tree.rs Tree::insert -----------------------------------------------------------------
    def insert(self, text: str, tenant: Hashable) -> None:
        root, counts = self.root, self.tenant_char_count
        if tenant not in root.tenants:  # or_insert(0): root is never evicted by timestamp
            root.tenants[tenant] = 0
        if tenant not in counts:
            counts[tenant] = 0
        n, pos, prev = len(text), 0, root
        while pos < n:
            c = text[pos]
            node = prev.children.get(c)
            if node is None:
                # Vacant: the rest becomes a new leaf owned by tenant with a fresh epoch.
                epoch = self._next_epoch()
                leaf = _Node(text[pos:] if pos else text, prev)
                leaf.last_tenant = tenant
                counts[tenant] += n - pos
                leaf.tenants[tenant] = epoch
                prev.children[c] = leaf
                return
            nt = node.text
            ln = len(nt)
            shared = ln if text.startswith(nt, pos) else _common_len(text, pos, nt)
            if shared < ln:
                # Split: a new node for the shared part takes the old node's place; it clones
                # the old node's tenant map (timestamps included) and its cached last_tenant.
                mid = _Node(nt[:shared], prev)
                mid.tenants = dict(node.tenants)
                mid.last_tenant = node.last_tenant
                rest = nt[shared:]
                mid.children[rest[0]] = node
                prev.children[c] = mid
                node.text = rest
                node.parent = mid
                if tenant not in mid.tenants:  # intermediate node: timestamp 0, not refreshed
                    counts[tenant] += shared
                    mid.tenants[tenant] = 0
                prev = mid
            else:
                if tenant not in node.tenants:  # intermediate node: timestamp 0, not refreshed
                    counts[tenant] += ln
                    node.tenants[tenant] = 0
                prev = node
            pos += shared
        # The text ended exactly at a node (the root for ""): that node's timestamp is refreshed.
        prev.tenants[tenant] = self._next_epoch()

    # -- tree.rs Tree::prefix_match_with_counts -----------------------------------------------
    def prefix_match_with_counts(self, text: str) -> tuple[int, Hashable, int]:
        """(matched chars, tenant, input chars). The tenant is the matched node's cached
        ``last_tenant`` (the tenant that created the node) while it still owns the node, else
        the node's first tenant in map order, else ``EMPTY_TENANT``."""
        n, pos, prev = len(text), 0, self.root
        while pos < n:
            node = prev.children.get(text[pos])
            if node is None:
                break
            nt = node.text
            prev = node
            if text.startswith(nt, pos):
                pos += len(nt)
            else:  # partial match: still this node's tenant
                pos += _common_len(text, pos, nt)
                break
        curr = prev
        tenants = curr.tenants
        tenant = curr.last_tenant
        if tenant is None or tenant not in tenants:
            tenant = next(iter(tenants), EMPTY_TENANT)
            curr.last_tenant = tenant
        epoch = self._next_epoch()
        if epoch & 0x7 == 0:  # timestamp refreshed on 1 match in 8
            tenants[tenant] = epoch
        return pos, tenant, n

    def prefix_match(self, text: str) -> tuple[int, Hashable]:
        """(matched_text_len, tenant) -- tree.rs ``prefix_match`` returns the matched text."""
        matched, tenant, _ = self.prefix_match_with_counts(text)
        return matched, tenant

    # -- tree.rs Tree::prefix_match_tenant ----------------------------------------------------
    def prefix_match_tenant(self, text: str, tenant: Hashable) -> int:
        """Matched length along nodes owned by ``tenant`` (refreshes that node's timestamp)."""
        n, pos, prev = len(text), 0, self.root
        while pos < n:
            node = prev.children.get(text[pos])
            if node is None or tenant not in node.tenants:
                break
            nt = node.text
            prev = node
            if text.startswith(nt, pos):
                pos += len(nt)
            else:
                pos += _common_len(text, pos, nt)
                break
        if tenant in prev.tenants:
            prev.tenants[tenant] = self._next_epoch()
        return pos

    # -- tree.rs Tree::evict_tenant_by_size ---------------------------------------------------
    def evict_tenant_by_size(self, max_size: int) -> None:
        """Per tenant over ``max_size`` characters, drop its least recently used leaves (by
        epoch; a parent left without the tenant below it becomes a leaf candidate) until the
        tenant is at or under ``max_size``. Nodes no tenant owns any more are unlinked."""
        # Rust queues every (leaf, tenant) pair and skips, when popped, those of tenants at or
        # under max_size. Counts only go down during eviction, so queueing only the tenants over
        # the limit (or without a count) pops the same entries in the same order; and when there
        # are none (the root owns every tenant) the traversal is skipped altogether.
        counts = self.tenant_char_count
        over = {t for t in self.root.tenants if counts.get(t, max_size + 1) > max_size}
        over.update(t for t, n in counts.items() if n > max_size)
        if not over:
            return
        heap: list[tuple[int, int, Hashable, _Node]] = []
        seq = 0
        stack = [self.root]
        while stack:
            curr = stack.pop()
            children = curr.children.values()
            stack.extend(children)
            tenants = curr.tenants
            if over.isdisjoint(tenants):
                continue
            below: set = set()
            for ch in children:
                below.update(ch.tenants)
            for t, ts in tenants.items():  # Tree::leaf_of
                if t in over and t not in below:
                    heap.append((ts, seq, t, curr))
                    seq += 1
        heapq.heapify(heap)
        while heap:
            _, _, t, node = heapq.heappop(heap)
            used = counts.get(t)
            if used is not None and used <= max_size:
                continue
            if t not in node.tenants or any(t in ch.tenants for ch in node.children.values()):
                continue  # no longer a leaf for t
            if used is not None:
                counts[t] = max(0, used - len(node.text))
            del node.tenants[t]
            parent = node.parent
            if parent is not None:
                if not node.children and not node.tenants and node.text:
                    parent.children.pop(node.text[0], None)
                if t in parent.tenants and not any(
                        t in ch.tenants for ch in parent.children.values()):
                    heapq.heappush(heap, (parent.tenants[t], seq, t, parent))
                    seq += 1

    # -- tree.rs Tree::remove_tenant ----------------------------------------------------------
    def remove_tenant(self, tenant: Hashable) -> None:
        queue: deque[_Node] = deque()
        stack = [self.root]
        while stack:
            curr = stack.pop()
            stack.extend(curr.children.values())
            if tenant in curr.tenants and not any(
                    tenant in ch.tenants for ch in curr.children.values()):
                queue.append(curr)
        while queue:
            curr = queue.popleft()
            curr.tenants.pop(tenant, None)
            parent = curr.parent
            if parent is None:
                continue
            if not curr.children and not curr.tenants and curr.text:
                parent.children.pop(curr.text[0], None)
            if tenant in parent.tenants and not any(
                    tenant in ch.tenants for ch in parent.children.values()):
                queue.append(parent)
        self.tenant_char_count.pop(tenant, None)

    # -- tree.rs Tree::get_used_size_per_tenant (checks) --------------------------------------
    def used_size_per_tenant(self) -> dict[Hashable, int]:
        out: dict[Hashable, int] = {}
        stack = [self.root]
        while stack:
            curr = stack.pop()
            for t in curr.tenants:
                out[t] = out.get(t, 0) + len(curr.text)
            stack.extend(curr.children.values())
        return out

    def node_count(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            curr = stack.pop()
            count += 1
            stack.extend(curr.children.values())
        return count


def _check(name: str, value, ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {reason}")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class CacheAwarePolicy:
    """sglang-router 0.3.2 ``cache_aware`` (cache_aware.rs ``select_worker``).

    1. min/max of the candidates' load (``InstanceView.in_flight``). Imbalanced iff
       ``max - min > balance_abs_threshold`` AND ``max > min * balance_rel_threshold`` (f32)
       -> the least-loaded candidate (first in order on ties); the text is inserted for it.
    2. Else prefix-match the text in the tree; ``match_rate = matched_chars / text_chars``
       (0 for empty text). ``match_rate > cache_threshold`` -> the matched node's tenant;
       otherwise the least-loaded candidate (not the smallest tree: the header comment of
       cache_aware.rs says so, the 0.3.2 code does ``min_by_key(load)``). The text is inserted
       for the chosen worker.
    3. If the matched tenant is not among the candidates (unhealthy, excluded), it is removed
       from the tree and the first candidate is returned without an insert.
    """

    name = "cache_aware"
    needs_tokens = False
    needs_prediction = False

    def __init__(self, *, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, max_tree_size: int = 2 ** 26,
                 eviction_interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # src/config/validation.rs ConfigValidator (PolicyConfig::CacheAware) + the Rust types.
        _check("cache_threshold", cache_threshold,
               _is_real(cache_threshold) and 0.0 <= cache_threshold <= 1.0,
               "must be between 0.0 and 1.0")
        _check("balance_abs_threshold", balance_abs_threshold,
               isinstance(balance_abs_threshold, int) and not isinstance(balance_abs_threshold,
                                                                         bool)
               and balance_abs_threshold >= 0, "must be an integer >= 0")
        _check("balance_rel_threshold", balance_rel_threshold,
               _is_real(balance_rel_threshold) and balance_rel_threshold >= 1.0,
               "must be >= 1.0")
        _check("max_tree_size", max_tree_size,
               isinstance(max_tree_size, int) and not isinstance(max_tree_size, bool)
               and max_tree_size > 0, "must be an integer > 0")
        _check("eviction_interval_s", eviction_interval_s,
               _is_real(eviction_interval_s) and eviction_interval_s > 0, "must be > 0")
        _check("clock", clock, callable(clock), "must be callable")
        self.cache_threshold = float(cache_threshold)
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = float(balance_rel_threshold)
        self.max_tree_size = max_tree_size
        self.eviction_interval_s = float(eviction_interval_s)
        self._threshold32 = _f32(self.cache_threshold)
        self._rel32 = _f32(self.balance_rel_threshold)
        self._clock = clock
        self._last_eviction = clock()
        self.evictions = 0
        self.tree = ApproxTree()
        self._known: set[int] = set()

    def _maybe_evict(self) -> None:
        # cache_aware.rs with_config: PeriodicTask -> tree.evict_tenant_by_size(max_tree_size)
        now = self._clock()
        if now - self._last_eviction >= self.eviction_interval_s:
            self.tree.evict_tenant_by_size(self.max_tree_size)
            self._last_eviction = now
            self.evictions += 1

    def pick(self, request: RequestView, instances: Sequence[InstanceView]) -> int:
        self._maybe_evict()
        tree = self.tree
        known = self._known
        # cache_aware.rs init_workers / add_worker: tree.insert("", url) per worker.
        for v in instances:
            if v.index not in known:
                known.add(v.index)
                tree.insert("", v.index)
        text = request.text or ""

        # select_worker: min/max load in one pass (over the available workers).
        min_load = max_load = instances[0].in_flight
        min_idx = instances[0].index
        for v in instances:
            load = v.in_flight
            if load < min_load:
                min_load, min_idx = load, v.index
            elif load > max_load:
                max_load = load
        if (max_load - min_load > self.balance_abs_threshold
                and _f32(max_load) > _f32(min_load * self._rel32)):
            # select_worker_min_load: shortest queue; the tree is still updated.
            tree.insert(text, min_idx)
            return min_idx

        matched, tenant, total = tree.prefix_match_with_counts(text)
        match_rate = 0.0 if total == 0 else _f32(matched / total)
        if match_rate > self._threshold32:
            for v in instances:
                if v.index == tenant:
                    tree.insert(text, tenant)
                    return tenant
            # The tenant is gone or unavailable: drop it from the tree, take the first candidate.
            tree.remove_tenant(tenant)
            return instances[0].index
        tree.insert(text, min_idx)
        return min_idx

    def on_complete(self, instance_index: int, request: RequestView) -> None:
        # cache_aware.rs on_request_complete: only a debug log. The load is the router's
        # in-flight counter (decremented by the router), the tree is not touched.
        return None
