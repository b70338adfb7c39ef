import dataclasses
import json
import math
from array import array

import numpy as np
import pytest

from block_sgl.predictor import features
from block_sgl.predictor.eval_length import bucket_baseline, metrics, spearman
from block_sgl.predictor.features import FeatureConfig, PromptFeaturizer, normalize_prompt
from block_sgl.predictor.length import (GRAMS_FILE, LENGTH_MODEL_VERSION, METADATA_FILE, MODEL_FILE,
                                        LengthModelConfig,
                                        LengthPredictor, TreeEnsemble, train_length_model)
from block_sgl.predictor.tokenizer_train import tokenizer_fingerprint
from block_sgl.predictor.train_length import (SplitSpec, build_parser, count_tokens,
                                              example_from_conversation,
                                              examples_from_conversations, prompt_text,
                                              sharegpt_examples)
from block_sgl.testing.tiny_model import train_tokenizer

# Small but real: the first ShareGPT conversations, a 1k BPE, a few boosting rounds.
FEATURES = FeatureConfig(gram_bits=12)
CONFIG = LengthModelConfig(rounds=25, ridge_iterations=40)


@pytest.fixture(scope="module")
def data():
    examples, _ = sharegpt_examples(limit=400)
    texts = [prompt_text(e) for e in examples] + [e.response for e in examples]
    tok = train_tokenizer(texts, 1000)
    prompts = [list(e.messages) for e in examples]
    return (prompts, count_tokens(tok, [prompt_text(e) for e in examples]),
            count_tokens(tok, [e.response for e in examples]), tok)


def _train(data, config=CONFIG, features=FEATURES):
    prompts, pt, ot, tok = data
    return train_length_model(prompts, pt, ot, tokenizer_id=f"test#{tokenizer_fingerprint(tok)}",
                              config=config, feature_config=features)


@pytest.fixture(scope="module")
def model(data):
    return _train(data)


def test_training_is_deterministic(data, model):
    again = _train(data)
    prompts, pt, _, _ = data
    assert np.array_equal(model.predict_batch(prompts, pt), again.predict_batch(prompts, pt))
    assert model._raw == again._raw
    assert np.array_equal(model._gram_weights, again._gram_weights)


def test_predictions_are_sensible_and_learn_something(data, model):
    prompts, pt, ot, _ = data
    pred = model.predict_batch(prompts, pt)
    assert pred.shape == (len(prompts), 2)
    assert np.all(np.isfinite(pred)) and np.all(pred >= 1) and np.all(pred[:, 1] >= pred[:, 0])
    # in-sample the P50 beats the constant median and the P90 covers most responses
    assert np.mean(np.abs(pred[:, 0] - ot)) < np.mean(np.abs(np.median(ot) - ot))
    assert np.mean(ot <= pred[:, 1]) > 0.75


def test_single_and_batch_predictions_agree(data, model):
    prompts, pt, _, _ = data
    batch = model.predict_batch(prompts[:40], pt[:40])
    single = np.array([model.predict(p, t) for p, t in zip(prompts[:40], pt[:40])])
    np.testing.assert_allclose(single, batch, rtol=1e-9)


@pytest.mark.parametrize("multi_output", [True, False])
def test_compiled_trees_match_xgboost(data, multi_output):
    import xgboost as xgb

    m = _train(data, dataclasses.replace(CONFIG, multi_output_trees=multi_output, rounds=10))
    prompts, pt, _, _ = data
    x = m.featurizer.transform(prompts, pt)
    ref = xgb.Booster(model_file=bytearray(m._raw)).predict(xgb.DMatrix(x), output_margin=True)
    np.testing.assert_allclose(m.ensemble.predict_margin_batch(x), ref, atol=1e-4)
    np.testing.assert_allclose(m.ensemble.predict_margin(x[3]), ref[3], atol=1e-4)
    # the generated Python code and the numpy walk agree on every row, and predict2 (what
    # predict runs: the compiled twin unless BLOCK_SGL_FEATURES_PURE=1) equals the Python code
    py = np.array([m.ensemble.predict2_python(array("f", row)) for row in x])
    np.testing.assert_allclose(np.stack([py.real, py.imag], axis=1), ref, atol=1e-4)
    np.testing.assert_allclose(np.stack([py.real, py.imag], axis=1),
                               m.ensemble.predict_margin_batch(x), rtol=0, atol=1e-9)
    assert [m.ensemble.predict2(array("f", row)) for row in x] == py.tolist()


def test_compiled_and_pure_predictions_are_equal(data, model, monkeypatch):
    """``predict`` with the compiled featurizer and trees = with their Python specifications."""
    if features.implementation() != "compiled":
        pytest.skip("the pure-Python twin was requested")
    prompts, pt, _, _ = data
    compiled = [model.predict(p, t) for p, t in zip(prompts, pt)]
    monkeypatch.setattr(model, "featurizer",
                        features.PurePromptFeaturizer(model.feature_config, model._gram_weights))
    monkeypatch.setattr(model.ensemble, "predict2", model.ensemble.predict2_python)
    assert [model.predict(p, t) for p, t in zip(prompts, pt)] == compiled


@pytest.mark.parametrize("prompt,tokens", [
    ("", 0), (None, None), ([], 0), ("x" * 1_000_000, 250_000), ("word " * 200_000, 200_000),
    (b"\xff\xfe\x00\xc3(binary \x80 junk", None), ("\ud800 lone surrogate", 3),
    ([{"role": "system", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "Explain TCP"}]}], 9),
    ("Write a 500 word essay", math.nan), ("hi", -5), ("hi", float("inf")),
])
def test_odd_inputs_give_finite_predictions(model, prompt, tokens):
    p50, p90 = model.predict(prompt, tokens)
    assert math.isfinite(p50) and math.isfinite(p90)
    assert 1.0 <= p50 <= p90 <= model.max_output_tokens


def test_save_load_round_trip(tmp_path, data, model):
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {MODEL_FILE, GRAMS_FILE, METADATA_FILE}
    loaded = LengthPredictor.load(tmp_path / "m", tokenizer_id=model.tokenizer_id)
    prompts, pt, _, _ = data
    assert np.array_equal(loaded.predict_batch(prompts, pt), model.predict_batch(prompts, pt))
    meta = json.loads((tmp_path / "m" / METADATA_FILE).read_text())
    assert meta["schema"] == "block_sgl.length_model" and meta["version"] == LENGTH_MODEL_VERSION
    assert meta["tokenizer_id"] == model.tokenizer_id
    assert FeatureConfig.from_dict(meta["feature_config"]) == FEATURES


def _saved(tmp_path, model, name="m"):
    d = tmp_path / name
    model.save(d)
    return d


def test_corrupt_or_mismatched_model_is_refused(tmp_path, model):
    with pytest.raises(ValueError, match="no metadata.json"):
        LengthPredictor.load(tmp_path / "missing")
    d = _saved(tmp_path, model, "tokenizer")
    with pytest.raises(ValueError, match="tokenizer"):
        LengthPredictor.load(d, tokenizer_id="another-tokenizer#0")

    d = _saved(tmp_path, model, "truncated")
    raw = (d / MODEL_FILE).read_bytes()
    (d / MODEL_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        LengthPredictor.load(d)

    d = _saved(tmp_path, model, "grams")
    (d / GRAMS_FILE).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="corrupt"):
        LengthPredictor.load(d)

    d = _saved(tmp_path, model, "metadata")
    (d / METADATA_FILE).write_text("{truncated")
    with pytest.raises(ValueError, match="corrupt length-model metadata"):
        LengthPredictor.load(d)

    for key, value, match in [("schema", "something.else", "schema"),
                              ("version", 99, "version 99"),
                              ("feature_config", {"hash_bits": 3}, "feature config"),
                              ("tokens_per_char", None, "invalid|corrupt")]:
        d = _saved(tmp_path, model, f"meta-{key}")
        meta = json.loads((d / METADATA_FILE).read_text())
        meta[key] = value
        (d / METADATA_FILE).write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=match):
            LengthPredictor.load(d)

    # a feature config that does not match the saved trees / weights
    d = _saved(tmp_path, model, "mismatch")
    meta = json.loads((d / METADATA_FILE).read_text())
    meta["feature_config"]["gram_bits"] = 10
    (d / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="gram weights"):
        LengthPredictor.load(d)


def test_tree_ensemble_rejects_non_models():
    with pytest.raises(ValueError, match="XGBoost"):
        TreeEnsemble({"learner": {}})


def test_featurizer_shapes_and_normalization():
    f = PromptFeaturizer(FEATURES)
    assert len(f.names) == f.n_features
    text, last, ctx, turns, assistant = normalize_prompt(
        [{"from": "gpt", "value": "1. a\n2. b"}, {"from": "human", "value": "more"}])
    assert (last, ctx, turns, assistant) == ("more", "1. a\n2. b", 2, True)
    x = f.transform_one("Write a 500-word essay. Explain step by step?", 12)
    names = f.names
    assert x[names.index("requested_words")] == 500
    assert x[names.index("window_words")] == 9 and x[names.index("turns")] == 1
    assert x[names.index("question_marks")] == 1 and x[names.index("last_end_alnum")] == 0
    # the context: the previous answer stops mid-sentence inside an open code block
    x = f.transform_one([{"role": "user", "content": "Write a parser"},
                         {"role": "assistant", "content": "Here:\n```python\ndef parse(s"},
                         {"role": "user", "content": "continue"}], 20)
    assert x[names.index("turns")] == 3 and x[names.index("last_end_alnum")] == 1
    assert x[names.index("context_open_fence")] == 1 and x[names.index("context_end_alnum")] == 1
    assert x[names.index("context_lines")] == 4 and x[names.index("context_code_fences")] == 1
    assert x[names.index("chars")] == len("Write a parser\nHere:\n```python\ndef parse(s\ncontinue")
    with pytest.raises(ValueError, match="gram_targets"):
        FeatureConfig.from_dict({**FEATURES.to_dict(), "gram_targets": ["nope"]})


def test_sharegpt_examples_and_split():
    conv = {"id": "abc_2", "conversations": [
        {"from": "gpt", "value": "earlier answer"}, {"from": "human", "value": "next?"},
        {"from": "gpt", "value": "the response"}, {"from": "human", "value": "later"}]}
    ex = example_from_conversation(conv)
    assert [m["value"] for m in ex.messages] == ["earlier answer", "next?"]
    assert ex.response == "the response"
    assert example_from_conversation({"id": "x", "conversations": [
        {"from": "human", "value": "hi"}]}) is None
    assert example_from_conversation({"id": "x", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}) is None
    split = SplitSpec(seed=0, test_fraction=0.3)
    ids = [f"conv{i}" for i in range(2000)]
    frac = np.mean([split.is_test(i) for i in ids])
    assert 0.25 < frac < 0.35
    assert all(split.is_test(f"{i}_0") == split.is_test(f"{i}_7") for i in ids[:200])


def test_excluded_conversations_are_left_out_and_recorded():
    every, _ = sharegpt_examples(limit=60)
    kept, stats = sharegpt_examples(limit=60, exclude=range(20, 40))
    assert stats["excluded_conversations"] == [20, 40] and stats["conversations_excluded"] == 20
    # = the examples of conversations 0..19 followed by those of 40..59 (file positions)
    first20, _ = sharegpt_examples(limit=20)
    first40, _ = sharegpt_examples(limit=40)
    expected = first20 + every[len(first40):]
    assert len(first40) > len(first20) and len(kept) < len(every)
    assert [e.conversation_id for e in kept] == [e.conversation_id for e in expected]
    args = build_parser().parse_args(["--out", "x", "--exclude-conversations", "4000:8000"])
    assert args.exclude_conversations == range(4000, 8000)
    for bad in ("8000:4000", "a:b", "5", "-1:3"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--out", "x", "--exclude-conversations", bad])


def _conv(cid, request, response, earlier=()):
    turns = [{"from": "gpt", "value": e} for e in earlier]
    return {"id": cid, "conversations": turns + [{"from": "human", "value": request},
                                                  {"from": "gpt", "value": response}]}


def test_duplicate_conversations_are_dropped_with_copies_of_excluded_ones():
    convs = [_conv("a", "hi", "hello"), _conv("b", "hi", "hello there"),  # same request only
             _conv("c", "hi", "hello"),  # a copy of a: same request and response
             _conv("d", "sum 2+2", "4"), _conv("e", "hi", "hello", earlier=["x"]),
             _conv("f", "sum 2+2", "4"),  # a copy of the excluded d
             _conv("g", "bye", "ciao"), _conv("h", "bye", "ciao")]
    ids = lambda exs: [e.conversation_id for e in exs]  # noqa: E731
    out, stats = examples_from_conversations(convs)
    assert ids(out) == ["a", "b", "d", "e", "g"]
    assert stats["duplicate_examples_dropped"] == 3 and stats["duplicates"] == "dropped"
    out, stats = examples_from_conversations(convs, exclude=range(3, 4))
    assert ids(out) == ["a", "b", "e", "g"]
    assert stats["duplicate_examples_dropped"] == 2 and stats["copies_of_excluded_dropped"] == 1
    assert stats["conversations_excluded"] == 1 and stats["examples"] == 4
    out, stats = examples_from_conversations(convs, exclude=range(3, 4), keep_duplicates=True)
    assert ids(out) == ["a", "b", "c", "e", "f", "g", "h"] and stats["duplicates"] == "kept"
    out, _ = examples_from_conversations(convs, limit=3)
    assert ids(out) == ["a", "b"]
    assert build_parser().parse_args(["--out", "x", "--keep-duplicates"]).keep_duplicates
    assert not build_parser().parse_args(["--out", "x"]).keep_duplicates


def test_lognormal_mean_from_two_quantiles():
    from block_sgl.predictor.length import lognormal_mean
    # a log-normal with mu = ln 100, sigma = 0.8: P90 = 100 e^(0.8 z90), mean = 100 e^(0.32)
    p90 = 100 * math.exp(0.8 * 1.2815515655446004)
    assert lognormal_mean(100.0, p90) == pytest.approx(100 * math.exp(0.32), rel=1e-9)
    assert lognormal_mean(100.0, 100.0) == 100.0  # no spread: the median
    assert lognormal_mean(100.0, 80.0) == 100.0   # crossing quantiles: never below the median
    assert lognormal_mean(100.0, 1e6, cap=4096.0) == 4096.0
    assert lognormal_mean(100.0, 300.0) < lognormal_mean(100.0, 400.0)  # more spread, more mean
    # the same distribution described by its P50 and P95
    p95 = 100 * math.exp(0.8 * 1.6448536269514722)
    assert lognormal_mean(100.0, p95, (0.5, 0.95)) == pytest.approx(100 * math.exp(0.32))
    for bad in ((0.4, 0.9), (0.5, 1.0), (0.5, 0.5)):
        with pytest.raises(ValueError, match="quantiles"):
            lognormal_mean(100.0, 200.0, bad)
    with pytest.raises(ValueError, match="> 0"):
        lognormal_mean(0.0, 200.0)


def test_expected_tokens_uses_the_models_quantiles_and_cap(model):
    assert model.quantiles == (0.5, 0.9)
    assert model.expected_tokens(100.0, 100.0) == 100.0
    assert 100.0 < model.expected_tokens(100.0, 300.0) <= model.max_output_tokens
    assert model.expected_tokens(100.0, 1e9) == model.max_output_tokens


def test_eval_helpers():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(
        0.8660254, rel=1e-6)
    m = metrics(np.array([10.0, 20.0]), np.array([20.0, 20.0]))
    assert m["mae"] == 5.0 and m["mape"] == 0.25
    base = bucket_baseline(np.array([1.0, 1.0, 100.0]), np.array([5.0, 7.0, 50.0]),
                           np.array([1.0, 100.0, 5000.0]), np.median)
    assert base.tolist() == [6.0, 50.0, 7.0]


def test_length_model_tokenizer_trainer_is_general_and_deterministic():
    """The trainer the length model's tokenizer comes from (``tiny_model.train_tokenizer``):
    same texts → same tokenizer (the model file pins its fingerprint), bounded vocabulary,
    and any text — unseen words, non-Latin script, control bytes — encodes and decodes back."""
    from block_sgl.testing.tiny_model import SPECIAL_TOKENS

    texts = ["hello world", "hello there, world!", "def f(x): return x + 1", "你好世界"] * 20
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.to_str() == b.to_str() and tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert a.get_vocab_size() <= 300
    assert all(a.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    enc = a.encode("unseen ☃ text \x00")
    assert a.decode(enc.ids) == "unseen ☃ text \x00"


def test_eval_refuses_a_duplicates_setting_other_than_the_models(tmp_path, data, model):
    from block_sgl.predictor import eval_length

    tok = data[3]
    (tmp_path / "test").mkdir()
    tok.save(str(tmp_path / "test" / "tokenizer.json"))  # load_tokenizer's id: "test#<sha>"
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / METADATA_FILE).read_text())
    meta["train"]["split"] = {"seed": 0, "test_fraction": 0.2}
    (tmp_path / "m" / METADATA_FILE).write_text(json.dumps(meta))
    argv = ["--model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "test"), "--output", ""]
    # this model's metadata records no "duplicates": trained before they were dropped = kept
    with pytest.raises(SystemExit, match="kept.*with --keep-duplicates"):
        eval_length.main(argv)
    meta["train"]["duplicates"] = "dropped"
    (tmp_path / "m" / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="dropped.*without --keep-duplicates"):
        eval_length.main(argv + ["--keep-duplicates"])
