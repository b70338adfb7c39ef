"""GPU-speed emulation for CPU test beds (LLM-Emu's idea, applied to SGLang).

With ``BLOCK_SGL_EMULATE=<profile>`` every forward step of SGLang's model runner lasts as long as
it would on the named GPU + model (``block_sgl.predictor.gpu_profiles``), times
``BLOCK_SGL_TIME_SCALE``: an AROUND hook on ``ModelRunner.forward`` runs the tiny model's real
forward, then sleeps for the rest of a step time drawn from the profile's measured variability.
Everything else — tokenizer manager, scheduler, radix cache, batching, HTTP — is real SGLang.

Back-to-back steps: on a GPU, SGLang's overlap scheduler prepares step N+1 on the CPU while the
GPU runs step N, so a busy instance's step cadence is the GPU step time. On the CPU test bed the
scheduler's own work between two forwards (batch bookkeeping, sampling, detokenizer hand-off:
a few ms here) would add to every step. So when a forward starts less than
``MAX_OVERHEAD_GAP_S`` after the previous one ended, that gap is counted as part of the emulated
step (the sleep is shortened by it, never below zero): the busy cadence then matches the profile.
A longer gap, or any gap in which the scheduler went idle (an AFTER hook on
``Scheduler.on_idle`` resets the chain), is idle time, not overhead, and is not compensated.

The step's shape is read from the ``ForwardBatch`` SGLang hands the model runner
(``sglang/srt/model_executor/forward_batch_info.py``): for EXTEND (and MIXED) batches
``extend_seq_lens_cpu`` / ``extend_prefix_lens_cpu`` per request; for DECODE batches
``batch_size`` and ``seq_lens_sum`` (each decoding request reads its whole context).
"""

from __future__ import annotations

import logging
import re
import threading
import time

import numpy as np

from block_sgl.predictor.gpu_profiles import GpuStepProfile, StepShape

logger = logging.getLogger(__name__)

MODEL_RUNNER_FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
SCHEDULER_ON_IDLE = "sglang.srt.managers.scheduler.Scheduler.on_idle"


def step_shape(forward_batch) -> StepShape:
    """The ``StepShape`` of one SGLang ``ForwardBatch`` (zero for idle batches)."""
    mode = forward_batch.forward_mode
    if mode.is_idle():
        return StepShape()
    if mode.is_decode():
        return StepShape(decode_seqs=int(forward_batch.batch_size),
                         decode_context_tokens=int(forward_batch.seq_lens_sum))
    extend = forward_batch.extend_seq_lens_cpu or []
    prefix = forward_batch.extend_prefix_lens_cpu or [0] * len(extend)
    return StepShape.for_requests(list(extend), list(prefix), [])


MAX_OVERHEAD_GAP_S = 0.050


class StepEmulator:
    """Makes each wrapped forward call last a sampled profile step time × ``time_scale``."""

    def __init__(self, profile: GpuStepProfile, time_scale: float, seed: int | None = None):
        self.profile = profile
        self.time_scale = time_scale
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._previous_end: float | None = None
        self.steps = 0
        self.overshoot_steps = 0
        """Steps whose real forward already took longer than the emulated time."""

    def target_seconds(self, shape: StepShape) -> float:
        with self._lock:
            return self.profile.sample_seconds(shape, self._rng) * self.time_scale

    def after_scheduler_idle(self, result, *args, **kwargs):
        self._previous_end = None  # the next forward starts a new busy stretch
        return None

    def around_forward(self, original, runner, forward_batch, *args, **kwargs):
        start = time.perf_counter()
        out = original(runner, forward_batch, *args, **kwargs)
        target = self.target_seconds(step_shape(forward_batch))
        gap = 0.0 if self._previous_end is None else start - self._previous_end
        began = start - gap if 0.0 <= gap < MAX_OVERHEAD_GAP_S else start
        remaining = target - (time.perf_counter() - began)
        self.steps += 1
        if remaining > 0:
            time.sleep(remaining)
        elif target > 0:
            self.overshoot_steps += 1
            self._warn_overshoot(step_shape(forward_batch), target, target - remaining)
        self._previous_end = time.perf_counter()
        return out


    def _warn_overshoot(self, shape: StepShape, target: float, took: float) -> None:
        # The emulator can only slow steps down: a real forward slower than the emulated GPU
        # step makes that step (and the test bed's timing) real CPU time. Say so, rarely.
        n = self.overshoot_steps
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... time
            logger.warning(
                "block_sgl emulation: %d of %d steps ran longer than the emulated GPU step "
                "(last: %s took %.1f ms, emulated %.1f ms); raise BLOCK_SGL_TIME_SCALE "
                "(now %g) for faithful timing", n, self.steps, shape, took * 1e3,
                target * 1e3, self.time_scale)


_OVERSHOOT_LINE = re.compile(
    r"^\[[^\]]*?(?: (?P<label>[A-Z]+\d+))?\] block_sgl emulation: (?P<n>\d+) of (?P<m>\d+) steps",
    re.MULTILINE)


def overshoot_from_log(text: str) -> dict[str, tuple[int, int]]:
    """From an instance log: per scheduler (SGLang's log label, e.g. ``DP0``; ``""`` without
    one), (steps that outlasted the emulated step, steps) at its last overshoot WARNING.
    Empty when no step overshot. Benchmarks use it to flag timings that are the CPU's rather
    than the emulated GPU's."""
    out: dict[str, tuple[int, int]] = {}
    for m in _OVERSHOOT_LINE.finditer(text):
        out[m.group("label") or ""] = (int(m.group("n")), int(m.group("m")))
    return out


def install(settings) -> StepEmulator:
    """Register the AROUND hook on SGLang's model-runner forward for ``settings.emulate``."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    emulator = StepEmulator(GpuStepProfile.load(settings.emulate), settings.time_scale,
                            settings.emulate_seed)
    HookRegistry.register(MODEL_RUNNER_FORWARD, emulator.around_forward, HookType.AROUND)
    HookRegistry.register(SCHEDULER_ON_IDLE, emulator.after_scheduler_idle, HookType.AFTER)
    return emulator
