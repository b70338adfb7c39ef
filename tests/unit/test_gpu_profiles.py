import numpy as np
import pytest

from block_sgl.predictor.gpu_profiles import PROFILES, GpuStepProfile, StepShape
from block_sgl.predictor.step_model import DEFAULT_H100_LLAMA2_7B


@pytest.fixture(scope="module", params=sorted(PROFILES))
def profile(request):
    return GpuStepProfile.load(request.param)


def test_unknown_profile_names_the_valid_ones():
    with pytest.raises(ValueError, match="h100-llama2-7b"):
        GpuStepProfile.load("tpu-v9")


def test_step_time_grows_with_work(profile):
    prefill = [profile.mean_seconds(StepShape.for_requests([n], [0], [])) for n in (128, 512, 2048, 8192)]
    assert prefill == sorted(prefill) and prefill[-1] > 4 * prefill[0]
    decode = [profile.mean_seconds(StepShape.for_requests([], [], [1000] * b)) for b in (1, 16, 64, 256)]
    assert decode == sorted(decode)
    cached = profile.mean_seconds(StepShape.for_requests([512], [4096], []))
    assert cached > prefill[1]  # attending to a cached prefix costs something
    assert profile.mean_seconds(StepShape()) == 0.0


def test_h100_decode_step_is_in_the_known_range():
    # Llama-2-7B batch-1 decode on an H100 runs at roughly 5-10 ms per token.
    p = GpuStepProfile.load("h100-llama2-7b")
    t = p.mean_seconds(StepShape.for_requests([], [], [512]))
    assert 0.004 < t < 0.010


def test_sampling_follows_the_measured_spread(profile):
    shape = StepShape.for_requests([1024], [0], [])
    rng = np.random.default_rng(0)
    samples = np.array([profile.sample_seconds(shape, rng) for _ in range(2000)])
    mean = profile.mean_seconds(shape)
    assert samples.std() > 0
    assert abs(np.median(samples) - mean) / mean < 0.02


def test_default_step_model_tracks_the_h100_profile():
    p = GpuStepProfile.load("h100-llama2-7b")
    rng = np.random.default_rng(1)
    errors = []
    for _ in range(300):
        if rng.random() < 0.5:
            shape = StepShape.for_requests([int(rng.integers(1, 8192))], [int(rng.integers(0, 8000))], [])
        else:
            shape = StepShape.for_requests([], [], list(rng.integers(10, 4000, size=int(rng.integers(1, 256)))))
        truth = p.mean_seconds(shape)
        pred = DEFAULT_H100_LLAMA2_7B.step_time(shape.prefill_tokens, shape.prefill_context_tokens,
                                                shape.decode_seqs, shape.decode_context_tokens)
        errors.append(abs(pred - truth) / truth)
    assert np.median(errors) < 0.03
