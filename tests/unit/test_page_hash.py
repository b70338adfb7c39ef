"""Router-side page hashing equals a direct transcription of SGLang's chained SHA-256
(``mem_cache/utils.py`` get_hash_str / hash_str_to_int64), in both implementations (the
compiled ``block_sgl._page_hash.PromptPages`` and its pure-Python specification); live equality
with SGLang's cache events is checked in tests/integration/test_hooks.py."""

import hashlib
import importlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import block_sgl.page_hash as ph
from block_sgl.page_hash import PurePromptPages, page_hashes

IMPLEMENTATIONS = [PurePromptPages]
if ph.implementation() == "compiled":
    IMPLEMENTATIONS.append(ph.PromptPages)
IDS = [pytest.param(cls, id="python" if cls is PurePromptPages else "compiled")
       for cls in IMPLEMENTATIONS]


def reference(token_ids, page_size):
    out, parent = [], None
    for start in range(0, len(token_ids) - len(token_ids) % page_size, page_size):
        h = hashlib.sha256()
        if parent is not None:
            h.update(parent)
        h.update(struct.pack(f"<{page_size}I", *token_ids[start:start + page_size]))
        parent = h.digest()
        out.append(int.from_bytes(parent[:8], "big", signed=True))
    return out


@pytest.mark.parametrize("pages_class", IDS)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1), max_size=300), st.sampled_from([1, 4, 16, 64]),
       st.data())
def test_hashes_equal_the_reference_and_lazy_pages_agree(pages_class, ids, page_size, data):
    expected = reference(ids, page_size)
    assert page_hashes(ids, page_size) == expected
    pages = pages_class(ids, page_size)
    assert len(pages) == len(expected)
    if expected:  # random access first, then the rest
        i = data.draw(st.integers(0, len(expected) - 1))
        assert pages.hash(i) == expected[i]
    assert list(pages) == expected and pages.all() == expected


@pytest.mark.parametrize("pages_class", IDS)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1), min_size=1, max_size=200),
       st.sampled_from([1, 4, 16]), st.integers(0, 20), st.floats(0, 10), st.data())
def test_leading_matches_count_the_cached_prefix(pages_class, ids, page_size, held, now, data):
    """``leading_in`` = the run of leading pages a cache holds (what ``PrefixIndex`` needs);
    ``leading_unexpired`` = the run whose expiry is >= now (speculative entries)."""
    expected = reference(ids, page_size)
    held = min(held, len(expected))
    cache = set(expected[:held]) | {12345}
    if held < len(expected) - 1 and data.draw(st.booleans()):
        cache.add(expected[-1])  # a later page held without its parent does not count
    # Fresh objects: matching must compute the hashes it needs itself (no all() beforehand).
    assert pages_class(ids, page_size).leading_in(cache) == held
    assert pages_class(ids, page_size).leading_in(dict.fromkeys(cache)) == held
    expiry = {h: data.draw(st.floats(0, 10)) for h in expected}
    want = 0
    while want < len(expected) and expiry[expected[want]] >= now:
        want += 1
    assert pages_class(ids, page_size).leading_unexpired(expiry, now) == want


@pytest.mark.parametrize("pages_class", IDS)
def test_invalid_ids_and_page_sizes_are_refused(pages_class):
    with pytest.raises(ValueError, match="page_size must be > 0"):
        pages_class([1, 2], 0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*32\)"):
        pages_class([-1] * 16, 16)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*32\)"):
        pages_class([1] * 15 + [2 ** 32], 16)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*32\)"):
        page_hashes([-1] * 16, 16)
    with pytest.raises(IndexError):
        pages_class([1] * 16, 16).hash(1)
    with pytest.raises(IndexError):
        pages_class([1] * 16, 16).hash(-1)
    computed = pages_class([1] * 32, 16)
    computed.all()
    with pytest.raises(IndexError):  # no negative indexing, computed or not
        computed.hash(-1)
    with pytest.raises(TypeError):
        pages_class((1.5,) * 16, 16)  # a tuple converts as a list does
    # the partial last page is never hashed, so its ids are not read either
    assert pages_class([1] * 16 + [2 ** 40], 16).all() == reference([1] * 16, 16)
    assert len(pages_class([], 16)) == 0 and pages_class([], 16).all() == []
    assert pages_class([], 16).leading_in({1}) == 0


@pytest.mark.parametrize("pages_class", IDS)
def test_numpy_and_list_inputs_agree_and_out_of_range_ids_are_refused(pages_class):
    ids = list(range(1000, 1064))
    assert page_hashes(np.asarray(ids), 16) == page_hashes(ids, 16) == reference(ids, 16)
    for arr in (np.asarray(ids, dtype=np.int32), np.asarray(ids, dtype=np.uint64),
                np.asarray(ids), tuple(ids)):
        assert pages_class(arr, 16).all() == reference(ids, 16)
    for bad in ([2 ** 32] * 16, np.full(16, -5), np.full(16, 2 ** 32)):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*32\)"):
            pages_class(bad, 16)


def test_compiled_page_hasher_is_selected():
    """Fails if the extension did not build (the router would otherwise not start at all)."""
    if os.environ.get("BLOCK_SGL_PAGE_HASH_PURE") == "1":
        pytest.skip("the pure-Python twin was requested")
    assert ph.implementation() == "compiled"
    assert ph.PromptPages.__module__ == "block_sgl._page_hash"


def test_env_var_selects_the_twin():
    code = "import block_sgl.page_hash as p; print(p.implementation())"
    env = dict(os.environ, BLOCK_SGL_PAGE_HASH_PURE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "python"


def test_missing_extension_is_an_import_error(monkeypatch):
    monkeypatch.delenv("BLOCK_SGL_PAGE_HASH_PURE", raising=False)
    monkeypatch.setitem(sys.modules, "block_sgl._page_hash", None)  # import fails
    monkeypatch.delattr(importlib.import_module("block_sgl"), "_page_hash", raising=False)
    monkeypatch.delitem(sys.modules, "block_sgl.page_hash")
    with pytest.raises(ImportError, match="not built"):
        importlib.import_module("block_sgl.page_hash")
    monkeypatch.undo()
    assert importlib.import_module("block_sgl.page_hash") is ph
