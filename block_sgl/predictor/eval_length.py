"""Evaluate the response-length model on the held-out ShareGPT split.

    python -m block_sgl.predictor.eval_length --json [--model DIR]

Without ``--model`` a model is trained first with the defaults of ``train_length`` (on the train
split only). The held-out split is the one recorded in the model's metadata (by default a fixed
hash split of conversations, seed 0, 20 %), so no held-out conversation was seen in training.

Reported: MAE, MAPE and Spearman correlation of the model's P50 and of baselines fitted on the
same train split — global mean, global median, mean per prompt-length bucket, median per
prompt-length bucket (buckets: powers of two of prompt tokens); the best baseline is the one
with the lowest MAE among all four (the medians are included because they are the stronger
MAE baselines). Also the P90's coverage (fraction of responses <= P90; ideally 0.9), the P50's,
and the per-request inference time: the median wall time of single-request
``LengthPredictor.predict`` calls (features + trees, one Python thread, no batching) on held-out
prompts, the median thread CPU time of the same calls, the amortised per-request time of
``predict_batch``, the split of a call into features and trees for the compiled path and its
pure-Python twin side by side (``inference_split_us``), and a reference (CPU µs of
``sum(range(1000))``, before and after) that tells how fast this machine ran Python at the time.
Also reported apart: the figures on the held-out prompts whose text does not occur among the
training prompts.

Data: ShareGPT without its duplicate conversations (``train_length``'s module docstring: a copy
of a held-out example among the training examples is a leaked label); ``--keep-duplicates``
gives the inflated figures of before 2026-11-29 for comparison.

The last stdout line (``--json``) is a JSON object; it is also written to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from block_sgl.predictor.features import FeatureConfig, PurePromptFeaturizer, implementation
from block_sgl.predictor.length import LengthModelConfig, LengthPredictor
from block_sgl.predictor.train_length import (LabelledData, SplitSpec, labelled_sharegpt,
                                              load_tokenizer, train_on)

BUCKET_EDGES = tuple(2.0 ** k for k in range(1, 17))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), numpy only."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        uniq, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra @ ra) * (rb @ rb)))
    return float(ra @ rb / denom) if denom else 0.0


def metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    err = np.abs(pred - truth)
    return {"mae": float(err.mean()), "mape": float(np.mean(err / np.maximum(truth, 1.0))),
            "spearman": spearman(pred, truth)}


def bucket_baseline(train_tokens, train_y, test_tokens, stat) -> np.ndarray:
    tb = np.digitize(train_tokens, BUCKET_EDGES)
    sb = np.digitize(test_tokens, BUCKET_EDGES)
    fallback = stat(train_y)
    table = {int(b): stat(train_y[tb == b]) for b in np.unique(tb)}
    return np.array([table.get(int(b), fallback) for b in sb], dtype=np.float64)


def time_single_requests(model: LengthPredictor, prompts, tokens, *, n: int, repeats: int,
                         warmup: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(wall seconds, thread CPU seconds) per ``predict`` call for the first ``n`` prompts,
    ``repeats`` passes. The CPU time leaves out the time the thread waited for a core (this
    box is shared); both clocks are read around every call."""
    n = min(n, len(prompts))
    tokens = [float(t) for t in tokens[:n]]
    for i in range(min(warmup, n)):
        model.predict(prompts[i], tokens[i])
    wall, cpu = [], []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for _ in range(repeats):
        for i in range(n):
            p, t = prompts[i], tokens[i]
            c0 = cpu_clock()
            t0 = clock()
            model.predict(p, t)
            t1 = clock()
            cpu.append(cpu_clock() - c0)
            wall.append(t1 - t0)
    return np.asarray(wall) * 1e-9, np.asarray(cpu) * 1e-9


def python_twin(model: LengthPredictor) -> LengthPredictor:
    """A shallow copy of ``model`` that predicts with the pure-Python featurizer and the
    generated Python trees (the specifications of the compiled ones): same predictions."""
    twin = copy.copy(model)
    twin.featurizer = PurePromptFeaturizer(model.feature_config, model._gram_weights)
    twin.ensemble = copy.copy(model.ensemble)
    twin.ensemble.predict2 = model.ensemble.predict2_python
    return twin


def time_inference_split(model: LengthPredictor, prompts, tokens, *, n: int,
                         repeats: int) -> dict:
    """Median wall µs per call of the parts of ``predict`` on the first ``n`` prompts:
    ``features`` (``featurizer.transform_row``), ``trees`` (``ensemble.predict2`` of the
    prompt's row) and the whole ``predict``, for the model as loaded ("compiled" unless
    BLOCK_SGL_FEATURES_PURE=1) and for its ``python_twin``. Each (part, variant) is timed in
    its own pass over the prompts, as ``time_single_requests`` times ``predict``; the passes
    alternate between the variants, ``repeats`` rounds, so that both see the same load."""
    n = min(n, len(prompts))
    prompts, tokens = prompts[:n], [float(t) for t in tokens[:n]]
    variants = {"python": python_twin(model)}
    if implementation() == "compiled":
        variants = {"compiled": model, **variants}
    rows = [model.featurizer.transform_row(p, t) for p, t in zip(prompts, tokens)]
    calls = {"features": lambda m: (m.featurizer.transform_row, list(zip(prompts, tokens))),
             "trees": lambda m: (m.ensemble.predict2, [(r,) for r in rows]),
             "predict": lambda m: (m.predict, list(zip(prompts, tokens)))}
    clock = time.perf_counter_ns
    times = {name: {part: [] for part in calls} for name in variants}
    for rep in range(repeats + 1):  # the first round warms up (the Python word cache too)
        for part, call in calls.items():
            for name, m in variants.items():
                fn, args = call(m)
                out = times[name][part]
                for a in args:
                    t0 = clock()
                    fn(*a)
                    t1 = clock()
                    if rep:
                        out.append(t1 - t0)
    return {name: {f"{part}_us": float(np.median(v)) / 1e3 for part, v in parts.items()}
            for name, parts in times.items()}


def reference_cpu_us(repeats: int = 7, n: int = 300) -> float:
    """Thread CPU µs of ``sum(range(1000))`` (best of ``repeats``): how fast this Python runs
    here and now, to compare inference times taken on different or differently loaded
    machines (≈ 10 µs on an idle current desktop core)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time_ns()
        for _ in range(n):
            sum(range(1000))
        best = min(best, (time.thread_time_ns() - t0) / n / 1e3)
    return best


def evaluate(model: LengthPredictor, data: LabelledData, split: SplitSpec, *, timing_n: int,
             timing_repeats: int) -> dict:
    test = np.nonzero(data.mask(split, test=True))[0]
    train = np.nonzero(data.mask(split, test=False))[0]
    if len(test) == 0 or len(train) == 0:
        raise ValueError("empty train or held-out split; raise --limit")
    prompts = [list(data.examples[i].messages) for i in test]
    tokens = data.prompt_tokens[test]
    y = data.output_tokens[test]
    t0 = time.perf_counter()
    pred = model.predict_batch(prompts, tokens)
    batch_s = time.perf_counter() - t0
    y_tr, tok_tr = data.output_tokens[train], data.prompt_tokens[train]
    baselines = {
        "global_mean": np.full(len(y), float(np.mean(y_tr))),
        "global_median": np.full(len(y), float(np.median(y_tr))),
        "bucket_mean": bucket_baseline(tok_tr, y_tr, tokens, np.mean),
        "bucket_median": bucket_baseline(tok_tr, y_tr, tokens, np.median),
    }
    base_metrics = {k: metrics(v, y) for k, v in baselines.items()}
    best = min(base_metrics, key=lambda k: base_metrics[k]["mae"])
    m = metrics(pred[:, 0], y)
    load_before = os.getloadavg()[0]
    ref_before = reference_cpu_us()
    times, cpu_times = time_single_requests(model, prompts, tokens, n=timing_n,
                                            repeats=timing_repeats)
    split = time_inference_split(model, prompts, tokens, n=timing_n, repeats=timing_repeats)
    load_after = os.getloadavg()[0]
    ref_after = reference_cpu_us()
    # How many held-out prompts occur verbatim among the training prompts: ShareGPT repeats
    # popular prompts (and, unless duplicates were kept, never with the same response: those
    # copies of one conversation under two ids are dropped). Reported apart, for information.
    train_texts = {json.dumps(data.examples[i].messages[-1]["value"]) for i in train}
    seen = np.array([json.dumps(data.examples[i].messages[-1]["value"]) in train_texts
                     for i in test], dtype=bool)
    unseen_model = metrics(pred[~seen, 0], y[~seen])["mae"] if (~seen).any() else float("nan")
    unseen_base = (metrics(baselines[best][~seen], y[~seen])["mae"] if (~seen).any()
                   else float("nan"))
    return {
        "n_train": int(len(train)), "n_test": int(len(test)),
        "test_prompts_seen_in_train": int(seen.sum()),
        "mae_model": m["mae"], "mape_model": m["mape"], "spearman_model": m["spearman"],
        "best_baseline": best, "mae_best_baseline": base_metrics[best]["mae"],
        "mae_reduction_vs_best_baseline": 1.0 - m["mae"] / base_metrics[best]["mae"],
        "baselines": base_metrics,
        "unseen_prompts": {"n": int((~seen).sum()), "mae_model": unseen_model,
                           "mae_best_baseline": unseen_base,
                           "mae_reduction": 1.0 - unseen_model / unseen_base},
        "p90_coverage": float(np.mean(y <= pred[:, 1])),
        "p50_coverage": float(np.mean(y <= pred[:, 0])),
        "inference_us": float(np.median(times) * 1e6),
        "inference_us_p90": float(np.percentile(times, 90) * 1e6),
        "inference_us_p99": float(np.percentile(times, 99) * 1e6),
        "inference_cpu_us": float(np.median(cpu_times) * 1e6),
        "inference_split_us": split,
        "inference_implementation": implementation(),
        "reference_sum_range_1000_cpu_us": [ref_before, ref_after],
        "batch_inference_us_per_request": batch_s / len(test) * 1e6,
        "timing": (f"single-request LengthPredictor.predict (features + trees) on "
                   f"{min(timing_n, len(test))} held-out prompts x {timing_repeats} passes; "
                   f"inference_us = median wall time, inference_cpu_us = median thread CPU "
                   f"time; inference_split_us: median wall µs of the parts (features = "
                   f"transform_row, trees = predict2, predict) of the compiled path and of its "
                   f"pure-Python twin, same prompts, alternating passes; "
                   f"one Python thread; {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, load average {load_before:.2f} before timing, "
                   f"{load_after:.2f} after"),
        "label": "first gpt response tokens (bench_serving convention, no special tokens)",
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m block_sgl.predictor.eval_length",
        description="Evaluate the response-length model on the held-out ShareGPT split "
                    "against baselines; the last stdout line is a JSON object with --json.")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line (the last line of stdout)")
    p.add_argument("--model", default=None,
                   help="model directory from train_length; default: train one with the "
                        "defaults first (train split only)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or directory) the model was trained with; default: "
                        "the cached ShareGPT byte-level BPE")
    p.add_argument("--cache-dir", default="~/.cache/block_sgl",
                   help="cache of the default tokenizer (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="read only the first N ShareGPT conversations (default: all)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep ShareGPT's duplicate conversations (the figures before "
                        "2026-11-29; inflated: copies straddle the split). With --model the "
                        "model's own choice (its metadata) is used and this flag must match it")
    p.add_argument("--timing-requests", type=int, default=2000,
                   help="held-out prompts timed one by one (default: %(default)s)")
    p.add_argument("--timing-repeats", type=int, default=3,
                   help="passes over the timed prompts (default: %(default)s)")
    p.add_argument("--output", default="benchmarks/results/length_eval.json",
                   help="also write the JSON result here ('' to skip; default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    t0 = time.perf_counter()
    tokenizer, tokenizer_id = load_tokenizer(args.tokenizer, args.cache_dir)
    if args.model:
        model = LengthPredictor.load(args.model, tokenizer_id=tokenizer_id)
        split_meta = model.metadata.get("train", {}).get("split")
        if not isinstance(split_meta, dict):
            raise SystemExit(f"{args.model}: metadata has no train split; cannot evaluate on "
                             "held-out data")
        split = SplitSpec(**split_meta)
        kept = model.metadata["train"].get("duplicates", "kept") == "kept"
        if kept != args.keep_duplicates:
            raise SystemExit(
                f"{args.model}: trained with ShareGPT's duplicate conversations "
                f"{'kept' if kept else 'dropped'}; evaluate it the same way "
                f"({'with' if kept else 'without'} --keep-duplicates)")
    else:
        split = SplitSpec()
    data = labelled_sharegpt(tokenizer, args.limit, keep_duplicates=args.keep_duplicates)
    log(f"{len(data.examples)} examples tokenized in {time.perf_counter() - t0:.1f} s")
    if not args.model:
        model = train_on(data, tokenizer_id, split=split, config=LengthModelConfig(),
                         feature_config=FeatureConfig(), limit=args.limit, log=log)
    result = evaluate(model, data, split, timing_n=args.timing_requests,
                      timing_repeats=args.timing_repeats)
    result.update({"tokenizer_id": tokenizer_id, "split": dataclasses.asdict(split),
                   "model": args.model or "trained in-process with train_length defaults",
                   "model_config": model.metadata["train"].get("config"),
                   "n_trees": model.ensemble.n_trees, "tree_depth": model.ensemble.depth,
                   "sharegpt": data.stats})
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        b = result["baselines"]
        print(f"held-out examples: {result['n_test']} (train {result['n_train']})")
        print(f"model P50:      MAE {result['mae_model']:.1f}  MAPE {result['mape_model']:.2f}  "
              f"Spearman {result['spearman_model']:.3f}")
        for k, v in b.items():
            print(f"{k:14s}  MAE {v['mae']:.1f}  MAPE {v['mape']:.2f}  "
                  f"Spearman {v['spearman']:.3f}")
        print(f"MAE reduction vs best baseline ({result['best_baseline']}): "
              f"{result['mae_reduction_vs_best_baseline'] * 100:.1f} %")
        print(f"P90 coverage {result['p90_coverage']:.3f}; inference "
              f"{result['inference_us']:.1f} us/request (median wall time, single calls; "
              f"CPU time {result['inference_cpu_us']:.1f} us)")
        for name, parts in result["inference_split_us"].items():
            print(f"{name:9s} " + "  ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
