import hashlib
import json

import pytest

from block_sgl.testing.tiny_model import TinyModelSpec, make_tiny_model

SMALL = TinyModelSpec(vocab_size=600, tokenizer_conversations=150, max_position_embeddings=2048)


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_deterministic_from_the_spec(tmp_path):
    a = make_tiny_model(SMALL, tmp_path / "a")
    b = make_tiny_model(SMALL, tmp_path / "b")
    assert digest(a) == digest(b)
    other = make_tiny_model(TinyModelSpec(**{**SMALL.__dict__, "seed": 1}), tmp_path / "a")
    assert other != a
    assert digest(other)["model.safetensors"] != digest(a)["model.safetensors"]
    assert digest(other)["tokenizer.json"] == digest(a)["tokenizer.json"]


def test_cached_on_disk(tmp_path):
    first = make_tiny_model(SMALL, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_model(SMALL, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_is_realistic_and_has_a_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = make_tiny_model(TinyModelSpec(vocab_size=4000, tokenizer_conversations=1000), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    text = "Summarize the main ideas of the product launch formula for a marketing agency."
    n = len(tok(text)["input_ids"])
    assert 12 <= n <= 30  # word-piece counts like a real BPE, not one token per byte
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == len(tok)  # every token id has an embedding row
