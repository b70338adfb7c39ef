"""Which prompt pages each instance's radix cache holds, from its cache events.

Keys are SGLang's chained page hashes (``block_sgl.page_hash``): because each hash covers the
whole prefix up to its page, a prompt's cached prefix on an instance is the run of its leading
page hashes that the instance holds.
"""

from __future__ import annotations

import threading

from block_sgl import protocol as p


class PrefixIndex:
    def __init__(self):
        self._pages: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def apply(self, instance: str, message) -> None:
        """Apply one cache event (or a full dump) from ``instance``'s stream."""
        with self._lock:
            pages = self._pages.setdefault(instance, set())
            if isinstance(message, p.CacheStored):
                pages.update(message.block_hashes)
            elif isinstance(message, p.CacheRemoved):
                pages.difference_update(message.block_hashes)
            elif isinstance(message, p.CacheCleared):
                pages.clear()
            elif isinstance(message, p.CacheDump):
                self._pages[instance] = set(message.block_hashes)
            else:
                raise TypeError(f"not a cache event: {type(message).__name__}")

    def matched_pages(self, instance: str, hashes) -> int:
        """Number of leading pages of a prompt (its page hashes: a list, or a lazily computed
        ``page_hash.PromptPages``) cached on ``instance``."""
        pages = self._pages.get(instance)
        if not pages:
            return 0
        if type(hashes) is not list:  # PromptPages: hashes only the pages it needs, in C
            return hashes.leading_in(pages)
        n = 0
        for h in hashes:
            if h not in pages:
                break
            n += 1
        return n

    def size(self, instance: str) -> int:
        return len(self._pages.get(instance, ()))
