"""Profile a live SGLang instance's step latency and fit the step model fastsim uses.

    python -m block_sgl.predictor.profile --url http://host:30000 --out profile.json
    python -m block_sgl.predictor.profile --url http://host:30000 --publish tcp://host:5600 --out profile.json

Drives the instance through a grid of batch shapes — prefills of several lengths, with and
without a cached prefix, and decode batches of several sizes — and fits
``block_sgl.predictor.step_model.StepModel`` to the measured steps (``perf_model.fit``).

Two ways to measure (the instance must be otherwise idle while profiling):
* ``--publish`` given (the instance runs block_sgl's hooks): the exact per-step records the
  scheduler publishes (shape + measured duration) during the grid.
* otherwise, from the client only (works against any SGLang server, GPU or CPU):
  a prefill of L new tokens takes ``TTFT(L) - TTFT(16) + d1`` (the difference cancels HTTP,
  tokenisation and scheduling costs; ``d1``, the batch-1 decode step, stands in for the
  16-token prefill step: both are below the knee where step time is flat); a decode step at
  batch b takes ``(E2E(n2) - E2E(n1)) / (n2 - n1)`` with b concurrent requests.

The output JSON is ``perf_model.model_to_json`` (the router and fastsim load it with
``perf_model.load_step_model``) plus the raw measurements under ``"measurements"`` and the
fit's median relative error on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from block_sgl.predictor import perf_model
from block_sgl.predictor.gpu_profiles import StepShape


@dataclasses.dataclass(frozen=True)
class ProfileGrid:
    prefill_lengths: tuple[int, ...] = (256, 1024, 2048, 4096)
    prefix_lengths: tuple[int, ...] = (0, 2048)
    decode_batches: tuple[int, ...] = (1, 4, 8, 16, 32)
    decode_input_len: int = 256
    decode_short: int = 16
    decode_long: int = 64
    repeats: int = 2
    vocab_lo: int = 100
    vocab_hi: int = 20000


class Driver:
    """HTTP calls to one SGLang instance (stdlib only: the profiler must run anywhere)."""

    def __init__(self, url: str, seed: int = 0, timeout: float = 600):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.rng = np.random.default_rng(seed)

    def tokens(self, n: int, grid: ProfileGrid) -> list[int]:
        return self.rng.integers(grid.vocab_lo, grid.vocab_hi, size=n).tolist()

    def generate(self, ids: list[int], new_tokens: int) -> float:
        body = json.dumps({"input_ids": ids, "sampling_params": {
            "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0}}).encode()
        req = urllib.request.Request(f"{self.url}/generate", data=body,
                                     headers={"content-type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            r.read()
        return time.perf_counter() - start

    def batch(self, prompts: list[list[int]], new_tokens: int) -> float:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return max(pool.map(lambda ids: self.generate(ids, new_tokens), prompts))


def drive_grid(driver: Driver, grid: ProfileGrid) -> list[tuple[StepShape, float]]:
    """Run the grid; return client-side (shape, seconds) measurements."""
    measured: list[tuple[StepShape, float]] = []
    for _ in range(2):
        driver.generate(driver.tokens(32, grid), 4)  # warm-up
    decode_steps = {}
    for b in grid.decode_batches:
        per_step = []
        for _ in range(grid.repeats):
            prompts = [driver.tokens(grid.decode_input_len, grid) for _ in range(b)]
            long = driver.batch(prompts, grid.decode_long)
            short = driver.batch([driver.tokens(grid.decode_input_len, grid) for _ in range(b)],
                                 grid.decode_short)
            per_step.append((long - short) / (grid.decode_long - grid.decode_short))
        mean_ctx = grid.decode_input_len + (grid.decode_long + grid.decode_short) / 2
        decode_steps[b] = statistics.median(per_step)
        measured.append((StepShape.for_requests([], [], [mean_ctx] * b), decode_steps[b]))
    d1 = decode_steps.get(1, min(decode_steps.values()))
    for prefix in grid.prefix_lengths:
        for length in grid.prefill_lengths:
            samples = []
            for _ in range(grid.repeats):
                shared = driver.tokens(prefix, grid)
                if prefix:
                    driver.generate(shared, 1)  # cache the prefix
                full = driver.generate(shared + driver.tokens(length, grid), 1)
                base = driver.generate(driver.tokens(16, grid), 1)
                samples.append(full - base + d1)
            cached = prefix - prefix % 16  # only full pages are cached (page_size up to 16)
            measured.append((StepShape.for_requests([length + prefix - cached], [cached], []),
                             max(statistics.median(samples), 1e-6)))
    return measured


def stream_records(publish: str, run) -> perf_model.StepRecords:
    """Collect the instance's own StepRecords while ``run()`` drives it."""
    from block_sgl.router.ingest import StreamSubscriber

    sub = StreamSubscriber([publish])
    sub.start()
    try:
        if not sub.wait_until(lambda s: not s.stale(), 30):
            raise RuntimeError(f"no block_sgl stream on {publish} (is the instance started with "
                               "--block-publish?)")
        state = sub.states[publish]
        state.steps = type(state.steps)(maxlen=None)  # keep every record while profiling
        run()
        time.sleep(1.5)  # the last batch of records rides on the next (idle) snapshot
        rows = [(m, e, c, d, dc, s) for rec in state.steps for m, e, c, d, dc, s in zip(
            rec.forward_mode, rec.extend_tokens, rec.prefill_context_tokens, rec.decode_reqs,
            rec.decode_context_tokens, rec.duration_s)]
    finally:
        sub.stop()
    rows = [r for r in rows if r[0] in ("extend", "decode", "mixed") and (r[1] or r[3])]
    if not rows:
        raise RuntimeError("the stream carried no step records")
    cols = np.array([r[1:] for r in rows], dtype=np.float64).T
    return perf_model.StepRecords(cols[0], cols[1], cols[2], cols[3], cols[4])


def profile(url: str, publish: str | None, grid: ProfileGrid, seed: int = 0) -> dict:
    driver = Driver(url, seed)
    if publish:
        records = stream_records(publish, lambda: drive_grid(driver, grid))
        method = "stream"
    else:
        measured = drive_grid(driver, grid)
        records = perf_model.StepRecords.from_shapes([m[0] for m in measured],
                                                     np.array([m[1] for m in measured]))
        method = "client"
    model = perf_model.fit(records)
    errors = perf_model.relative_errors(model, records)
    doc = perf_model.model_to_json(model, {"url": url, "method": method, "records": len(records),
                                           "median_relative_error": float(np.median(errors)),
                                           "grid": dataclasses.asdict(grid), "time": time.time()})
    doc["measurements"] = {f: getattr(records, f).tolist() for f in
                           ("prefill_tokens", "prefill_context_tokens", "decode_seqs",
                            "decode_context_tokens", "seconds")}
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Profile a live SGLang instance's step latency and "
                                 "write a step-model JSON for the router and fastsim.")
    ap.add_argument("--url", required=True, help="the instance's HTTP URL, e.g. http://host:30000")
    ap.add_argument("--out", required=True, type=Path, help="where to write the profile JSON")
    ap.add_argument("--publish", default=None,
                    help="the instance's block_sgl publish endpoint (tcp://host:port): use its "
                         "exact step records instead of client-side timing")
    ap.add_argument("--repeats", type=int, default=ProfileGrid.repeats, help="repeats per shape")
    ap.add_argument("--max-decode-batch", type=int, default=32, help="largest decode batch")
    ap.add_argument("--max-prefill", type=int, default=4096,
                    help="largest prefill length (keep within the instance's chunked prefill size)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    args = ap.parse_args(argv)
    grid = ProfileGrid(
        prefill_lengths=tuple(n for n in ProfileGrid.prefill_lengths if n <= args.max_prefill),
        decode_batches=tuple(b for b in ProfileGrid.decode_batches if b <= args.max_decode_batch),
        repeats=args.repeats)
    try:
        doc = profile(args.url, args.publish, grid, args.seed)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        sys.exit(f"error: profiling {args.url} failed: {e}")
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    src = doc["source"]
    print(f"wrote {args.out}: {src['records']} {src['method']} records, fit median relative "
          f"error {100 * src['median_relative_error']:.1f} %")


if __name__ == "__main__":
    main()
