"""Prompt features for the response-length model: cheap to compute at the router.

Input: a prompt as text, raw bytes (decoded as UTF-8 with replacement), or a chat message list
(OpenAI ``{"role", "content"}`` with string or ``[{"type": "text", "text": ...}]`` content, or
ShareGPT ``{"from", "value"}``), plus its token count (the router has already tokenized it).

Output: one float32 vector per prompt, in this order:

* ``DENSE_FEATURES``: counts and ratios of the whole prompt, of its last message (the request)
  and of the earlier turns (the context: e.g. the length of the previous answer);
* keyword indicators (``KEYWORDS`` word groups, ``PHRASES``);
* ``2 ** hash_bits`` hashed word unigram + bigram counts of the last message (0 bits: none);
* one ``gram_<target>`` score per ``gram_targets`` entry (when ``gram_bits > 0``): linear
  models over hashed n-grams (``2 ** gram_bits`` buckets: unigrams, bigrams, the first 1-3
  words, the last two, context unigrams; binary, L2-normalised) of the output length,
  each for one target (``GRAM_TARGETS``: log length, length, P(long), P(short), rank). Their
  weights are fitted with the length model (ridge regression, out-of-fold for the training
  rows: stacking) and saved with it.

Cost is bounded whatever the prompt size: the only whole-text passes are C-speed ``str.count``
calls; word-level features look only at a window of the last message (its first
``head_chars`` and last ``tail_chars`` characters: where instructions are; at most
``head_words`` + ``tail_words`` words) and at the last ``context_chars`` of the context.
"""

from __future__ import annotations

import array
import dataclasses
import math
import re
import zlib
from typing import Any, Sequence

import numpy as np

FEATURES_VERSION = 1

DENSE_FEATURES = (
    "prompt_tokens", "log_prompt_tokens", "turns", "has_assistant_turn", "chars", "log_chars",
    "last_chars", "lines", "question_marks", "code_fences", "urls", "window_words",
    "est_words", "tokens_per_char", "digit_ratio", "upper_ratio", "non_ascii_ratio",
    "code_char_ratio", "mean_word_len", "ends_with_question", "list_lines",
    "requested_words", "requested_count", "max_number",
    "context_chars", "log_context_chars", "context_est_tokens", "context_lines",
    "context_code_fences", "context_list_lines",
)

# keyword -> surface forms (whole lowercase words) that count for it
KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("write", ("write", "writing", "rewrite", "draft", "compose")),
    ("explain", ("explain", "explanation", "describe", "elaborate", "why", "how")),
    ("list", ("list", "ideas", "examples", "suggest", "brainstorm", "options", "names")),
    ("translate", ("translate", "translation", "translator")),
    ("summarize", ("summarize", "summarise", "summary", "tldr", "shorten")),
    ("code", ("code", "function", "script", "program", "implement", "python", "javascript",
              "java", "sql", "html", "css", "react", "class", "api", "c", "typescript")),
    ("fix", ("fix", "error", "bug", "debug", "exception", "traceback", "wrong")),
    ("long_form", ("essay", "article", "story", "blog", "report", "chapter", "plan", "outline",
                   "guide", "tutorial", "course", "lesson", "proposal", "script")),
    ("short_form", ("tweet", "title", "headline", "slogan", "tagline", "subject", "name",
                    "caption", "word", "sentence")),
    ("brief", ("brief", "briefly", "short", "shorter", "concise", "quick", "simple", "simply")),
    ("detail", ("detail", "detailed", "comprehensive", "thorough", "complete", "full",
                "elaborate", "extensive", "depth")),
    ("continue", ("continue", "more", "next", "go", "keep", "expand", "extend")),
    ("email", ("email", "letter", "message", "reply", "respond", "response", "cover")),
    ("poem", ("poem", "song", "lyrics", "rap", "haiku", "rhyme", "verse")),
    ("table", ("table", "chart", "csv", "json", "markdown", "format")),
    ("compare", ("compare", "comparison", "difference", "differences", "versus", "vs", "pros",
                 "cons")),
    ("yes_no", ("is", "are", "can", "does", "do", "should", "could", "will", "would")),
    ("what", ("what", "which", "who", "when", "where")),
    ("act_as", ("act", "pretend", "roleplay", "role", "imagine", "you")),
    ("steps", ("step", "steps", "instructions", "process", "procedure")),
    ("create", ("create", "generate", "make", "design", "build", "develop")),
    ("analyze", ("analyze", "analyse", "analysis", "evaluate", "review", "critique",
                 "feedback", "improve")),
    ("correct", ("correct", "grammar", "proofread", "paraphrase", "rephrase", "spelling")),
    ("math", ("calculate", "solve", "equation", "math", "formula", "probability", "prove")),
    ("thanks", ("thanks", "thank", "ok", "okay", "great", "cool", "nice", "good", "yes", "no")),
    ("greeting", ("hi", "hello", "hey")),
)
PHRASES: tuple[str, ...] = ("step by step", "in detail", "one sentence", "one word", "give me", "how to",
           "what is", "yes or no", "as an ai", "i want you to", "for example", "bullet point")
_PHRASE_BYTES = tuple(b" " + p.encode() + b" " for p in PHRASES)

# Targets of the linear n-gram scores: output tokens y (array) -> regression target.
GRAM_TARGETS = {
    "log": lambda y: np.log1p(y),
    "linear": lambda y: y / 100.0,
    "gt500": lambda y: (y > 500).astype(np.float64),
    "lt100": lambda y: (y < 100).astype(np.float64),
    "rank": lambda y: np.argsort(np.argsort(y, kind="stable"), kind="stable") / max(len(y), 1),
}

# Words are computed on UTF-8 bytes (C-speed): ASCII letters, digits and "_" and every
# non-ASCII byte are word bytes, all other ASCII bytes separate words; ASCII is lowercased.
_WORD_BYTES_TABLE = bytes(
    (c + 32 if 65 <= c <= 90 else c)
    if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 95 or c >= 128) else 32
    for c in range(256))
_LIST_RE = re.compile(rb"^[ \t]*(?:[-*]|\xe2\x80\xa2|\d{1,3}[.)])\s", re.M)
_REQUEST_RE = re.compile(
    rb"(\d{1,5}) (?:\d{1,5} )?(words?|sentences?|paragraphs?|pages?|lines?|characters?|"
    rb"items?|examples?|ideas?|points?|questions?|tips?|steps?|names?|titles?|reasons?|ways?|"
    rb"tweets?|posts?|options?|bullets?|chapters?|sections?|days?|slides?)\b")
_NUMBER_RE = re.compile(rb"\d{1,7}")
_DIGIT_BYTES = b"0123456789"
_CODE_BYTES = b"{}();=<>[]"
_UPPER_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WORD_CACHE_MAX = 1 << 17
# word units whose requested count means "this many words"-ish, scaled to words
_WORD_UNITS_STR = {"word": 1.0, "words": 1.0, "sentence": 20.0, "sentences": 20.0,
               "paragraph": 100.0, "paragraphs": 100.0, "page": 400.0, "pages": 400.0,
               "line": 10.0, "lines": 10.0, "character": 0.2, "characters": 0.2,
               "chapter": 1000.0, "chapters": 1000.0, "section": 150.0, "sections": 150.0}
_WORD_UNITS = {k.encode(): v for k, v in _WORD_UNITS_STR.items()}


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How prompts become feature vectors; saved with every model (a mismatch is refused)."""

    hash_bits: int = 0
    """Hashed word unigram + bigram count features: ``2 ** hash_bits`` (0: none). Off by
    default: on ShareGPT 2**10 count columns added nothing over the n-gram scores and made
    training 4x slower."""
    gram_bits: int = 18
    """Buckets of the hashed n-grams of the fitted linear scores (0: no such features)."""
    gram_targets: tuple[str, ...] = ("log", "linear", "gt500", "lt100", "rank")
    """What each linear n-gram score estimates (keys of ``GRAM_TARGETS``)."""
    head_chars: int = 1024
    """Characters from the start of the last message used for word-level features."""
    tail_chars: int = 256
    """Characters from the end of the last message used for word-level features."""
    head_words: int = 32
    """Words from the start of the window used as n-grams."""
    tail_words: int = 8
    """Words from the end of the window used as n-grams."""
    context_chars: int = 512
    """Characters from the end of the context (earlier turns) used for context n-grams."""
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
        if cfg.hash_bits > 16 or cfg.gram_bits > 24:
            raise ValueError("feature config: hash_bits must be <= 16 and gram_bits <= 24")
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


def normalize_prompt(prompt: Any) -> tuple[str, str, str, int, bool]:
    """(all text, last message, context = earlier messages, turns, has an assistant turn).

    Accepts str, bytes (invalid UTF-8 replaced), None, or a list of chat messages (OpenAI or
    ShareGPT keys). Anything else is turned into text with ``str``. Texts are joined by "\\n".
    """
    if prompt is None:
        return "", "", "", 0, False
    if isinstance(prompt, str):
        return prompt, prompt, "", 1, False
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        text = bytes(prompt).decode("utf-8", errors="replace")
        return text, text, "", 1, False
    if isinstance(prompt, Sequence):
        texts, assistant = [], False
        for m in prompt:
            if isinstance(m, dict):
                role = m.get("role", m.get("from"))
                assistant |= role in ("assistant", "gpt", "chatgpt", "bard", "model")
                texts.append(_content_text(m.get("content", m.get("value"))))
            else:
                texts.append(_content_text(m))
        if not texts:
            return "", "", "", 0, False
        context = "\n".join(texts[:-1])
        return "\n".join(texts), texts[-1], context, len(texts), assistant
    text = str(prompt)
    return text, text, "", 1, False


def _h(s: str) -> int:
    return zlib.crc32(s.encode("utf-8", errors="replace"))


_BIGRAM_MUL = 0x01000193
_PREFIX_SEED = (_h("F1:"), _h("F2:"), _h("F3:"), _h("L2:"), _h("P:"))
_BIAS_GRAM, _CONTEXT_GRAM = _h("<bias>"), _h("<context>")


class PromptFeaturizer:
    """Turns prompts into fixed-width float32 feature vectors (see the module docstring).

    ``gram_weights``: the fitted linear n-gram models, shape ``(len(gram_targets),
    2 ** gram_bits + 1)`` (bucket weights, then the intercept); without them the
    ``gram_<target>`` columns are 0 (the trainer fills them itself).
    """

    def __init__(self, config: FeatureConfig | None = None, gram_weights=None):
        self.config = config or FeatureConfig()
        self.n_dense = len(DENSE_FEATURES)
        self.n_keywords = len(KEYWORDS) + len(PHRASES)
        self.n_hash = (1 << self.config.hash_bits) if self.config.hash_bits else 0
        self.n_gram_buckets = (1 << self.config.gram_bits) if self.config.gram_bits else 0
        self.n_gram_scores = len(self.config.gram_targets) if self.n_gram_buckets else 0
        self.has_gram_score = self.n_gram_scores > 0
        self.gram_score_start = self.n_dense + self.n_keywords + self.n_hash
        self.n_features = self.gram_score_start + self.n_gram_scores
        self._kw_index: dict[bytes, list[int]] = {}
        for i, (_, forms) in enumerate(KEYWORDS):
            for w in forms:
                self._kw_index.setdefault(w.encode(), []).append(self.n_dense + i)
        self._kw_keys = frozenset(self._kw_index)
        self._hash_base = self.n_dense + self.n_keywords
        self._word_hash: dict[bytes, int] = {}
        self._weights = None
        self._intercepts = None
        if gram_weights is not None:
            w = np.asarray(gram_weights, dtype=np.float32)
            want = (self.n_gram_scores, self.n_gram_buckets + 1)
            if not self.has_gram_score or w.shape != want:
                raise ValueError(f"gram weights have shape {w.shape}, expected {want} for "
                                 f"gram_bits={self.config.gram_bits} and "
                                 f"{self.n_gram_scores} gram targets")
            if not np.all(np.isfinite(w)):
                raise ValueError("gram weights contain non-finite values")
            self._weights = np.ascontiguousarray(w[:, :-1].T)  # (buckets, targets): row gather
            self._intercepts = w[:, -1].astype(np.float32)

    @property
    def names(self) -> list[str]:
        return (list(DENSE_FEATURES) + [f"kw_{k}" for k, _ in KEYWORDS]
                + [f"phrase_{p.replace(' ', '_')}" for p in PHRASES]
                + [f"hash_{i}" for i in range(self.n_hash)]
                + ([f"gram_{t}" for t in self.config.gram_targets] if self.has_gram_score
                   else []))

    def _analyze(self, prompt: Any, prompt_tokens: float, x: np.ndarray):
        """Fill ``x`` (zeros) and return the set of the prompt's n-gram buckets."""
        cfg = self.config
        text, last, context, turns, assistant = normalize_prompt(prompt)
        try:
            tokens = float(prompt_tokens)
        except (TypeError, ValueError):
            tokens = 0.0
        if not math.isfinite(tokens) or tokens < 0:
            tokens = 0.0
        tokens = min(tokens, 1e9)
        n_chars = len(text)
        if len(last) > cfg.head_chars + cfg.tail_chars:
            window = last[:cfg.head_chars] + "\n" + last[-cfg.tail_chars:]
        else:
            window = last
        wb = window.encode("utf-8", errors="replace")
        nb = len(wb) or 1
        # " words separated by single spaces " (bytes): words, phrases and requests read it
        words = wb.translate(_WORD_BYTES_TABLE).split()
        norm = b" " + b" ".join(words) + b" "
        n_words = len(words)
        wlen = len(window) or 1
        n_digits = len(wb) - len(wb.translate(None, _DIGIT_BYTES))
        req_words = req_count = 0.0
        max_number = 0.0
        if n_digits:
            for num, unit in _REQUEST_RE.findall(norm):
                v = float(num)
                if unit in _WORD_UNITS:
                    req_words = max(req_words, v * _WORD_UNITS[unit])
                else:
                    req_count = max(req_count, v)
            max_number = math.log1p(max(map(int, _NUMBER_RE.findall(wb))))
        ctx = context[-cfg.context_chars:] if context else ""
        n_ctx = len(context)
        dense = (
            tokens, math.log1p(tokens), turns, float(assistant), n_chars, math.log1p(n_chars),
            len(last), text.count("\n") + (1 if text else 0), window.count("?"),
            window.count("```"), window.count("http"), n_words, n_words * len(last) / wlen,
            tokens / n_chars if n_chars else 0.0, n_digits / nb,
            (nb - len(wb.translate(None, _UPPER_BYTES))) / nb,
            (len(wb) - len(window)) / wlen,
            (nb - len(wb.translate(None, _CODE_BYTES))) / nb,
            (len(norm) - n_words - 1) / n_words if n_words else 0.0,
            float(last.rstrip().endswith("?")),
            len(_LIST_RE.findall(wb)) if b"\n" in wb else float(_LIST_RE.match(wb) is not None),
            req_words, req_count, max_number,
            n_ctx, math.log1p(n_ctx), tokens * n_ctx / n_chars if n_chars else 0.0,
            context.count("\n") + (1 if context else 0), context.count("```"),
            len(_LIST_RE.findall(ctx.encode("utf-8", errors="replace"))) if ctx else 0,
        )
        x[:self.n_dense] = dense
        for w in self._kw_keys.intersection(words):
            for j in self._kw_index[w]:
                x[j] = 1.0
        base = self.n_dense + len(KEYWORDS)
        for i, p in enumerate(_PHRASE_BYTES):
            if p in norm:
                x[base + i] = 1.0
        if n_words > cfg.head_words + cfg.tail_words:
            used = words[:cfg.head_words] + words[-cfg.tail_words:]
        else:
            used = words
        hl = self._hash_words(used)
        if self.n_hash:
            mask = self.n_hash - 1
            counts = np.bincount([h & mask for h in hl] + [
                ((a * _BIGRAM_MUL) ^ b) >> 7 & mask for a, b in zip(hl, hl[1:])],
                minlength=self.n_hash)
            x[self._hash_base:self._hash_base + self.n_hash] += counts
        if not self.has_gram_score:
            return set()
        mask = self.n_gram_buckets - 1
        grams = {h & mask for h in hl}
        grams.update([((a * _BIGRAM_MUL) ^ b) >> 7 & mask for a, b in zip(hl, hl[1:])])
        f1, f2, f3, l2, pc = _PREFIX_SEED
        grams.add(_BIAS_GRAM & mask)
        if hl:
            grams.add((f1 ^ hl[0]) & mask)
            grams.add((l2 ^ hl[-1] ^ (hl[-2] * 3 if len(hl) > 1 else 0)) & mask)
        if len(hl) > 1:
            grams.add((f2 ^ hl[0] ^ (hl[1] * 3)) & mask)
        if len(hl) > 2:
            grams.add((f3 ^ hl[0] ^ (hl[1] * 3) ^ (hl[2] * 7)) & mask)
        if context:
            grams.add(_CONTEXT_GRAM & mask)
            cw = ctx.encode("utf-8", errors="replace").translate(_WORD_BYTES_TABLE).split()
            cw = cw[-cfg.context_words:]
            grams.update([(pc ^ h) & mask for h in self._hash_words(cw)])
        return grams

    def _hash_words(self, words: list[bytes]) -> list[int]:
        """crc32 of each word, through a bounded per-featurizer cache (words repeat a lot)."""
        cache = self._word_hash
        hl = [cache.get(w) for w in words]
        if None in hl:
            if len(cache) > _WORD_CACHE_MAX:
                cache.clear()
            for i, h in enumerate(hl):
                if h is None:
                    h = hl[i] = zlib.crc32(words[i])
                    cache[words[i]] = h
        return hl

    def gram_vector(self, grams: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """(bucket indices, values) of the n-gram scores' input: the buckets present, each
        with value 1 / sqrt(number present) (binary bag of n-grams, L2-normalised)."""
        idx = np.fromiter(grams, dtype=np.intp, count=len(grams))
        idx.sort()
        return idx, np.full(len(idx), 1.0 / math.sqrt(len(idx)) if len(idx) else 0.0)

    def _gram_scores(self, grams: set[int]) -> np.ndarray:
        if not grams:
            return self._intercepts
        idx = np.fromiter(grams, dtype=np.intp, count=len(grams))
        return self._intercepts + self._weights[idx].sum(axis=0) * (1.0 / math.sqrt(len(idx)))

    def transform_one(self, prompt: Any, prompt_tokens: float, out: np.ndarray | None = None
                      ) -> np.ndarray:
        """Feature vector of one prompt (written into ``out`` when given, else a new array)."""
        if out is None:
            x = np.zeros(self.n_features, dtype=np.float32)
        else:
            x = out
            x.fill(0.0)
        grams = self._analyze(prompt, prompt_tokens, x)
        if self._weights is not None:
            x[self.gram_score_start:] = self._gram_scores(grams)
        return x

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
            grams = self._analyze(p, t, x[i])
            if self.has_gram_score:
                vectors.append(self.gram_vector(grams))
                if self._weights is not None:
                    x[i, self.gram_score_start:] = self._gram_scores(grams)
        return x, vectors
