"""Router-side page hashing equals a direct transcription of SGLang's chained SHA-256
(``mem_cache/utils.py`` get_hash_str / hash_str_to_int64); live equality with SGLang's cache
events is checked in tests/integration/test_hooks.py."""

import hashlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from block_sgl.page_hash import PromptPages, page_hashes


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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2 ** 32 - 1), max_size=300), st.sampled_from([1, 4, 16, 64]))
def test_hashes_equal_the_reference_and_lazy_pages_agree(ids, page_size):
    expected = reference(ids, page_size)
    assert page_hashes(ids, page_size) == expected
    pages = PromptPages(ids, page_size)
    assert len(pages) == len(expected)
    if expected:  # random access first, then the rest
        assert pages.hash(len(expected) // 2) == expected[len(expected) // 2]
    assert list(pages) == expected and pages.all() == expected


def test_invalid_ids_and_page_sizes_are_refused():
    with pytest.raises(ValueError, match="page_size must be > 0"):
        PromptPages([1, 2], 0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*32\)"):
        page_hashes([-1] * 16, 16)
    with pytest.raises(IndexError):
        PromptPages([1] * 16, 16).hash(1)


def test_numpy_and_list_inputs_agree_and_out_of_range_ids_are_refused():
    import numpy as np

    ids = list(range(1000, 1064))
    assert page_hashes(np.asarray(ids), 16) == page_hashes(ids, 16) == reference(ids, 16)
    assert PromptPages(np.asarray(ids, dtype=np.int32), 16).all() == reference(ids, 16)
    for bad in ([2 ** 32] * 16, np.full(16, -5), np.full(16, 2 ** 32)):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*32\)"):
            PromptPages(bad, 16)
