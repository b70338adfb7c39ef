"""The GPU-speed emulator's step padding (block_sgl/hooks/emulate.py), without SGLang: a
forward that is faster than the emulated step is padded to it; one that is slower (the CPU
cannot keep up at this time scale) is counted and reported in the log."""

import logging
import time
import types

from block_sgl.hooks.emulate import StepEmulator, step_shape
from block_sgl.predictor.gpu_profiles import GpuStepProfile


class _Mode:
    def __init__(self, decode):
        self.decode = decode

    def is_idle(self):
        return False

    def is_decode(self):
        return self.decode


def decode_batch(size=4, context=4000):
    return types.SimpleNamespace(forward_mode=_Mode(True), batch_size=size, seq_lens_sum=context)


def test_a_fast_forward_is_padded_to_the_emulated_step_time():
    emulator = StepEmulator(GpuStepProfile.load("h100-llama2-7b"), time_scale=1.0, seed=0)
    batch = decode_batch()
    target = emulator.profile.mean_seconds(step_shape(batch))
    started = time.perf_counter()
    assert emulator.around_forward(lambda runner, fb: "out", None, batch) == "out"
    took = time.perf_counter() - started
    assert took >= 0.5 * target and emulator.steps == 1 and emulator.overshoot_steps == 0


def test_a_forward_slower_than_the_emulated_step_is_counted_and_logged(caplog):
    emulator = StepEmulator(GpuStepProfile.load("h100-llama2-7b"), time_scale=0.01, seed=0)
    batch = decode_batch()

    def slow_forward(runner, fb):
        time.sleep(0.02)  # far above 1 % of an H100 decode step
        return "out"

    with caplog.at_level(logging.WARNING, logger="block_sgl.hooks.emulate"):
        for _ in range(3):
            emulator.after_scheduler_idle(None)  # separate busy stretches: no gap credit
            assert emulator.around_forward(slow_forward, None, batch) == "out"
    assert emulator.steps == 3 and emulator.overshoot_steps == 3
    warnings = [r.getMessage() for r in caplog.records if "emulation" in r.getMessage()]
    assert len(warnings) == 2  # the 1st and 2nd overshoot, then the 4th, 8th, ...
    assert "1 of 1 steps ran longer" in warnings[0] and "BLOCK_SGL_TIME_SCALE" in warnings[0]
    assert "2 of 2 steps" in warnings[1]


def test_overshoot_summary_read_back_from_an_instance_log():
    from block_sgl.hooks.emulate import overshoot_from_log

    log = """[2026-11-28 20:50:20 DP0] block_sgl emulation: 32 of 32 steps ran longer than the emulated GPU step (last: ...)
[2026-11-28 20:50:26 DP1] block_sgl emulation: 64 of 64 steps ran longer than the emulated GPU step (last: ...)
[2026-11-28 20:50:27 DP0] some other line mentioning block_sgl emulation: 1 of 2 steps
[2026-11-28 20:51:12 DP1] block_sgl emulation: 256 of 260 steps ran longer than the emulated GPU step
[2026-11-28 21:00:00] block_sgl emulation: 2 of 40 steps ran longer than the emulated GPU step
"""
    assert overshoot_from_log(log) == {"DP0": (32, 32), "DP1": (256, 260), "": (2, 40)}
    assert overshoot_from_log("[2026-11-28 20:50:20 DP0] Prefill batch.\n") == {}
