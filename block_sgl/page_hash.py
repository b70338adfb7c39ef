"""SGLang's KV-event page hashes, computed from token ids without SGLang.

SGLang 0.5.23 (``sglang/srt/mem_cache/utils.py`` ``get_hash_str`` / ``hash_str_to_int64``)
chains SHA-256 per full page: ``d_i = SHA256(d_{i-1} ‖ page tokens as little-endian uint32)``
(the first page has no parent), and events carry the first 8 bytes of each digest as a signed
int64. The partial last page is never cached, so it has no hash. Verified against real events
by ``tests/integration/test_hooks.py``.
"""

from __future__ import annotations

import hashlib
import struct


def page_digests(token_ids, page_size: int, parent: bytes | None = None) -> list[bytes]:
    """Raw 32-byte digests of every full page of ``token_ids``."""
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0, got {page_size}")
    digests = []
    full = len(token_ids) - len(token_ids) % page_size
    for start in range(0, full, page_size):
        h = hashlib.sha256()
        if parent is not None:
            h.update(parent)
        h.update(struct.pack(f"<{page_size}I", *token_ids[start:start + page_size]))
        parent = h.digest()
        digests.append(parent)
    return digests


def digest_to_int64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big", signed=True)


def page_hashes(token_ids, page_size: int) -> list[int]:
    """The int64 page hashes SGLang's cache events carry for a prompt's full pages."""
    return [digest_to_int64(d) for d in page_digests(token_ids, page_size)]
