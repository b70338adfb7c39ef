"""The proxy benchmark's paired statistic (``benchmarks/micro/bench_router.py``): the median
per-request difference to the direct connection, with a bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.micro import bench_router as bench


def test_paired_added_is_the_median_of_per_request_differences_in_ms():
    direct = [0.010, 0.020, 0.030, 0.040, 0.050]
    proxied = [0.011, 0.022, 0.033, 0.041, 0.052]  # +1, +2, +3, +1, +2 ms
    med, lo, hi = bench.paired_added(proxied, direct)
    assert med == pytest.approx(2.0)
    assert 1.0 - 1e-9 <= lo <= med <= hi <= 3.0 + 1e-9


def test_drift_shared_by_both_targets_cancels():
    rng = np.random.default_rng(1)
    drift = np.linspace(0.010, 0.030, 400)  # the machine slows down over the run by 20 ms
    direct = drift + rng.normal(0, 1e-4, 400)
    proxied = drift + 0.0015 + rng.normal(0, 1e-4, 400)
    med, lo, hi = bench.paired_added(list(proxied), list(direct))
    assert med == pytest.approx(1.5, abs=0.05)
    assert lo < 1.5 < hi and hi - lo < 0.1
    # The unpaired p50 difference of the same samples is as precise only because the drift is
    # the same for both here; the paired one does not depend on that.
    assert abs((np.median(proxied) - np.median(direct)) * 1e3 - 1.5) < 0.2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1.0), st.floats(-5e-3, 5e-3)), min_size=1,
                max_size=60))
def test_the_interval_contains_the_median(pairs):
    direct = [d for d, _ in pairs]
    proxied = [d + x for d, x in pairs]
    med, lo, hi = bench.paired_added(proxied, direct)
    assert lo - 1e-9 <= med <= hi + 1e-9


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no paired samples"):
        bench.paired_added([], [])


def test_segments_are_medians_between_consecutive_marks_present_in_every_row():
    from benchmarks.micro import proxy_segments

    rows = [{"t0": 0.0, "read": 10.0, "parsed": 30.0, "upstream_sent": 40.0},
            {"t0": 0.0, "read": 20.0, "upstream_sent": 60.0},  # no "parsed": it is left out
            {"t0": 0.0, "read": 30.0, "parsed": 50.0, "upstream_sent": 90.0}]
    got = proxy_segments.segments(rows)
    assert got == [("t0 → read", 20.0), ("read → upstream_sent", 40.0)]
