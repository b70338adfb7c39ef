"""What completed requests say about the output length of a request still running.

fastsim needs a total output length for every request in an instance's snapshot. A request's
prediction made at dispatch (the length model's P50, or without a model the mean of completed
requests) says nothing once the request has outlived it: fastsim would assume it finishes on
its next step. Output lengths are heavy-tailed (ShareGPT: most answers are short, a few run to
thousands of tokens), so the requests still running past the mean are mostly the long ones —
an instance whose batch is full of such survivors looked about to free its slots, and the
router piled requests onto it (measured: ``benchmarks/results/e2e/e2e_sharegpt-k2*``, TTFT
spikes of 1–2 s on the instance block kept choosing).

``OutputLengthStats.expected_total(g)`` is the empirical E[L | L > g] over a sliding window of
completed requests' output lengths: the mean total length of the requests that outlived ``g``
tokens (survival-conditioned, the mean-residual-life estimate).
"""

from __future__ import annotations

import bisect
import collections
import itertools

import numpy as np


class OutputLengthStats:
    """Output lengths of the last ``window`` completed requests."""

    def __init__(self, window: int = 4096):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._recent: collections.deque[int] = collections.deque(maxlen=window)
        self._sorted: list[int] = []
        self._suffix: list[int] = []  # _suffix[i] = sum(_sorted[i:])
        self._arrays = (np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
        """(_sorted, _suffix) as arrays, for ``expected_totals``."""
        self._stale = 0  # completions since the sorted table was built

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, output_tokens: int) -> None:
        if output_tokens >= 1:
            self._recent.append(int(output_tokens))
            self._stale += 1

    def _table(self) -> list[int]:
        # Rebuild after 1/32 of the window has changed (and at once while the sample is
        # small): O(n log n) per rebuild, not per completion.
        if self._stale and self._stale * 32 >= len(self._recent):
            self._sorted = sorted(self._recent)
            self._suffix = list(itertools.accumulate(reversed(self._sorted)))[::-1] + [0]
            self._arrays = (np.array(self._sorted, dtype=np.int64),
                            np.array(self._suffix, dtype=np.int64))
            self._stale = 0
        return self._sorted

    def expected_total(self, generated: int) -> float | None:
        """E[L | L > generated] over the window; None when the window is empty. When no
        completed request outlived ``generated`` tokens: ``generated`` + the window's mean (a
        survivor longer than everything seen is assumed to run about as long again as an
        average request)."""
        table = self._table()
        n = len(table)
        if n == 0:
            return None
        i = bisect.bisect_right(table, generated)
        if i == n:
            return generated + self._suffix[0] / n
        return self._suffix[i] / (n - i)

    def expected_totals(self, generated: np.ndarray) -> np.ndarray | None:
        """``expected_total`` of every element of ``generated`` (int array), as float64; None
        when the window is empty. One pass for a whole snapshot's requests."""
        table = self._table()
        n = len(table)
        if n == 0:
            return None
        ordered, suffix = self._arrays
        i = np.searchsorted(ordered, generated, side="right")
        inside = np.minimum(i, n - 1)
        return np.where(i == n, generated + suffix[0] / n, suffix[inside] / (n - inside))
