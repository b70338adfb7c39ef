"""Prompt features for the response-length model: cheap to compute at the router.

Input: a prompt as text, raw bytes (decoded as UTF-8 with replacement), or a chat message list
(OpenAI ``{"role", "content"}`` with string or ``[{"type": "text", "text": ...}]`` content, or
ShareGPT ``{"from", "value"}``), plus its token count (the router has already tokenized it).

Output: one float32 vector per prompt, in this order:

* ``DENSE_FEATURES``: counts and ratios of the whole prompt, of its last message (the request)
  and of the earlier turns (the context: e.g. the length of the previous answer, whether it
  stops mid-word or inside an open code block);
* one ``gram_<target>`` score per ``gram_targets`` entry (when ``gram_bits > 0``): linear
  models over hashed word n-grams (``2 ** gram_bits`` buckets: unigrams and bigrams of the
  request's first ``head_words`` and last ``tail_words`` words, its first 1-3 words, its last
  two, the context's last ``context_words`` words, a bias; each n-gram counted, the bag scaled
  by 1 / sqrt(its size)) of the output length, each for one target (``GRAM_TARGETS``: log
  length, length, rank, P(length > k), P(length < 100)). Their weights are fitted with the
  length model (ridge regression, out-of-fold for the training rows: stacking) and saved with
  it. The task type (code, list, translation, summary, "continue", greetings, ...) reaches the
  model through these scores: every word of the request's head is an n-gram.

Cost is bounded whatever the prompt size: the only passes over all the text are C-speed
``str.count`` calls over the messages; everything else reads a window of the last message (its
first ``head_chars`` and last ``tail_chars`` characters: where instructions are) and the last
``context_chars`` of the context, with bytes methods (C speed); plain Python runs once per
n-gram word (one dict lookup for its hash, one multiply for a bigram) and numpy is called
three times (gather and sum the n-gram weights).

``PromptFeaturizer`` is ``CompiledPromptFeaturizer``: the same work in C
(``block_sgl._features.FeatureKernel``, same float32 vectors bit for bit), whose specification
is ``PurePromptFeaturizer``; ``BLOCK_SGL_FEATURES_PURE=1`` selects the pure one (debugging; a
missing build is an ImportError). See ``block_sgl/predictor/README.md`` for the measured costs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from array import array
import zlib
from typing import Any, Sequence

import numpy as np

FEATURES_VERSION = 2

DENSE_FEATURES = (
    "prompt_tokens", "turns", "chars", "last_chars", "last_est_tokens", "lines",
    "question_marks", "window_words", "tokens_per_char", "digit_ratio", "upper_ratio",
    "non_ascii_ratio", "code_char_ratio", "mean_word_len", "list_lines", "requested_words",
    "requested_count", "max_number", "last_end_alnum",
    "context_chars", "context_est_tokens", "context_lines", "context_code_fences",
    "context_list_lines", "context_end_alnum", "context_open_fence",
)

def _rank(y: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(y, kind="stable"), kind="stable") / max(len(y), 1)


# Targets of the linear n-gram scores: output tokens y (array) -> regression target.
GRAM_TARGETS = {
    "log": lambda y: np.log1p(y),
    "linear": lambda y: y / 100.0,
    "rank": _rank,
    **{f"gt{k}": (lambda k: lambda y: (y > k).astype(np.float64))(k)
       for k in (50, 150, 250, 350, 450, 500, 600, 700, 800)},
    **{f"lt{k}": (lambda k: lambda y: (y < k).astype(np.float64))(k) for k in (100,)},
}
DEFAULT_GRAM_TARGETS = ("log", "linear", "rank", "lt100", "gt50", "gt150", "gt250", "gt350",
                        "gt450", "gt500", "gt600", "gt700", "gt800")

# Words are computed on UTF-8 bytes (C-speed): ASCII letters, digits and "_" and every
# non-ASCII byte are word bytes, all other ASCII bytes separate words; ASCII is lowercased.
_WORD_BYTES_TABLE = bytes(
    (c + 32 if 65 <= c <= 90 else c)
    if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 95 or c >= 128) else 32
    for c in range(256))
# "N <unit>" in a request: units counted as items (the word-like units are _WORD_UNITS)
_COUNT_UNITS = frozenset(
    w.encode() + s for w in ("item", "example", "idea", "point", "question", "tip", "step",
                             "name", "title", "reason", "way", "tweet", "post", "option",
                             "bullet", "day", "slide") for s in (b"", b"s"))
_DIGIT_BYTES = b"0123456789"
_CODE_BYTES = b"{}();=<>[]"
_UPPER_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WORD_CACHE_MAX = 1 << 17
# word units whose requested count means "this many words"-ish, scaled to words
_WORD_UNITS = {k.encode(): v for k, v in {
    "word": 1.0, "words": 1.0, "sentence": 20.0, "sentences": 20.0, "paragraph": 100.0,
    "paragraphs": 100.0, "page": 400.0, "pages": 400.0, "line": 10.0, "lines": 10.0,
    "character": 0.2, "characters": 0.2, "chapter": 1000.0, "chapters": 1000.0,
    "section": 150.0, "sections": 150.0}.items()}
_ASSISTANT_ROLES = frozenset(("assistant", "gpt", "chatgpt", "bard", "bing", "model"))


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How prompts become feature vectors; saved with every model (a mismatch is refused)."""

    gram_bits: int = 18
    """Buckets of the hashed n-grams of the fitted linear scores (0: no such features)."""
    gram_targets: tuple[str, ...] = DEFAULT_GRAM_TARGETS
    """What each linear n-gram score estimates (keys of ``GRAM_TARGETS``)."""
    head_chars: int = 512
    """Characters from the start of the last message used for word-level features."""
    tail_chars: int = 256
    """Characters from the end of the last message used for word-level features."""
    head_words: int = 32
    """Words from the start of the window used as n-grams."""
    tail_words: int = 8
    """Words from the end of the window used as n-grams."""
    context_chars: int = 512
    """Characters from the end of the context (earlier turns) used for context features."""
    context_words: int = 8
    """Context words used as n-grams."""
    version: int = FEATURES_VERSION

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gram_targets"] = list(self.gram_targets)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "FeatureConfig":
        if not isinstance(d, dict):
            raise ValueError(f"feature config must be an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"feature config has unknown field(s) {sorted(unknown)}")
        missing = names - set(d)
        if missing:
            raise ValueError(f"feature config lacks field(s) {sorted(missing)}")
        d = dict(d)
        targets = d.pop("gram_targets")
        if (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
                or set(targets) - set(GRAM_TARGETS)):
            raise ValueError(f"feature config field 'gram_targets' must be a list of "
                             f"{sorted(GRAM_TARGETS)}, got {targets!r}")
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"feature config field {k!r} must be an int >= 0, got {v!r}")
        cfg = cls(gram_targets=tuple(targets), **d)
        if cfg.version != FEATURES_VERSION:
            raise ValueError(f"feature config version {cfg.version} is not supported by this "
                             f"block_sgl (features version {FEATURES_VERSION}); retrain the model")
        if cfg.gram_bits > 24:
            raise ValueError("feature config: gram_bits must be <= 24")
        return cfg


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (bytes, bytearray)):
        return bytes(content).decode("utf-8", errors="replace")
    if isinstance(content, Sequence):  # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            elif isinstance(p, str):
                parts.append(p)
        return "\n".join(parts)
    return str(content)


def _messages(prompt: Any) -> tuple[list[str], bool]:
    """(texts of the messages, has an assistant turn)."""
    if prompt is None:
        return [], False
    if isinstance(prompt, str):
        return [prompt], False
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        return [bytes(prompt).decode("utf-8", errors="replace")], False
    if isinstance(prompt, Sequence):
        texts, assistant = [], False
        for m in prompt:
            if isinstance(m, dict):
                c = m.get("content", m.get("value"))
                texts.append(c if isinstance(c, str) else _content_text(c))
                if not assistant:
                    assistant = m.get("role", m.get("from")) in _ASSISTANT_ROLES
            else:
                texts.append(_content_text(m))
        return texts, assistant
    return [str(prompt)], False


def _texts(prompt: Any) -> list[str]:
    """The texts of the messages (``_messages`` without the roles; fast path for lists)."""
    if type(prompt) is str:
        return [prompt]
    if type(prompt) is list or type(prompt) is tuple:
        out = []
        for m in prompt:
            if type(m) is dict:
                c = m.get("content")
                if c is None:
                    c = m.get("value")
                out.append(c if type(c) is str else _content_text(c))
            else:
                out.append(_content_text(m))
        return out
    return _messages(prompt)[0]


def normalize_prompt(prompt: Any) -> tuple[str, str, str, int, bool]:
    """(all text, last message, context = earlier messages, turns, has an assistant turn).

    Accepts str, bytes (invalid UTF-8 replaced), None, or a list of chat messages (OpenAI or
    ShareGPT keys). Anything else is turned into text with ``str``. Texts are joined by "\\n".
    """
    texts, assistant = _messages(prompt)
    if not texts:
        return "", "", "", 0, False
    return "\n".join(texts), texts[-1], "\n".join(texts[:-1]), len(texts), assistant


_BIGRAM_MUL = 0x01000193


def _h(s: str) -> int:
    return zlib.crc32(s.encode("utf-8", errors="replace"))


_F1, _F2, _F3, _L2, _PC = (_h("F1:"), _h("F2:"), _h("F3:"), _h("L2:"), _h("P:"))
_BIAS_GRAM, _CONTEXT_GRAM = _h("<bias>"), _h("<context>")


class PurePromptFeaturizer:
    """Turns prompts into fixed-width float32 feature vectors (see the module docstring).

    The pure-Python specification of ``PromptFeaturizer`` (the compiled one, unless
    ``BLOCK_SGL_FEATURES_PURE=1``: see the end of this module).

    ``gram_weights``: the fitted linear n-gram models, shape ``(len(gram_targets),
    2 ** gram_bits + 1)`` (bucket weights, then the intercept); without them the
    ``gram_<target>`` columns are 0 (the trainer fills them itself).
    """

    def __init__(self, config: FeatureConfig | None = None, gram_weights=None):
        self.config = config or FeatureConfig()
        self.n_dense = len(DENSE_FEATURES)
        self.n_gram_buckets = (1 << self.config.gram_bits) if self.config.gram_bits else 0
        self.n_gram_scores = len(self.config.gram_targets) if self.n_gram_buckets else 0
        self.has_gram_score = self.n_gram_scores > 0
        self.gram_score_start = self.n_dense
        self.n_features = self.gram_score_start + self.n_gram_scores
        self._word_hash: dict[bytes, int] = {}
        self._weights = None
        if gram_weights is not None:
            w = np.asarray(gram_weights, dtype=np.float32)
            want = (self.n_gram_scores, self.n_gram_buckets + 1)
            if not self.has_gram_score or w.shape != want:
                raise ValueError(f"gram weights have shape {w.shape}, expected {want} for "
                                 f"gram_bits={self.config.gram_bits} and "
                                 f"{self.n_gram_scores} gram targets")
            if not np.all(np.isfinite(w)):
                raise ValueError("gram weights contain non-finite values")
            # (buckets, targets): one row gather per n-gram. The intercepts (last column) are
            # not added: a constant shift of a feature changes nothing for trees.
            self._weights = np.ascontiguousarray(w[:, :-1].T)

    @property
    def names(self) -> list[str]:
        return (list(DENSE_FEATURES)
                + ([f"gram_{t}" for t in self.config.gram_targets] if self.has_gram_score
                   else []))

    def _analyze(self, prompt: Any, prompt_tokens: Any) -> tuple[list[float], list[int]]:
        """(the features before the gram scores, as a list; the prompt's n-gram buckets)."""
        return self._analyze_texts(_texts(prompt), prompt_tokens)

    def _analyze_texts(self, texts: list[str], prompt_tokens: Any
                       ) -> tuple[list[float], list[int]]:
        """``_analyze`` of the prompt's message texts (``_texts(prompt)``)."""
        cfg = self.config
        turns = len(texts)
        last = texts[-1] if texts else ""
        try:
            tokens = float(prompt_tokens)
        except (TypeError, ValueError):
            tokens = 0.0
        if not 0.0 <= tokens <= 1e9:  # NaN, negative, inf
            tokens = 0.0 if not tokens >= 0.0 else 1e9
        n_last = len(last)
        # the context = the earlier messages joined by "\n", read without joining them all
        if turns > 1:
            n_ctx = turns - 2
            ctx_lines = turns - 1  # the separators, + 1
            ctx_fences = 0
            for t in texts[:-1]:
                n_ctx += len(t)
                ctx_lines += t.count("\n")
                ctx_fences += t.count("```")
            cc = cfg.context_chars
            prev = texts[-2]
            ctx = prev[-cc:] if len(prev) >= cc or turns == 2 else "\n".join(texts[:-1])[-cc:]
            cb = ctx.encode("utf-8", errors="replace")
            ctx_end = cb.rstrip()[-1:]
            ctx_list = cb.count(b"\n-") + cb.count(b"\n*") + cb.count(b"\n1")
            n_chars = n_ctx + 1 + n_last
        else:
            n_ctx = ctx_lines = ctx_fences = ctx_list = 0
            cb = ctx_end = b""
            n_chars = n_last
        # the window: the first head_chars and last tail_chars of the request
        hc, tc = cfg.head_chars, cfg.tail_chars
        window = last if n_last <= hc + tc else last[:hc] + "\n" + last[-tc:]
        wb = window.encode("utf-8", errors="replace")
        nb = len(wb) or 1
        wt = wb.translate(_WORD_BYTES_TABLE)  # word bytes kept, every other byte a space
        word_bytes = len(wt) - wt.count(b" ")
        hw, tw = cfg.head_words, cfg.tail_words
        hb, tb = 16 * hw, 16 * tw  # bytes that hold that many words (most of the time)
        if len(wt) <= hb + tb:
            used = wt.split()
            n_words = len(used)
            if n_words > hw + tw:
                used = used[:hw] + used[-tw:]
        else:  # split only the two ends (splitting every word costs more than all the rest)
            used = wt[:hb].split()[:hw] + wt[-tb:].split()[1:][-tw:]
            n_words = 0
        mean_len = sum(map(len, used)) / len(used) if used else 0.0
        if not n_words and mean_len:
            n_words = word_bytes / mean_len
        n_digits = len(wb) - len(wb.translate(None, _DIGIT_BYTES))
        req_words = req_count = max_number = 0.0
        if n_digits:
            joined = b"".join(used)
            if len(joined) != len(joined.translate(None, _DIGIT_BYTES)):
                top = 0
                n_used = len(used)
                for i, w in enumerate(used):
                    if w.isdigit() and len(w) <= 7:
                        v = int(w)
                        if v > top:
                            top = v
                        if len(w) <= 5 and i + 1 < n_used:  # "500 words", "3 5 ideas"
                            unit = used[i + 1]
                            if unit.isdigit() and i + 2 < n_used:
                                unit = used[i + 2]
                            scale = _WORD_UNITS.get(unit)
                            if scale is not None:
                                req_words = max(req_words, v * scale)
                            elif unit in _COUNT_UNITS:
                                req_count = max(req_count, float(v))
                max_number = math.log1p(top)
        feats = [
            tokens, turns, n_chars, n_last, tokens * n_last / n_chars if n_chars else 0.0,
            ctx_lines + last.count("\n") + (1 if n_chars else 0), window.count("?"), n_words,
            tokens / n_chars if n_chars else 0.0, n_digits / nb,
            (nb - len(wb.translate(None, _UPPER_BYTES))) / nb,
            (len(wb) - len(window)) / (len(window) or 1),
            (nb - len(wb.translate(None, _CODE_BYTES))) / nb, mean_len,
            wb.count(b"\n-") + wb.count(b"\n*") + wb.count(b"\n1") + (wb[:1] in b"-*1"),
            req_words, req_count, max_number, 1.0 if wb.rstrip()[-1:].isalnum() else 0.0,
            n_ctx, tokens * n_ctx / n_chars if n_chars else 0.0, ctx_lines, ctx_fences, ctx_list,
            1.0 if ctx_end.isalnum() else 0.0, ctx_fences & 1,
        ]
        if not self.n_gram_buckets:
            return feats, []
        # n-gram buckets: crc32 of each word through a bounded cache (words repeat a lot)
        cache = self._word_hash
        hl = list(map(cache.get, used))
        if None in hl:
            if len(cache) > _WORD_CACHE_MAX:
                cache.clear()
            for i, h in enumerate(hl):
                if h is None:
                    h = hl[i] = zlib.crc32(used[i])
                    cache[used[i]] = h
        mask = self.n_gram_buckets - 1
        grams = [h & mask for h in hl]
        grams += [((a * _BIGRAM_MUL) ^ b) >> 7 & mask for a, b in zip(hl, hl[1:])]
        grams.append(_BIAS_GRAM & mask)
        if hl:
            grams.append((_F1 ^ hl[0]) & mask)
            grams.append((_L2 ^ hl[-1] ^ (hl[-2] * 3 if len(hl) > 1 else 0)) & mask)
            if len(hl) > 1:
                grams.append((_F2 ^ hl[0] ^ (hl[1] * 3)) & mask)
                if len(hl) > 2:
                    grams.append((_F3 ^ hl[0] ^ (hl[1] * 3) ^ (hl[2] * 7)) & mask)
        if turns > 1:
            grams.append(_CONTEXT_GRAM & mask)
            for w in cb[-16 * cfg.context_words:].translate(_WORD_BYTES_TABLE).split()[
                    -cfg.context_words:]:
                h = cache.get(w)
                if h is None:
                    h = cache[w] = zlib.crc32(w)
                grams.append((_PC ^ h) & mask)
        return feats, grams

    def gram_vector(self, grams: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(bucket indices, values) of the n-gram scores' input: each bucket present with its
        count / sqrt(number of n-grams) (bag of n-grams, scaled by its size)."""
        idx, counts = np.unique(np.asarray(grams, dtype=np.intp), return_counts=True)
        return idx, counts * (1.0 / math.sqrt(len(grams)) if grams else 0.0)

    def _gram_scores(self, grams: list[int], out: np.ndarray) -> None:
        # never empty: the bias gram is always there
        np.multiply(self._weights.take(grams, axis=0).sum(axis=0), 1.0 / math.sqrt(len(grams)),
                    out=out)

    def transform_one(self, prompt: Any, prompt_tokens: float) -> np.ndarray:
        """Feature vector (float32) of one prompt."""
        feats, grams = self._analyze(prompt, prompt_tokens)
        if self._weights is None:
            feats += [0.0] * self.n_gram_scores
            return np.array(feats, dtype=np.float32)
        x = np.empty(self.n_features, dtype=np.float32)
        x[:self.gram_score_start] = feats
        self._gram_scores(grams, x[self.gram_score_start:])
        return x

    def transform_row(self, prompt: Any, prompt_tokens: float) -> array:
        """``transform_one`` as an ``array('f')`` (float32 values, read back as Python floats:
        what the generated tree code takes)."""
        feats, grams = self._analyze(prompt, prompt_tokens)
        if self._weights is None:
            feats += [0.0] * self.n_gram_scores
        else:
            feats += (self._weights.take(grams, axis=0).sum(axis=0)
                      * (1.0 / math.sqrt(len(grams)))).tolist()
        return array("f", feats)

    def transform(self, prompts: Sequence[Any], prompt_tokens: Sequence[float]) -> np.ndarray:
        """Feature matrix (n, n_features) of several prompts."""
        return self.transform_with_grams(prompts, prompt_tokens)[0]

    def transform_with_grams(self, prompts: Sequence[Any], prompt_tokens: Sequence[float]
                             ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Feature matrix and each prompt's ``gram_vector`` (what the trainer fits on)."""
        if len(prompts) != len(prompt_tokens):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_tokens)} token counts")
        x = np.zeros((len(prompts), self.n_features), dtype=np.float32)
        vectors = []
        for i, (p, t) in enumerate(zip(prompts, prompt_tokens)):
            feats, grams = self._analyze(p, t)
            x[i, :self.gram_score_start] = feats
            if self.has_gram_score:
                vectors.append(self.gram_vector(grams))
                if self._weights is not None:
                    self._gram_scores(grams, x[i, self.gram_score_start:])
        return x, vectors


class CompiledPromptFeaturizer(PurePromptFeaturizer):
    """``PurePromptFeaturizer`` with its per-prompt work (``_analyze`` and ``transform_row``:
    texts, counts, word hashes, n-gram score sums) in C: ``block_sgl._features.FeatureKernel``,
    whose specification is the pure class (same values, bit for bit). Training and batch paths
    (``transform``, ``transform_with_grams``) inherit the compiled ``_analyze``."""

    def __init__(self, config: FeatureConfig | None = None, gram_weights=None):
        if COMPILED_EXTENSION is None:
            raise RuntimeError(f"{PURE_ENV}=1: the compiled featurizer is switched off")
        super().__init__(config, gram_weights)
        self._kernel = COMPILED_EXTENSION.FeatureKernel(self, sys.modules[__name__])

    def _analyze(self, prompt: Any, prompt_tokens: Any) -> tuple[list[float], list[int]]:
        return self._kernel.analyze(prompt, prompt_tokens)

    def transform_row(self, prompt: Any, prompt_tokens: float) -> array:
        return self._kernel.row(prompt, prompt_tokens)


PURE_ENV = "BLOCK_SGL_FEATURES_PURE"


def implementation() -> str:
    """``"compiled"`` or ``"python"`` (``BLOCK_SGL_FEATURES_PURE=1``): which featurizer (and
    which tree evaluator, ``length.TreeEnsemble.predict2``) the length predictor runs."""
    return "python" if COMPILED_EXTENSION is None else "compiled"


# The selector. The compiled extension module (``block_sgl._features``: featurizer and trees),
# or None when the pure-Python twins are requested (debugging). A missing build is an
# ImportError, never a silent fallback to the slower code.
if os.environ.get(PURE_ENV) == "1":
    COMPILED_EXTENSION = None
    PromptFeaturizer = PurePromptFeaturizer
else:
    try:
        from block_sgl import _features as COMPILED_EXTENSION
    except ImportError as exc:
        raise ImportError(
            "block_sgl._features (the compiled length-predictor featurizer and trees) is not "
            "built. Build it with `pip install -e . --no-build-isolation` or `python setup.py "
            f"build_ext --inplace` (needs zlib's headers: zlib1g-dev); set {PURE_ENV}=1 to run "
            "the pure-Python twin instead.") from exc
    PromptFeaturizer = CompiledPromptFeaturizer
