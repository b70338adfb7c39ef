"""Step-latency profiling of a live instance (issue: predictors) on the CPU test bed."""

import json
import subprocess
import sys

import numpy as np

from block_sgl.predictor import perf_model
from block_sgl.predictor.gpu_profiles import GpuStepProfile
from block_sgl.predictor.profile import ProfileGrid, drive_grid, Driver, stream_records

from ..conftest import EMULATED_PROFILE, TIME_SCALE


def test_profile_command_writes_a_loadable_model(cluster, tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "block_sgl.predictor.profile", "--url", cluster.urls[1],
         "--publish", cluster.publish_endpoints[1], "--out", str(out), "--repeats", "1",
         "--max-decode-batch", "8", "--max-prefill", "2048"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n" + cluster.diagnose()
    doc = json.loads(out.read_text())
    model = perf_model.load_step_model(out)
    assert doc["source"]["method"] == "stream" and doc["source"]["records"] > 50
    # The fitted model recovers the emulated GPU: decode at batch 1 ~ the profile x time scale.
    profile = GpuStepProfile.load(EMULATED_PROFILE)
    from block_sgl.predictor.gpu_profiles import StepShape
    expected = TIME_SCALE * profile.mean_seconds(StepShape.for_requests([], [], [300]))
    got = model.step_time(0, 0, 1, 300)
    assert abs(got - expected) / expected < 0.15, (got, expected)


def test_model_fitted_on_instance_records_predicts_held_out_steps(cluster):
    """Fit on the instance's own step records, predict the held-out half: median error <= 5 %."""
    grid = ProfileGrid(prefill_lengths=(256, 1024, 2048), prefix_lengths=(0, 1024),
                       decode_batches=(1, 2, 4, 8), repeats=1)
    driver = Driver(cluster.urls[0], seed=7)
    records = stream_records(cluster.publish_endpoints[0], lambda: drive_grid(driver, grid))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    model = perf_model.fit(records.subset(train))
    errors = perf_model.relative_errors(model, records.subset(test))
    assert np.median(errors) <= 0.05, (np.median(errors), model)
