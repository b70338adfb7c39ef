"""GPU-speed emulation: a real SGLang instance's step durations follow the GPU profile.

Step durations are measured from the client, so everything SGLang does is included:
* prefill: TTFT of an L-token prompt minus TTFT of a 16-token prompt (both one step; the
  difference cancels HTTP, tokenisation and scheduling costs that are not GPU time);
* decode: (E2E with 80 new tokens − E2E with 20) / 60 for a batch of b concurrent requests.
Each is compared with the profile's expected step time × the time scale.
"""

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from block_sgl.predictor.gpu_profiles import GpuStepProfile, StepShape

from ..conftest import EMULATED_PROFILE, TIME_SCALE


def timed_generate(url, ids, new_tokens):
    body = json.dumps({"input_ids": ids, "sampling_params": {
        "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0}}).encode()
    start = time.perf_counter()
    req = urllib.request.Request(f"{url}/generate", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - start


def prompt(length, salt):
    rng = np.random.default_rng(salt)  # fresh tokens: nothing cached
    return rng.integers(100, 20000, size=length).tolist()


def test_step_durations_match_the_profile(cluster):
    url = cluster.urls[1]
    profile = GpuStepProfile.load(EMULATED_PROFILE)
    for k in range(3):  # warm up (first requests pay one-off costs)
        timed_generate(url, prompt(64, 1000 + k), 4)
    errors = {}
    for length in (1024, 2048, 4000):
        measured = statistics.median(
            timed_generate(url, prompt(length, 10 * length + k), 1)
            - timed_generate(url, prompt(16, 20 * length + k), 1) for k in range(3))
        expected = TIME_SCALE * (profile.mean_seconds(StepShape.for_requests([length], [0], []))
                                 - profile.mean_seconds(StepShape.for_requests([16], [0], [])))
        errors[f"prefill-{length}"] = (measured, expected)
    for batch in (1, 4, 8):
        def batch_e2e(new_tokens, salt):
            with ThreadPoolExecutor(batch) as pool:
                return max(pool.map(lambda i: timed_generate(url, prompt(200, salt + i), new_tokens),
                                    range(batch)))
        measured = (batch_e2e(80, 5000 + 100 * batch) - batch_e2e(20, 7000 + 100 * batch)) / 60
        mean_context = 200 + 50  # the context grows from 220 to 280 over the measured steps
        expected = TIME_SCALE * profile.mean_seconds(StepShape.for_requests([], [], [mean_context] * batch))
        errors[f"decode-bs{batch}"] = (measured, expected)
    relative = {k: abs(m - e) / e for k, (m, e) in errors.items()}
    report = {k: f"{m * 1e3:.1f} ms vs {e * 1e3:.1f} ms" for k, (m, e) in errors.items()}
    assert statistics.median(relative.values()) <= 0.10, report
    assert max(relative.values()) <= 0.25, report
