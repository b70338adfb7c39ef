"""The compiled length-predictor inference (``block_sgl._features``) equals its pure-Python
specification bit for bit: ``FeatureKernel`` = ``PurePromptFeaturizer`` (``_analyze``,
``transform_row``, ``transform_one``) on random prompts of every accepted shape, and
``TreeKernel.predict2`` = ``TreeEnsemble.predict2_python`` on random rows; plus the selector
(compiled by default, ``BLOCK_SGL_FEATURES_PURE=1`` for the twin, a missing build is an
ImportError)."""

import importlib
import json
import math
import os
import subprocess
import sys
from array import array
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import block_sgl.predictor.features as features
from block_sgl.predictor.features import FeatureConfig, PurePromptFeaturizer
from block_sgl.predictor.length import TreeEnsemble

compiled_only = pytest.mark.skipif(features.implementation() != "compiled",
                                   reason="the pure-Python twin was requested")

# Configs: the default one; small windows that cut almost every prompt; the Python slicing
# edge cases (``[-0:]`` keeps everything: tail_chars, tail_words, context_* = 0); no n-grams.
CONFIGS = {
    "default": FeatureConfig(),
    "small": FeatureConfig(gram_bits=6, head_chars=12, tail_chars=5, head_words=3, tail_words=2,
                           context_chars=9, context_words=2),
    "zeros": FeatureConfig(gram_bits=4, gram_targets=("log", "rank"), head_chars=7, tail_chars=0,
                           head_words=2, tail_words=0, context_chars=0, context_words=0),
    "no_grams": FeatureConfig(gram_bits=0),
}


def _weights(cfg: FeatureConfig, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (len(cfg.gram_targets), (1 << cfg.gram_bits) + 1)
    return (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0], size=shape)).astype(
        np.float32)


@pytest.fixture(scope="module")
def featurizer_pairs():
    """(pure, compiled) featurizers per config: with fitted-like weights, and without."""
    if features.implementation() != "compiled":
        pytest.skip("the pure-Python twin was requested")
    pairs = {}
    for name, cfg in CONFIGS.items():
        w = _weights(cfg, len(name)) if cfg.gram_bits else None
        pairs[name] = (PurePromptFeaturizer(cfg, w), features.CompiledPromptFeaturizer(cfg, w))
        if cfg.gram_bits:
            pairs[name + "/no_weights"] = (PurePromptFeaturizer(cfg),
                                           features.CompiledPromptFeaturizer(cfg))
    return pairs


class CountingStr(str):
    """A str subclass that lies about its counts: the Python code calls these methods, so the
    compiled one must hand such texts to it."""

    def count(self, *args):
        return 7


class Stringly:
    def __str__(self):
        return "an object 42 words\n- item"


class Messages(Sequence):
    """A chat that is a Sequence but neither list nor tuple."""

    def __init__(self, items):
        self._items = list(items)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)


PIECES = ["write", "Write", "500", "words", "3", "ideas", "5", "10", "Paragraphs", "STEP",
          "steps", "1.", "-", "*", "```", "```python\n", "\n", "\n\n", "\n-", "\n*", "\n1", "?",
          "é", "日本語", "\ud800", "\udfff", "\x00", "\t", "\r\n", "\x0b", "\x0c", "\x1c",
          "\x85", "\xa0", "\u2028", "  ", "{", "}", "(x);", "=", "<a>", "[]", "1234567",
          "12345678", "007", "0", "99999", "word", "items", "item", "sentence", "chapter",
          "bullet", "tweets", "pages", "characters", "ß", "İ", "🙂", "_", "a_b", "x" * 40]
texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.tuples(st.sampled_from(PIECES) | st.text(max_size=4),
                       st.sampled_from(["", " ", "  ", "\n", ", ", "-", "\t"])),
             max_size=80).map(lambda ws: "".join(a + b for a, b in ws)),
)
long_texts = st.builds(lambda t, k: t * k, texts, st.integers(1, 300))
any_text = st.one_of(texts, texts, long_texts)
content = st.one_of(
    any_text, st.none(), st.binary(max_size=40), any_text.map(CountingStr),
    st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": any_text}),
                       any_text, st.just({"type": "image_url"}), st.just({"text": 5})),
             max_size=4),
    st.integers(), st.just(Stringly()))
messages = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "gpt"]),
                           "content": any_text}),
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "bard"]), "value": any_text}),
    st.fixed_dictionaries({"role": st.just("user"), "content": content}),
    st.fixed_dictionaries({"content": st.none(), "value": content}),
    st.just({}), any_text, st.none(), st.binary(max_size=20), st.integers())
prompts = st.one_of(
    any_text, any_text, st.binary(max_size=300), st.none(), st.just(""),
    st.lists(messages, max_size=6), st.lists(messages, max_size=6).map(tuple),
    st.lists(messages, min_size=1, max_size=4).map(Messages),
    any_text.map(CountingStr), st.just(Stringly()), st.floats(allow_nan=False),
    st.binary(max_size=50).map(bytearray))
tokens = st.one_of(
    st.floats(), st.integers(-10, 10 ** 12), st.none(), st.just(10 ** 400),
    st.sampled_from(["12", " 7.5 ", "abc", "1_000", b"9", "nan", "-inf", "1e12"]),
    st.just(Stringly()))


def _outcome(fn, *args):
    """What a call returns, or the type of what it raises (both sides must agree)."""
    try:
        return "ok", fn(*args)
    except Exception as e:  # noqa: BLE001 - compared, not swallowed
        return "raises", type(e)


def _typed(values):
    # repr: exact (and tells -0.0 from 0.0); the type: the Python code's ints stay ints
    return [(type(v).__name__, repr(v)) for v in values]


def _assert_same(pure, compiled, prompt, prompt_tokens):
    want = _outcome(pure._analyze, prompt, prompt_tokens)
    got = _outcome(compiled._analyze, prompt, prompt_tokens)
    assert got[0] == want[0]
    if want[0] == "raises":
        assert got[1] is want[1]
        return
    (feats, grams), (want_feats, want_grams) = got[1], want[1]
    assert _typed(feats) == _typed(want_feats)
    assert grams == want_grams
    row = compiled.transform_row(prompt, prompt_tokens)
    want_row = pure.transform_row(prompt, prompt_tokens)
    assert row.typecode == want_row.typecode == "f" and row.tobytes() == want_row.tobytes()
    assert (compiled.transform_one(prompt, prompt_tokens).tobytes()
            == pure.transform_one(prompt, prompt_tokens).tobytes() == want_row.tobytes())


@compiled_only
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(prompt=prompts, prompt_tokens=tokens, config=st.sampled_from(sorted(CONFIGS)),
       weighted=st.booleans())
def test_compiled_featurizer_equals_the_python_one(featurizer_pairs, prompt, prompt_tokens,
                                                   config, weighted):
    key = config if weighted or config == "no_grams" else config + "/no_weights"
    _assert_same(*featurizer_pairs[key], prompt, prompt_tokens)


@compiled_only
@pytest.mark.parametrize("prompt", [
    "", None, [], (), b"", b"\xff\xfe\x00\xc3(binary \x80 junk", "\ud800 lone surrogate?",
    "x" * 1_000_000, "word " * 200_000, "Write 3 ideas\n" * 50_000, "é" * 300_000 + "?",
    "```\n" * 10_000 + "Write a 500 word essay", "- a\n* b\n1. c\n" * 1000,
    [{"role": "system", "content": "be brief"},
     {"role": "user", "content": [{"type": "text", "text": "Explain TCP"}, "in 5 steps"]}],
    [{"from": "human", "value": "Write a parser"}, {"from": "gpt", "value": "```py\ndef f(" * 900},
     {"from": "human", "value": "continue"}],
    # a long chat whose previous message is short: the context spans several messages
    [{"role": "user", "content": "q" * 600}, {"role": "assistant", "content": "é\n" * 100},
     {"role": "user", "content": "ok"}, {"role": "assistant", "content": "12 steps"},
     {"role": "user", "content": "more"}],
    [{"role": "user", "content": "a"}] * 5000,
    [{"role": "user", "content": CountingStr("counted\n")}, {"role": "user", "content": "x"}],
    Stringly(), Messages([{"from": "human", "value": "a 500-word story"}]),
])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_compiled_featurizer_equals_the_python_one_on_edge_cases(featurizer_pairs, prompt,
                                                                 config):
    for prompt_tokens in (12, 0, -1.0, math.nan, math.inf, 3e9, None, "17", 250_000):
        _assert_same(*featurizer_pairs[config], prompt, prompt_tokens)


@compiled_only
def test_batch_paths_use_the_same_features(featurizer_pairs):
    pure, compiled = featurizer_pairs["small"]
    batch = ["Write 3 ideas", [{"from": "gpt", "value": "1. a"}, {"from": "human", "value": "go"}],
             None, b"\xff 500 words"]
    counts = [4, 9, 0, 3]
    x, vectors = compiled.transform_with_grams(batch, counts)
    want_x, want_vectors = pure.transform_with_grams(batch, counts)
    assert x.tobytes() == want_x.tobytes()
    for (idx, val), (want_idx, want_val) in zip(vectors, want_vectors, strict=True):
        assert np.array_equal(idx, want_idx) and np.array_equal(val, want_val)


@compiled_only
def test_feature_kernel_validates_its_inputs():
    with pytest.raises(ValueError, match="head_chars"):
        features.CompiledPromptFeaturizer(FeatureConfig(head_chars=1 << 50))
    f = features.CompiledPromptFeaturizer(FeatureConfig(gram_bits=4))
    bad = dict(vars(features), DENSE_FEATURES=features.DENSE_FEATURES[:-1])
    with pytest.raises(ValueError, match="dense features"):
        features.COMPILED_EXTENSION.FeatureKernel(f, type("Spec", (), bad))


# -- trees -------------------------------------------------------------------------------------
def _ensemble(seed: int, multi_output: bool, depth: int, constant: bool = False):
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 9)).astype(np.float32)
    x[:, 3] = np.round(x[:, 3])  # repeated values: thresholds that rows hit exactly
    y = np.zeros(400) if constant else x[:, 0] * 2 + np.sin(x[:, 1] * 3) + x[:, 3]
    params = {"objective": "reg:quantileerror", "quantile_alpha": np.array([0.5, 0.9]),
              "tree_method": "hist", "max_depth": depth, "eta": 0.3, "seed": seed,
              "nthread": 1, "verbosity": 0,
              "multi_strategy": "multi_output_tree" if multi_output else "one_output_per_tree"}
    booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=37)
    return TreeEnsemble(json.loads(booster.save_raw("json"))), x


@compiled_only
@pytest.mark.parametrize("multi_output", [True, False])
@pytest.mark.parametrize("depth", [1, 3, 6])
def test_compiled_trees_equal_the_generated_python_code(multi_output, depth):
    ens, x = _ensemble(depth, multi_output, depth)
    assert ens.predict2 is not ens.predict2_python
    thresholds = np.unique(ens.node_threshold[np.isfinite(ens.node_threshold)])
    rng = np.random.default_rng(1)
    rows = list(x[:100])
    for _ in range(100):  # values exactly at the thresholds (>= goes right), and odd values
        r = rng.choice(thresholds, size=x.shape[1]).astype(np.float32)
        r[rng.integers(0, x.shape[1])] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0])
        rows.append(r)
    for r in rows:
        row = array("f", r.tolist())
        want = ens.predict2_python(row)
        assert ens.predict2(row) == want
        assert ens.predict2(r.tolist()) == want == ens.predict2(r)  # any sequence of floats
    with pytest.raises(ValueError):
        ens.predict2(array("f", [0.0] * (x.shape[1] + 1)))
    with pytest.raises(ValueError):
        ens.predict2_python(array("f", [0.0] * (x.shape[1] + 1)))


@compiled_only
def test_compiled_trees_of_leaf_only_trees():
    ens, x = _ensemble(0, True, 3, constant=True)
    for r in x[:20]:
        row = array("f", r.tolist())
        assert ens.predict2(row) == ens.predict2_python(row)


@compiled_only
def test_tree_kernel_validates_its_arrays():
    ens, _ = _ensemble(0, True, 2)
    args = (ens.node_feature, ens.node_threshold, np.zeros((ens.n_trees << ens.depth, 2)),
            np.zeros(2), ens.n_trees, ens.depth, ens.n_features)
    kernel = features.COMPILED_EXTENSION.TreeKernel
    kernel(*args)
    with pytest.raises(ValueError, match="leaves"):
        kernel(*args[:2], np.zeros((3, 2)), *args[3:])
    with pytest.raises(ValueError, match="splits on feature"):
        kernel(*args[:-1], 1)
    with pytest.raises(ValueError, match="internal nodes"):
        kernel(ens.node_feature[:-1], *args[1:])


# -- the selector ----------------------------------------------------------------------------
def test_compiled_featurizer_is_selected():
    """Fails if the extension did not build."""
    if os.environ.get("BLOCK_SGL_FEATURES_PURE") == "1":
        pytest.skip("the pure-Python twin was requested")
    assert features.implementation() == "compiled"
    assert features.PromptFeaturizer is features.CompiledPromptFeaturizer
    assert features.COMPILED_EXTENSION.__name__ == "block_sgl._features"


def test_env_var_selects_the_twin():
    code = ("import block_sgl.predictor.features as f, block_sgl.predictor.length as l; "
            "print(f.implementation(), f.PromptFeaturizer.__name__, l.COMPILED_EXTENSION)")
    env = dict(os.environ, BLOCK_SGL_FEATURES_PURE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    # the trees too: TreeEnsemble.predict2 stays the generated Python code
    assert out.stdout.split() == ["python", "PurePromptFeaturizer", "None"]


def test_missing_extension_is_an_import_error(monkeypatch):
    monkeypatch.delenv("BLOCK_SGL_FEATURES_PURE", raising=False)
    monkeypatch.setitem(sys.modules, "block_sgl._features", None)  # import fails
    monkeypatch.delattr(importlib.import_module("block_sgl"), "_features", raising=False)
    monkeypatch.delitem(sys.modules, "block_sgl.predictor.features")
    with pytest.raises(ImportError, match="not built"):
        importlib.import_module("block_sgl.predictor.features")
    monkeypatch.undo()
    assert importlib.import_module("block_sgl.predictor.features") is features
