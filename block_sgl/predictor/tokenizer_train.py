"""The default tokenizer of the response-length model: the tiny test model's ShareGPT BPE.

There is one tokenizer-training implementation, ``block_sgl.testing.tiny_model.train_tokenizer``
(byte-level BPE, GPT-2/Llama-3 style, deterministic). The length model's committed evaluation
counts tokens with exactly the tokenizer the tiny test model ships (32k vocabulary, trained on
the first ``TinyModelSpec.tokenizer_conversations`` ShareGPT conversations), so a router in
front of the CPU test bed counts prompt tokens as the served model does. This module only
trains it without building the model (no torch needed) and caches it as one JSON file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from block_sgl.testing.tiny_model import TinyModelSpec, sharegpt_texts, train_tokenizer

# Bump when the recipe changes: cached files of another version are not reused.
SHAREGPT_BPE_RECIPE = 2


def tokenizer_fingerprint(tokenizer) -> str:
    """A short stable id of a tokenizer's full definition (sha256 of its JSON)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def sharegpt_bpe_tokenizer_id(vocab_size: int = TinyModelSpec.vocab_size, *,
                              conversations: int = TinyModelSpec.tokenizer_conversations) -> str:
    """The id (cache file stem) of ``sharegpt_bpe_tokenizer`` with these arguments."""
    return f"sharegpt-bpe-v{SHAREGPT_BPE_RECIPE}-{vocab_size}-{conversations}"


def sharegpt_bpe_tokenizer(vocab_size: int = TinyModelSpec.vocab_size,
                           cache_dir: str | os.PathLike = "~/.cache/block_sgl", *,
                           conversations: int = TinyModelSpec.tokenizer_conversations):
    """The tiny test model's tokenizer (``tiny_model.train_tokenizer`` on the turn texts of the
    first ``conversations`` ShareGPT conversations), trained once (≈ 15 s) and cached as
    ``<cache_dir>/<sharegpt_bpe_tokenizer_id()>.json``. With the defaults it is identical to
    the ``tokenizer.json`` of ``make_tiny_model()``."""
    from tokenizers import Tokenizer

    name = sharegpt_bpe_tokenizer_id(vocab_size, conversations=conversations)
    path = Path(cache_dir).expanduser() / f"{name}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # corrupt cache entry: retrain below
            pass
    tok = train_tokenizer(sharegpt_texts(conversations), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok
