"""Train byte-level BPE tokenizers offline (no hub download needed).

Used for (a) the default tokenizer of the committed response-length evaluation — a ~32k-token
byte-level BPE trained on a fixed slice of ShareGPT, a stand-in for a Llama-family tokenizer
that counts tokens at a similar granularity — and (b) the tiny test model's tokenizer.

``train_bpe_tokenizer`` is the general function (any texts, vocabulary size, special tokens);
``sharegpt_bpe_tokenizer`` trains once on ShareGPT and caches the result as a JSON file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Bump when the training recipe below changes: cached files of another version are not reused.
SHAREGPT_BPE_RECIPE = 1


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, seed: int = 0, *,
                        special_tokens: Sequence[str] = (), min_frequency: int = 2,
                        add_prefix_space: bool = False):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``.

    ByteLevel pre-tokenizer (GPT-2 style regex split + bytes → printable unicode), BPE model and
    trainer, ByteLevel decoder; every byte is in the initial alphabet, so any input (any
    language, binary junk) encodes without unknown tokens. ``special_tokens`` come first in the
    vocabulary (ids 0..k-1), in the order given. The trainer itself is deterministic for a
    given corpus order; ``seed`` fixes that order (the texts are shuffled with it), so the same
    (texts, vocab_size, seed, special_tokens) always gives the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be >= 256 + len(special_tokens) "
                         f"(= {256 + len(special_tokens)}), got {vocab_size}")
    corpus = [t for t in texts if isinstance(t, str) and t]
    if not corpus:
        raise ValueError("train_bpe_tokenizer: texts is empty")
    order = np.random.default_rng(seed).permutation(len(corpus))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((corpus[i] for i in order), trainer=trainer, length=len(corpus))
    return tok


def sharegpt_texts(conversations: int, max_chars: int) -> list[str]:
    """Turn texts of the first ``conversations`` ShareGPT conversations, each cut to
    ``max_chars`` characters (the corpus of ``sharegpt_bpe_tokenizer``)."""
    from block_sgl.predictor.sharegpt import ShareGPTReader

    out: list[str] = []
    for i, conv in enumerate(ShareGPTReader()):
        if i >= conversations:
            break
        for turn in conv.get("conversations") or ():
            value = turn.get("value") if isinstance(turn, dict) else None
            if isinstance(value, str) and value:
                out.append(value[:max_chars])
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """A short stable id of a tokenizer's full definition (sha256 of its JSON)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def sharegpt_bpe_tokenizer(vocab_size: int = 32000,
                           cache_dir: str | os.PathLike = "~/.cache/block_sgl", *,
                           conversations: int = 6000, max_chars: int = 2000, seed: int = 0):
    """The ShareGPT byte-level BPE (default tokenizer of the length-model evaluation), cached.

    Trained on the turn texts of the first ``conversations`` ShareGPT conversations (each text
    cut to ``max_chars`` characters; about 30 s on 2 cores), then saved as
    ``<cache_dir>/sharegpt-bpe-v<recipe>-<vocab>-<conversations>-<max_chars>-s<seed>.json``
    and loaded from there on later calls. Its id (``tokenizer_id``) is that file stem.
    """
    from tokenizers import Tokenizer

    name = sharegpt_bpe_tokenizer_id(vocab_size, conversations=conversations,
                                     max_chars=max_chars, seed=seed)
    path = Path(cache_dir).expanduser() / f"{name}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # corrupt cache entry: retrain below
            pass
    tok = train_bpe_tokenizer(sharegpt_texts(conversations, max_chars), vocab_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def sharegpt_bpe_tokenizer_id(vocab_size: int = 32000, *, conversations: int = 6000,
                              max_chars: int = 2000, seed: int = 0) -> str:
    """The id (cache file stem) of ``sharegpt_bpe_tokenizer`` with these arguments."""
    return (f"sharegpt-bpe-v{SHAREGPT_BPE_RECIPE}-{vocab_size}-{conversations}-{max_chars}"
            f"-s{seed}")
