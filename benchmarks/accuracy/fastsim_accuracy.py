"""fastsim's accuracy against real SGLang (CPU test bed, emulated GPU timing).

1. Start one SGLang instance (tiny model, H100 + Llama-2-7B speed emulated with the profile's
   real variability, time scale 8 by default) publishing its block_sgl stream.
2. Calibrate: drive the profiling grid and fit the step model to the instance's own step
   records (``block_sgl.predictor.profile``) — not copied from the emulator's profile. Measure
   the client-side overhead (HTTP, tokenisation, detokenisation) of a tiny request at idle.
3. Replay a bursty workload (gamma inter-arrivals, CV 3 unless ``--cv``; lognormal prompt/output lengths; a
   third of the prompts share a 512-token system prompt). At every arrival, predict the request's
   TTFT and E2E with fastsim from the instance's latest snapshot plus the requests sent but not
   yet visible in it, using the TRUE output lengths, then send it (streaming) and measure.
   Each request gets two predictions from the same snapshot: without and with EXPECTED FUTURE
   ARRIVALS (``fastsim.expected_arrivals``): requests of the mean shape of those sent so far,
   evenly spaced at the arrival rate of the last ``--arrival-window`` seconds — both estimated
   only from what was sent before (causal), as a router would. After the replay, a third
   prediction from the same snapshot, not causal: with the KNOWN FUTURE — the replay's actual
   later requests at the times they were really sent, with their true shapes, lengths and
   prefixes. It separates the simulator's own error under load from what a prediction at
   arrival cannot know. And how much of that no causal prediction can know: from the same
   snapshot, ``--future-samples`` futures drawn from the workload's own generator (arrival
   process at the true rate and CV, length distributions), each simulated; their MAPE-optimal
   point is the best causal prediction if the process were known exactly, and the MAPE it is
   expected to have against those futures is the floor of any causal prediction (fastsim's own
   error aside).
4. Report MAPE and P90 absolute error of TTFT and E2E, for the predictions.

    .venv/bin/python benchmarks/accuracy/fastsim_accuracy.py [--requests 120] [--rate 1.5] [--cv 3] [--time-scale 8] [--seed 0] [--trace N] [--future-samples 32]

Results: benchmarks/results/fastsim_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from block_sgl import fastsim
from block_sgl.page_hash import page_hashes
from block_sgl.predictor import perf_model
from block_sgl.predictor.profile import ProfileGrid, profile
from block_sgl.router.ingest import StreamSubscriber
from block_sgl.router.prefix_index import PrefixIndex
from block_sgl.router.state import instance_config, instance_state
from block_sgl.testing.cluster import ClusterConfig, LocalCluster, free_port

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fastsim_accuracy.json"
PROFILE = "h100-llama2-7b"


SYSTEM_PROMPT_TOKENS = 512
SHARED_FRACTION = 1 / 3
"""This fraction of the workload's prompts start with the same system prompt."""


def inter_arrival_gaps(rng: np.random.Generator, rate: float, n: int,
                       cv: float = 3.0) -> np.ndarray:
    """The workload's arrival process: gamma gaps with coefficient of variation ``cv`` (3 by
    default: bursts and lulls; 1 is a Poisson process)."""
    return rng.gamma(shape=1 / cv ** 2, scale=cv ** 2 / rate, size=n)


def request_lengths(rng: np.random.Generator) -> tuple[int, int]:
    """One request of the workload: (prompt tokens after any system prompt, output tokens)."""
    inp = int(np.clip(rng.lognormal(np.log(500), 0.8), 32, 3000))
    out = int(np.clip(rng.lognormal(np.log(100), 0.7), 8, 400))
    return inp, out


def workload(n: int, rate: float, seed: int, cv: float = 3.0):
    rng = np.random.default_rng(seed)
    gaps = inter_arrival_gaps(rng, rate, n, cv)
    system = rng.integers(100, 20000, size=SYSTEM_PROMPT_TOKENS).tolist()
    reqs = []
    for i in range(n):
        inp, out = request_lengths(rng)
        body = rng.integers(100, 20000, size=inp).tolist()
        ids = (system + body) if rng.random() < SHARED_FRACTION else body
        reqs.append({"rid": f"acc-{seed}-{i}", "ids": ids, "out": out, "gap": float(gaps[i])})
    return reqs


def stream_generate(url: str, rid: str, ids: list[int], out: int, result: dict) -> None:
    body = json.dumps({"rid": rid, "input_ids": ids, "stream": True, "sampling_params": {
        "max_new_tokens": out, "ignore_eos": True, "temperature": 0}}).encode()
    req = urllib.request.Request(f"{url}/generate", data=body, headers={"content-type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data:") and first is None:
                first = time.perf_counter()
    result.update(ttft=first - start, e2e=time.perf_counter() - start)


def known_future(inputs, sent: dict, results: dict, step_model, ttft_overhead: float,
                 e2e_overhead: float) -> dict:
    """Each request's prediction from the snapshot it was predicted from, plus the requests that
    were really sent after it (their send times relative to its prediction, their true shapes,
    lengths and matched prefixes), up to 3 × its snapshot-only E2E + 1 s ahead. Returns rid →
    (that state, the candidate, the snapshot's time) for ``print_traces``."""
    order = [rid for rid, *_ in inputs]
    sent_at = np.array([sent[rid]["sent_perf"] for rid in order])
    states = {}
    for i, (rid, st, cand, now, e2e, snap_time) in enumerate(inputs):
        later = [j for j in range(i + 1, min(len(order), i + 257))
                 if sent_at[j] <= now + 3 * e2e + 1.0]
        state = st
        if later:
            rows = [(sent[order[j]]["input_len"], sent[order[j]]["prefix"], 0, sent[order[j]]["out"],
                     1, sent[order[j]]["out"]) for j in later]
            times = np.maximum.accumulate(np.maximum(sent_at[later] - now, 0.0))
            state = st.with_future(fastsim.RequestTable.from_rows(rows), times)
        pred = fastsim.predict(state, cand, step_model)
        results[rid].update(pred_ttft_known_future=pred.ttft_s + ttft_overhead,
                            pred_e2e_known_future=pred.e2e_s + e2e_overhead)
        states[rid] = (state, cand, snap_time)
    return states


def _mape_optimal(samples: np.ndarray) -> float:
    """The point p minimising the expected |p − x| / x over equally likely outcomes x: the
    median of the samples weighted by 1 / x."""
    order = np.sort(samples)
    weights = 1.0 / order
    cum = np.cumsum(weights)
    return float(order[np.searchsorted(cum, cum[-1] / 2)])


def sampled_futures(inputs, results: dict, step_model, ttft_overhead: float, e2e_overhead: float,
                    *, rate: float, cv: float, page: int, samples: int, seed: int) -> None:
    """How much of the causal error no predictor at arrival can remove. For each request, from
    the same snapshot and pending requests as its causal prediction: ``samples`` futures drawn
    from the workload's own generator (its gamma arrival process at the true rate, its length
    distributions, its shared system prompt as a cached prefix) — what a router that knew the
    arrival process exactly could foresee — each simulated. Records the MAPE-optimal point of
    those outcomes (a causal prediction), how far it is expected to be from them (the MAPE
    floor of any causal prediction if fastsim were exact), and their P10–P90 spread."""
    rng = np.random.default_rng(10_000 + seed)
    system_prefix = SYSTEM_PROMPT_TOKENS // page * page
    for rid, st, cand, _now, e2e, _snap_time in inputs:
        horizon = 3 * e2e + 1.0
        outcomes = []
        for _ in range(samples):
            times, rows, t = [], [], 0.0
            while len(rows) < 256:
                t += float(inter_arrival_gaps(rng, rate, 1, cv)[0])
                if t > horizon:
                    break
                body, out = request_lengths(rng)
                shared = rng.random() < SHARED_FRACTION
                inp = body + SYSTEM_PROMPT_TOKENS if shared else body
                rows.append((inp, system_prefix if shared else 0, 0, out, 1, out))
                times.append(t)
            state = st.with_future(fastsim.RequestTable.from_rows(rows), np.array(times)) \
                if rows else st
            pred = fastsim.predict(state, cand, step_model)
            outcomes.append((pred.ttft_s + ttft_overhead, pred.e2e_s + e2e_overhead))
        for col, key in enumerate(("ttft", "e2e")):
            x = np.array([o[col] for o in outcomes])
            point = _mape_optimal(x)
            p10, p50, p90 = np.percentile(x, [10, 50, 90])
            results[rid].update({f"pred_{key}_sampled_futures": point,
                                 f"{key}_sampled_futures_expected_ape": float(
                                     np.mean(np.abs(point - x) / x)),
                                 f"{key}_sampled_futures_spread": float((p90 - p10) / p50)})


def print_traces(n: int, states: dict, results: dict, step_records: list, step_model) -> None:
    """For the ``n`` requests with the largest known-future TTFT error: fastsim's steps (the
    readable twin, ``fastsim.trace``) next to the instance's real ones (its StepRecords), both
    in seconds from the snapshot the prediction started from."""
    real = sorted((end - dur, end, mode, reqs, ext) for m in step_records for end, dur, mode,
                  reqs, ext in zip(m.end_time, m.duration_s, m.forward_mode, m.num_reqs,
                                   m.extend_tokens))
    worst = sorted(states, key=lambda rid: -abs(results[rid]["pred_ttft_known_future"]
                                                 / results[rid]["ttft"] - 1.0))[:n]
    for rid in worst:
        state, cand, snap_time = states[rid]
        r = results[rid]
        pred, steps = fastsim.trace(state, cand, step_model)
        arrival = state.elapsed_s
        print(f"\n== {rid}: TTFT observed {r['ttft']:.3f} s, known future "
              f"{r['pred_ttft_known_future']:.3f} s; candidate arrives {arrival:.3f} s after the "
              f"snapshot; {len(state.running)} running, {len(state.waiting)} waiting, "
              f"{len(state.pending)} pending (sim ids: running, waiting, pending, candidate, "
              f"later; '+': a chunk)")
        horizon = arrival + max(r["ttft"], pred.ttft_s) + 0.3
        for s in steps:
            if s.start_s > horizon:
                break
            who = " ".join(f"{i}:{e}{'' if done else '+'}" for i, e, _, done in s.extend)
            print(f"  sim  {s.start_s:7.3f} – {s.end_s:7.3f} {s.kind:6s} x{s.steps:<4d} "
                  f"batch {s.batch:3d} {who}")
        for start, end, mode, reqs, ext in real:
            if -0.3 <= start - snap_time <= horizon:
                print(f"  real {start - snap_time:7.3f} – {end - snap_time:7.3f} {mode:6s} "
                      f"reqs {reqs:3d} extend tokens {ext}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=120, help="requests in the replay")
    ap.add_argument("--rate", type=float, default=1.5, help="mean arrival rate (req/s)")
    ap.add_argument("--cv", type=float, default=3.0,
                    help="coefficient of variation of the gamma inter-arrival gaps (1: Poisson)")
    ap.add_argument("--time-scale", type=float, default=8.0,
                    help="emulated-time stretch; the tiny model's real CPU cost (~1 ms per "
                         "decoding request per step) must stay below the emulated step time")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="print fastsim's simulated steps next to the instance's real ones for "
                         "the N requests with the largest known-future TTFT error")
    ap.add_argument("--arrival-window", type=float, default=30.0,
                    help="seconds of past arrivals the expected arrival rate is measured over")
    ap.add_argument("--future-samples", type=int, default=32, metavar="K",
                    help="futures drawn from the workload's own process per request for the "
                         "sampled-futures analysis (0: skip it)")
    args = ap.parse_args()
    if args.future_samples < 0:
        ap.error(f"--future-samples must be >= 0, got {args.future_samples}")
    if not args.cv > 0:
        ap.error(f"--cv must be > 0, got {args.cv}")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = ClusterConfig(instances=1, emulate=PROFILE, time_scale=args.time_scale,
                           env=(("BLOCK_SGL_PUBLISH", endpoint),))
    index = PrefixIndex()
    with LocalCluster(config) as cluster:
        url = cluster.urls[0]
        print("calibrating the step model from the instance's step records ...", flush=True)
        doc = profile(url, endpoint, ProfileGrid(repeats=1), seed=args.seed + 1)
        step_model = perf_model.model_from_json(doc).as_array()
        step_records = []  # for --trace
        sub = StreamSubscriber([endpoint], on_cache_event=index.apply,
                               on_steps=lambda e, m: step_records.append(m))
        sub.start()
        assert sub.wait_until(lambda s: not s.stale(), 30), sub.errors
        state = sub.states[endpoint]
        cfg = instance_config(state.hello)
        page = state.hello.page_size
        urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", method="POST")).read()
        sub.wait_until(lambda s: index.size(endpoint) == 0, 10)

        # Client-side overhead: tiny requests at idle, measured minus predicted.
        overhead = []
        for k in range(5):
            time.sleep(0.3)
            snap = state.snapshot
            ids = list(range(1000 + 40 * k, 1032 + 40 * k))
            pred = fastsim.predict(instance_state(cfg, snap, lambda cols: [1] * len(cols)),
                                   fastsim.Candidate(len(ids), 0, 4, 4, True), step_model)
            res = {}
            stream_generate(url, f"cal-{k}", ids, 4, res)
            overhead.append((res["ttft"] - pred.ttft_s, res["e2e"] - pred.e2e_s))
        ttft_overhead = float(np.median([o[0] for o in overhead]))
        e2e_overhead = float(np.median([o[1] for o in overhead]))

        reqs = workload(args.requests, args.rate, args.seed, args.cv)
        true_out = {r["rid"]: r["out"] for r in reqs}
        sent: dict[str, dict] = {}
        results: dict[str, dict] = {}
        threads = []
        print(f"replaying {len(reqs)} requests at {args.rate} req/s (gamma gaps, CV {args.cv:g}) ...", flush=True)
        t_next = t_start = time.perf_counter()
        history: list[tuple[float, int, int, int]] = []  # (sent at, input_len, prefix, out)
        known_future_inputs = []  # (rid, state, candidate, prediction time, E2E, snapshot time)
        for r in reqs:
            t_next += r["gap"]
            time.sleep(max(0.0, t_next - time.perf_counter()))
            snap = state.snapshot
            visible = set(snap.running.rid) | set(snap.waiting.rid) | set(snap.chunked.rid)
            for rid in visible & sent.keys():
                sent[rid]["seen"] = True
            # Sent but not yet in any snapshot (and not already finished): fastsim's "pending".
            pending = [s for rid, s in sent.items() if not s["seen"] and "e2e" not in results[rid]]
            st = instance_state(
                cfg, snap, lambda cols: [true_out.get(rid, m) for rid, m in
                                         zip(cols.rid, cols.max_new_tokens)])
            if pending:  # replayed from the snapshot: each arrives when it was sent
                sent_since = np.array([s["sent_at"] for s in pending]) - snap.time
                st = st.with_pending(fastsim.RequestTable.from_rows(
                    [(s["input_len"], s["prefix"], 0, s["out"], 1, s["out"]) for s in pending]),
                    np.maximum.accumulate(np.maximum(sent_since, 0.0)))
            prefix = index.matched_pages(endpoint, page_hashes(r["ids"], page)) * page
            cand = fastsim.Candidate(len(r["ids"]), prefix, r["out"], r["out"], True)
            pred = fastsim.predict(st, cand, step_model)
            # Expected arrivals, from what was sent before this request only.
            now = time.perf_counter()
            window = min(args.arrival_window, now - t_start)
            recent = [h for h in history if h[0] >= now - args.arrival_window]
            rate = len(recent) / window if window >= 1.0 else 0.0
            future_rate = rate
            if history and rate > 0.0:
                shape = np.mean([h[1:] for h in history[-50:]], axis=0)
                inp, pre, out_len = (max(1, round(shape[0])), round(shape[1]),
                                     max(1, round(shape[2])))
                future = fastsim.expected_arrivals(
                    rate, 3 * pred.e2e_s + 1.0, input_len=inp, prefix_len=min(pre, inp),
                    pred_output_len=out_len, max_new_tokens=out_len, ignore_eos=True)
                pred_f = fastsim.predict(st.with_future(*future), cand, step_model)
            else:
                pred_f, future_rate = pred, 0.0
            history.append((now, len(r["ids"]), prefix, r["out"]))
            known_future_inputs.append((r["rid"], st, cand, now, pred.e2e_s, snap.time))
            results[r["rid"]] = {"pred_ttft": pred.ttft_s + ttft_overhead, "pred_e2e": pred.e2e_s + e2e_overhead,
                                 "pred_ttft_arrivals": pred_f.ttft_s + ttft_overhead,
                                 "pred_e2e_arrivals": pred_f.e2e_s + e2e_overhead,
                                 "expected_rate": future_rate,
                                 "queue_len": len(snap.waiting), "running": len(snap.running)}
            sent[r["rid"]] = {"input_len": len(r["ids"]), "prefix": prefix, "out": r["out"],
                              "sent_at": time.time(), "sent_perf": time.perf_counter(),
                              "seen": False}
            t = threading.Thread(target=stream_generate, args=(url, r["rid"], r["ids"], r["out"],
                                                               results[r["rid"]]))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        sub.stop()
        states = known_future(known_future_inputs, sent, results, step_model, ttft_overhead,
                              e2e_overhead)
        if args.future_samples:
            sampled_futures(known_future_inputs, results, step_model, ttft_overhead,
                            e2e_overhead, rate=args.rate, cv=args.cv, page=page,
                            samples=args.future_samples, seed=args.seed)

    rows = list(results.values())
    out = {"machine": f"{platform.node()} {platform.machine()}", "profile": PROFILE,
           "time_scale": args.time_scale, "requests": len(rows), "rate": args.rate, "cv": args.cv, "seed": args.seed,
           "ttft_overhead_s": ttft_overhead, "e2e_overhead_s": e2e_overhead,
           "step_model": doc["coefficients"], "step_model_fit_error": doc["source"]["median_relative_error"],
           "implementation": fastsim.implementation(), "arrival_window_s": args.arrival_window,
           "note": "keys without a suffix: predictions from the snapshot alone; *_with_arrivals: "
                   "the same snapshot plus expected future arrivals (causal rate and shape); "
                   "*_with_known_future: the same snapshot plus the requests really sent after "
                   "it (not causal: the simulator's own error under load); "
                   "*_with_sampled_futures: the MAPE-optimal point over --future-samples futures "
                   "drawn from the workload's own arrival process and length distributions "
                   "(causal, if the process were known exactly); *_floor_sampled_futures: the "
                   "MAPE that point is expected to have against those futures (what no causal "
                   "prediction can remove, simulator error aside); "
                   "*_sampled_vs_known_future: that point against the known-future prediction",
           "future_samples": args.future_samples}
    for key in ("ttft", "e2e"):
        obs = np.array([r[key] for r in rows])
        out[f"{key}_observed_p50_s"] = float(np.median(obs))
        out[f"{key}_observed_p99_s"] = float(np.percentile(obs, 99))
        for suffix, field in (("", f"pred_{key}"), ("_with_arrivals", f"pred_{key}_arrivals"),
                              ("_with_known_future", f"pred_{key}_known_future")):
            pred = np.array([r[field] for r in rows])
            err = np.abs(pred - obs)
            out[f"{key}_mape{suffix}"] = float(np.mean(err / obs))
            out[f"{key}_median_signed_rel_err{suffix}"] = float(np.median((pred - obs) / obs))
            out[f"{key}_p90_abs_err_s{suffix}"] = float(np.percentile(err, 90))
        if args.future_samples:
            point = np.array([r[f"pred_{key}_sampled_futures"] for r in rows])
            known = np.array([r[f"pred_{key}_known_future"] for r in rows])
            out[f"{key}_mape_with_sampled_futures"] = float(np.mean(np.abs(point - obs) / obs))
            out[f"{key}_mape_floor_sampled_futures"] = float(np.mean(
                [r[f"{key}_sampled_futures_expected_ape"] for r in rows]))
            out[f"{key}_mape_sampled_vs_known_future"] = float(np.mean(np.abs(point - known) / known))
            out[f"{key}_sampled_futures_median_spread"] = float(np.median(
                [r[f"{key}_sampled_futures_spread"] for r in rows]))
    out["per_request"] = rows
    out["max_queue_seen"] = max(r["queue_len"] for r in rows)
    out["max_running_seen"] = max(r["running"] for r in rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    for suffix, label in (("", "snapshot only"), ("_with_arrivals", "with expected arrivals"),
                          ("_with_known_future", "with the known future (not causal)")):
        print(f"{label}: TTFT MAPE {100 * out['ttft_mape' + suffix]:.1f} % (P90 abs err "
              f"{1e3 * out['ttft_p90_abs_err_s' + suffix]:.0f} ms), E2E MAPE "
              f"{100 * out['e2e_mape' + suffix]:.1f} % (P90 abs err "
              f"{1e3 * out['e2e_p90_abs_err_s' + suffix]:.0f} ms, median signed "
              f"{100 * out['e2e_median_signed_rel_err' + suffix]:+.1f} %)")
    if args.future_samples:
        print(f"with {args.future_samples} sampled futures of the workload's own process "
              f"(causal): TTFT MAPE {100 * out['ttft_mape_with_sampled_futures']:.1f} %, E2E MAPE "
              f"{100 * out['e2e_mape_with_sampled_futures']:.1f} %; expected MAPE of that point "
              f"against its own futures (the floor for any causal prediction): TTFT "
              f"{100 * out['ttft_mape_floor_sampled_futures']:.1f} %, E2E "
              f"{100 * out['e2e_mape_floor_sampled_futures']:.1f} %; against the known-future "
              f"prediction: TTFT {100 * out['ttft_mape_sampled_vs_known_future']:.1f} %, E2E "
              f"{100 * out['e2e_mape_sampled_vs_known_future']:.1f} %; median P10–P90 spread "
              f"TTFT {100 * out['ttft_sampled_futures_median_spread']:.0f} %, E2E "
              f"{100 * out['e2e_sampled_futures_median_spread']:.0f} %")
    print(f"observed TTFT p50 {out['ttft_observed_p50_s']:.2f} s, max queue {out['max_queue_seen']}")
    if args.trace:
        print_traces(args.trace, states, results, step_records, step_model)
    print(json.dumps({k: v for k, v in out.items() if k != "per_request"}))


if __name__ == "__main__":
    main()
