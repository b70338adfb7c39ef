"""SGLang's KV-event page hashes, computed from token ids without SGLang.

SGLang 0.5.23 (``sglang/srt/mem_cache/utils.py`` ``get_hash_str`` / ``hash_str_to_int64``)
chains SHA-256 per full page: ``d_i = SHA256(d_{i-1} ‖ page tokens as little-endian uint32)``
(the first page has no parent), and events carry the first 8 bytes of each digest as a signed
int64. The partial last page is never cached, so it has no hash. Verified against real events
by ``tests/integration/test_hooks.py``.

``PromptPages`` (what the router uses) is the compiled ``block_sgl._page_hash.PromptPages``
(OpenSSL's SHA-256 over one buffer, no Python object per page but the hash itself); its
specification is ``PurePromptPages`` below, which ``BLOCK_SGL_PAGE_HASH_PURE=1`` selects instead
(for debugging; a missing build is an ImportError, never a silent fallback). The unit tests run
both.
"""

from __future__ import annotations

import hashlib
import os
import sys
from array import array

import numpy as np

_U32 = next(code for code in "IL" if array(code).itemsize == 4)


def _le_u32_bytes(token_ids) -> bytes:
    """``token_ids`` as little-endian uint32 bytes. ``array`` converts a list of ints ~3x faster
    than numpy and rejects values outside [0, 2**32) itself (OverflowError)."""
    if isinstance(token_ids, np.ndarray):
        ids = token_ids.astype(np.int64, copy=False)
        if len(ids) and (ids.min() < 0 or ids.max() > 0xFFFFFFFF):
            raise ValueError("token ids must be in [0, 2**32)")
        return ids.astype("<u4").tobytes()
    try:
        packed = array(_U32, token_ids)
    except OverflowError:
        raise ValueError("token ids must be in [0, 2**32)") from None
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def page_digests(token_ids, page_size: int, parent: bytes | None = None) -> list[bytes]:
    """Raw 32-byte digests of every full page of ``token_ids``."""
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    full = len(token_ids) - len(token_ids) % page_size
    if full == 0:
        return []
    # One conversion for the whole prompt, then one SHA-256 per page over a bytes slice.
    data = _le_u32_bytes(token_ids[:full])
    step = page_size * 4
    sha256 = hashlib.sha256
    digests = []
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        parent = sha256(parent + chunk if parent is not None else chunk).digest()
        digests.append(parent)
    return digests


def digest_to_int64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big", signed=True)


def page_hashes(token_ids, page_size: int) -> list[int]:
    """The int64 page hashes SGLang's cache events carry for a prompt's full pages."""
    return [digest_to_int64(d) for d in page_digests(token_ids, page_size)]


class PurePromptPages:
    """A prompt's page-hash chain, computed lazily: routing only needs the hashes up to the
    longest prefix any instance holds (usually a few pages), the speculative cache entries
    need the whole chain later (``all()``). The specification of the compiled
    ``block_sgl._page_hash.PromptPages`` (same methods, results and errors)."""

    __slots__ = ("page_size", "n_pages", "_data", "_digests", "_hashes")

    def __init__(self, token_ids, page_size: int):
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.page_size = page_size
        self.n_pages = len(token_ids) // page_size
        full = self.n_pages * page_size
        self._data = _le_u32_bytes(token_ids[:full])
        self._digests: list[bytes] = []
        self._hashes: list[int] = []

    def __len__(self) -> int:
        return self.n_pages

    def hash(self, i: int) -> int:
        """The int64 hash of page ``i`` (computing the chain up to it if needed)."""
        hashes = self._hashes
        if 0 <= i < len(hashes):
            return hashes[i]
        if not 0 <= i < self.n_pages:
            raise IndexError(i)
        digests, data, step = self._digests, self._data, self.page_size * 4
        sha256 = hashlib.sha256
        parent = digests[-1] if digests else None
        for k in range(len(hashes), i + 1):
            chunk = data[k * step:(k + 1) * step]
            parent = sha256(parent + chunk if parent is not None else chunk).digest()
            digests.append(parent)
            hashes.append(int.from_bytes(parent[:8], "big", signed=True))
        return hashes[i]

    def all(self) -> list[int]:
        if self.n_pages:
            self.hash(self.n_pages - 1)
        return list(self._hashes)

    def __iter__(self):
        for i in range(self.n_pages):
            yield self.hash(i)

    def leading_in(self, container) -> int:
        """How many leading pages have their hash ``in container`` (a set or dict of hashes):
        the prompt's cached prefix, in pages, on an instance whose radix cache holds
        ``container`` (chained hashes: a page can only be cached after its parent)."""
        n = 0
        while n < self.n_pages and self.hash(n) in container:
            n += 1
        return n

    def leading_unexpired(self, expiry: dict, now: float) -> int:
        """How many leading pages have ``expiry[hash] >= now`` (speculative cache entries)."""
        n = 0
        while n < self.n_pages:
            e = expiry.get(self.hash(n))
            if e is None or e < now:
                break
            n += 1
        return n


def implementation() -> str:
    """``"compiled"`` or ``"python"``: which ``PromptPages`` the router uses."""
    return "python" if PromptPages is PurePromptPages else "compiled"


if os.environ.get("BLOCK_SGL_PAGE_HASH_PURE") == "1":
    PromptPages = PurePromptPages
else:
    try:
        from block_sgl._page_hash import PromptPages
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            "block_sgl._page_hash (the compiled page hasher) is not built. Build it with "
            "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace` "
            "(needs OpenSSL's headers: libssl-dev); set BLOCK_SGL_PAGE_HASH_PURE=1 to run the "
            "pure-Python twin instead.") from exc
