"""The e2e benchmark's smoke mode runs end to end and writes well-formed results.

It starts its own 2 SGLang instances (``--smoke``: block vs round_robin on 16 Mooncake requests,
one rate, one seed), so it checks the pipeline — cluster, routers, workload, client, outputs —
not the numbers (~2-3 min on the 2-core CI box, most of it SGLang start-up)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _load(path: Path):
    return json.loads(path.read_text(), parse_constant=_reject_constant)


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


@pytest.mark.timeout(1500)
def test_smoke_run_writes_well_formed_results(tmp_path):
    if importlib.util.find_spec("sglang") is None:
        pytest.fail("the e2e smoke test needs SGLang: run scripts/setup.sh")
    out = tmp_path / "e2e"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e.run", "--smoke", "--out", str(out),
         "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=1400,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    full, summ, md = out / "e2e_smoke.json", out / "e2e_smoke_summary.json", out / "e2e_smoke.md"
    for p in (full, summ, md):
        assert p.is_file() and p.stat().st_size > 0, p
    # matplotlib is a dev requirement: the plots are part of the results, not optional here
    for p in (out / "e2e_smoke_latency_mooncake.png", out / "e2e_smoke_capacity.png"):
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p

    results, summary = _load(full), _load(summ)
    meta = results["meta"]
    for key in ("machine", "git", "cluster", "slo", "seeds", "tag", "versions", "workloads"):
        assert key in meta, key
    assert meta["cluster"]["instances"] == 2 and meta["cluster"]["time_scale"] > 0
    # what the emulator logged about steps that outlasted it (empty: none did), per instance
    assert set(meta["cluster"]["emulation_overshoot"]) == {"0", "1"}, meta["cluster"]
    assert meta["workloads"]["mooncake"]["0"]["length_scale"] > 0

    rows = results["capacity"]["mooncake"]
    assert {r["router"] for r in rows} == {"block_sgl/block", "block_sgl/round_robin"}
    for r in rows:
        assert math.isfinite(r["capacity_rps"]) and r["capacity_rps"] >= 0
        assert r["points"] and r["points"][0]["ttft_s_p99"]["median"] > 0
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        assert run["completed"] > 0 and run["errors"] == 0, run
        assert run["ttft_s"]["p50"] > 0 and run["e2e_s"]["p50"] > 0
        assert 0 <= run["prefix_hit_ratio"] <= 1
        assert run["output_len_mismatch"] == 0, "max_new_tokens + ignore_eos not enforced"

    assert "mooncake" in summary["capacity_gain_vs_best_baseline"]
    gain = summary["capacity_gain_vs_best_baseline"]["mooncake"]
    assert gain is None or math.isfinite(gain)
    for x in _numbers(summary):
        assert math.isfinite(x), summary
    assert "| block_sgl/block |" in md.read_text()
