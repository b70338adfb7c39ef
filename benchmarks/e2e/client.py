"""Open-loop replay client: asyncio + aiohttp, streaming SGLang ``/generate``.

Each request is sent at its scheduled time whatever the state of earlier ones (open loop), with
``max_new_tokens`` = the trace's output length and ``ignore_eos`` so the length is enforced,
``temperature: 0`` (greedy: the cheapest sampling on the CPU test bed) and ``stream: true``.
Measured at the client, so router overhead is included:

* TTFT: send → first streamed chunk carrying output;  E2E: send → final chunk;
* TPOT: (E2E − TTFT) / (output tokens − 1), for outputs of 2+ tokens;
* prefix hits: ``meta_info.cached_tokens`` / ``meta_info.prompt_tokens`` of the final chunk;
* the serving instance, from the ``X-Block-Instance`` header where the router sets it.

Early stop (capacity search): once so many requests have (or must have) a TTFT above the SLO
that P99 TTFT is certainly above it, the rest are cancelled (client disconnect → SGLang
aborts them); the run is marked ``early_stopped`` and latencies of unfinished requests are
recorded as lower bounds (``censored``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time

import numpy as np


@dataclasses.dataclass
class Record:
    index: int
    scheduled_s: float
    input_len: int
    output_len: int
    sent_s: float = math.nan
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    instance: str | None = None
    error: str | None = None
    censored: bool = False
    """Not finished (cancelled by early stop / timeout): ttft/e2e are lower bounds."""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.censored and math.isfinite(self.e2e_s)


def _body(req, stream_interval: int | None) -> dict:
    sp = {"max_new_tokens": int(req.output_len), "ignore_eos": True, "temperature": 0.0}
    if stream_interval:
        sp["stream_interval"] = stream_interval
    body = {"sampling_params": sp, "stream": True}
    if req.text is not None:
        body["text"] = req.text
    else:
        body["input_ids"] = req.input_ids
    return body


async def _one(session, url: str, req, rec: Record, t0: float, on_first, stream_interval):
    import aiohttp

    await asyncio.sleep(max(0.0, t0 + rec.scheduled_s - time.perf_counter()))
    rec.sent_s = time.perf_counter() - t0
    sent = time.perf_counter()
    try:
        async with session.post(f"{url}/generate", json=_body(req, stream_interval)) as r:
            rec.instance = r.headers.get("X-Block-Instance")
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.text())[:300]}"
                return
            last = None
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.error = f"stream error: {str(obj['error'])[:300]}"
                        return
                    if math.isnan(rec.ttft_s):
                        rec.ttft_s = time.perf_counter() - sent
                        on_first(rec)
                    last = obj
            rec.e2e_s = time.perf_counter() - sent
            meta = (last or {}).get("meta_info") or {}
            rec.output_tokens = int(meta.get("completion_tokens") or 0)
            rec.prompt_tokens = int(meta.get("prompt_tokens") or 0)
            rec.cached_tokens = int(meta.get("cached_tokens") or 0)
            if last is None:
                rec.error = "empty stream"
    except asyncio.CancelledError:
        now = time.perf_counter() - sent
        rec.censored = True
        if math.isnan(rec.ttft_s):
            rec.ttft_s = now
        rec.e2e_s = now
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]


def p99_certainly_above(violations: int, n: int) -> bool:
    """With ``violations`` of ``n`` values above a bound, is numpy's (linear) P99 above it?
    Sorted ascending, P99 lies between x[floor(k)] and x[floor(k)+1], k = 0.99 (n − 1)."""
    return violations >= n - math.floor(0.99 * (n - 1))


async def replay(url: str, schedule, *, slo_ttft_s: float | None = None, early_stop: bool = True,
                 timeout_s: float | None = None, stream_interval: int | None = None,
                 progress=None) -> tuple[list[Record], dict]:
    """Send ``schedule`` = [(send time s, Request)] to ``url``; (records, run info)."""
    import aiohttp

    n = len(schedule)
    records = [Record(i, s, r.input_len, r.output_len) for i, (s, r) in enumerate(schedule)]
    state = {"violations": 0, "stopped": None, "done": 0}
    stop = asyncio.Event()
    counted: set[int] = set()  # requests already counted as over the TTFT SLO

    def on_first(rec):
        if slo_ttft_s is not None and rec.ttft_s > slo_ttft_s:
            count_violation(rec.index)

    def count_violation(index):
        if index in counted:
            return
        counted.add(index)
        state["violations"] += 1
        if early_stop and slo_ttft_s is not None and p99_certainly_above(state["violations"], n):
            state["stopped"] = state["stopped"] or "p99_ttft_above_slo"
            stop.set()

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(_one(session, url, r, rec, t0, on_first, stream_interval))
                 for (_, r), rec in zip(schedule, records)]

        def done_cb(_):
            state["done"] += 1
            if progress is not None:
                progress.update(1)
            if state["done"] == n:
                stop.set()

        for t in tasks:
            t.add_done_callback(done_cb)

        async def watchdog():
            # requests still waiting for their first token count as violations once they are
            # older than the SLO (their TTFT will be above it)
            while not stop.is_set():
                await asyncio.sleep(0.25)
                now = time.perf_counter() - t0
                if timeout_s is not None and now > timeout_s:
                    state["stopped"] = state["stopped"] or "run_timeout"
                    stop.set()
                    return
                if slo_ttft_s is None:
                    continue
                for rec in records:
                    if (rec.index not in counted and math.isnan(rec.ttft_s) and rec.error is None
                            and not math.isnan(rec.sent_s) and now - rec.sent_s > slo_ttft_s):
                        count_violation(rec.index)

        wd = asyncio.create_task(watchdog())
        await stop.wait()
        wd.cancel()
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for rec in records:
        if math.isnan(rec.sent_s):  # never sent
            rec.censored = True
    wall = time.perf_counter() - t0
    return records, {"early_stopped": state["stopped"], "wall_s": wall}


def _pct(xs, qs=(50, 90, 99)) -> dict:
    if len(xs) == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(xs, q)) for q in qs}


def summarise(records: list[Record], run: dict, *, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Latency percentiles (s), throughput, goodput under the SLO, prefix-hit ratio."""
    sent = [r for r in records if not math.isnan(r.sent_s)]
    ok = [r for r in records if r.ok]
    # TTFT over every sent request: unfinished ones count with their lower bound (censored)
    ttft = np.array([r.ttft_s for r in sent if math.isfinite(r.ttft_s)])
    e2e = np.array([r.e2e_s for r in ok])
    tpot = np.array([(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    if ok:
        start = min(r.sent_s for r in sent)
        end = max(r.sent_s + r.e2e_s for r in ok)
        duration = max(end - start, 1e-9)
    else:
        duration = run.get("wall_s") or 1e-9
    good = [r for r in ok if r.ttft_s <= slo_ttft_s and (
        r.output_tokens <= 1 or (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) <= slo_tpot_s)]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    errors = [r.error for r in records if r.error]
    instances: dict[str, int] = {}
    for r in ok:
        if r.instance:
            instances[r.instance] = instances.get(r.instance, 0) + 1
    return {
        "requests": len(records), "sent": len(sent), "completed": len(ok),
        "errors": len(errors), "error_examples": sorted(set(errors))[:3],
        "censored": sum(r.censored for r in records),
        "early_stopped": run.get("early_stopped"), "wall_s": run.get("wall_s"),
        "duration_s": duration,
        "ttft_s": {**_pct(ttft), "mean": float(ttft.mean()) if len(ttft) else None},
        "tpot_s": {**_pct(tpot), "mean": float(tpot.mean()) if len(tpot) else None},
        "e2e_s": {**_pct(e2e), "mean": float(e2e.mean()) if len(e2e) else None},
        "throughput_rps": len(ok) / duration,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "goodput_rps": len(good) / duration,
        "slo_attainment": len(good) / len(records) if records else 0.0,
        "prefix_hit_ratio": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt, "cached_tokens": cached,
        "output_len_mismatch": sum(r.output_tokens != r.output_len for r in ok),
        "per_instance": instances,
        "meets_slo": bool(len(ttft) and len(ttft) == len(records) and not errors
                          and float(np.percentile(ttft, 99)) <= slo_ttft_s),
    }
