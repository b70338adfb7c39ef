"""GPU-speed emulation: a real SGLang instance's step durations follow the GPU profile.

Step durations are the scheduler's own (the block_sgl stream's StepRecords, measured by the
scheduler hooks, independently of the emulator: the cadence between the ends of back-to-back
steps, or from run_batch after idle), so SGLang's CPU work per step is included. Each step is
compared with the profile's expected time for its exact shape × the time scale; per kind of
step (prefill of 1024 / 2048 / 4000 tokens, decode at batch 1 / 4 / 8) the median relative
error is taken.
"""

import json
import statistics
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from block_sgl.predictor.gpu_profiles import GpuStepProfile, StepShape
from block_sgl.router.ingest import StreamSubscriber

from ..conftest import EMULATED_PROFILE, TIME_SCALE, stream_report


def generate(url, ids, new_tokens):
    body = json.dumps({"input_ids": ids, "sampling_params": {
        "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0}}).encode()
    req = urllib.request.Request(f"{url}/generate", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def prompt(length, salt):
    return np.random.default_rng(salt).integers(100, 20000, size=length).tolist()  # nothing cached


def test_step_durations_match_the_profile(cluster):
    url, endpoint = cluster.urls[1], cluster.publish_endpoints[1]
    profile = GpuStepProfile.load(EMULATED_PROFILE)
    sub = StreamSubscriber([endpoint])
    sub.start()
    try:
        assert sub.wait_until(lambda s: not s.stale(), 30), \
            f"{stream_report(sub)}\n{cluster.diagnose()}"
        state = sub.states[endpoint]
        for k in range(2):
            generate(url, prompt(64, 1000 + k), 4)  # warm-up
        state.steps = type(state.steps)(maxlen=None)
        for length in (1024, 2048, 4000):
            for k in range(3):
                generate(url, prompt(length, 10 * length + k), 1)
        for batch in (1, 4, 8):
            with ThreadPoolExecutor(batch) as pool:
                list(pool.map(lambda i: generate(url, prompt(200, 100 * batch + i), 40), range(batch)))
        assert sub.wait_until(lambda s: sum(len(r.num_reqs) for r in state.steps) > 100, 10)
        steps = [dict(zip(("mode", "reqs", "extend", "pairs", "ctx", "seconds"), row))
                 for rec in state.steps for row in zip(
                     rec.forward_mode, rec.num_reqs, rec.extend_tokens, rec.prefill_context_tokens,
                     rec.decode_context_tokens, rec.duration_s)]
    finally:
        sub.stop()
    groups = {}
    for s in steps:
        if s["mode"] == "extend" and s["extend"] in (1024, 2048, 4000):
            key = f"prefill-{s['extend']}"
            shape = StepShape(prefill_tokens=s["extend"], prefill_context_tokens=s["pairs"], prefill_seqs=1)
        elif s["mode"] == "decode" and s["reqs"] in (1, 4, 8):
            key = f"decode-bs{s['reqs']}"
            shape = StepShape(decode_seqs=s["reqs"], decode_context_tokens=s["ctx"])
        else:
            continue
        expected = TIME_SCALE * profile.mean_seconds(shape)
        groups.setdefault(key, []).append((s["seconds"], expected))
    assert set(groups) == {"prefill-1024", "prefill-2048", "prefill-4000",
                           "decode-bs1", "decode-bs4", "decode-bs8"}, sorted(groups)
    relative = {k: statistics.median(abs(m - e) / e for m, e in v) for k, v in groups.items()}
    report = {k: f"median {statistics.median(m for m, _ in v) * 1e3:.1f} ms vs "
                 f"{statistics.median(e for _, e in v) * 1e3:.1f} ms ({len(v)} steps)"
              for k, v in groups.items()}
    print("emulation step durations:", report, {k: round(v, 4) for k, v in relative.items()})
    # the instance log names steps whose real CPU forward outlasted the emulated step
    assert statistics.median(relative.values()) <= 0.10, f"{report}\n{cluster.diagnose()}"
    assert max(relative.values()) <= 0.25, f"{report}\n{cluster.diagnose()}"
