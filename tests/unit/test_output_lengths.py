"""Survival-conditioned output lengths (``block_sgl.router.lengths``)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from block_sgl.router.lengths import OutputLengthStats


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=300), st.integers(0, 6000),
       st.integers(1, 400))
def test_expected_total_is_the_mean_of_the_survivors_in_the_window(lengths, generated, window):
    stats = OutputLengthStats(window=window)
    for n in lengths:
        stats.add(n)
        stats.expected_total(0)  # interleaved reads must not leave a stale table behind
    # The table may lag the window by < 1/32 of it; the answer must match one of the recent
    # windows exactly, and the full window once it is rebuilt.
    recent = lengths[-window:]
    survivors = [n for n in recent if n > generated]
    expected = sum(survivors) / len(survivors) if survivors else \
        generated + sum(recent) / len(recent)
    fresh = OutputLengthStats(window=window)
    for n in recent:
        fresh.add(n)
    assert fresh.expected_total(generated) == pytest.approx(expected)
    assert len(stats) == len(recent)
    assert stats.expected_total(generated) > generated


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=200))
def test_expected_total_never_falls_as_a_request_grows(lengths):
    stats = OutputLengthStats()
    for n in lengths:
        stats.add(n)
    totals = [stats.expected_total(g) for g in range(0, 5100, 37)]
    assert all(a <= b + 1e-9 for a, b in zip(totals, totals[1:]))


def test_empty_window_and_bad_input():
    stats = OutputLengthStats()
    assert stats.expected_total(10) is None
    stats.add(0)  # an empty completion says nothing about lengths
    assert len(stats) == 0
    with pytest.raises(ValueError, match="window"):
        OutputLengthStats(window=0)


def test_heavy_tail_survivors_expect_the_tail():
    stats = OutputLengthStats()
    for n in [100] * 80 + [1500] * 20:
        stats.add(n)
    assert stats.expected_total(0) == pytest.approx(380)
    assert stats.expected_total(50) == pytest.approx(380)
    assert stats.expected_total(600) == pytest.approx(1500)
    assert stats.expected_total(2000) == pytest.approx(2380)
