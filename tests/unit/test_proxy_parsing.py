"""Request parsing at the router's edge: what each endpoint accepts, and the 4xx messages."""

import functools
import json

import pytest
from hypothesis import given, settings, strategies as st

from block_sgl.router.config import RouterConfig
from block_sgl.router.proxy import BadRequest, RouterApp, _meta_from_json, _tokens_from_sse
from block_sgl.router.tokenize import PromptTokenizer
from block_sgl.testing.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def app():
    tok = PromptTokenizer(make_tiny_model())
    return RouterApp(RouterConfig(worker_urls=("http://w:1",), policy="round_robin"), router=None,
                     tokenizer=tok, served_model="tiny", context_len=64)


def parse(app, method, obj):
    return getattr(app, method)(json.dumps(obj).encode(), obj)


def test_generate_text_ids_and_batches(app):
    r = parse(app, "parse_generate", {"text": "hello world", "sampling_params": {
        "max_new_tokens": 7, "ignore_eos": True}, "stream": True})
    assert r.token_ids == app.tokenizer.encode("hello world")
    assert (r.max_new_tokens, r.ignore_eos, r.stream) == (7, True, True)
    assert parse(app, "parse_generate", {"input_ids": [[5, 6, 7], [8]]}).token_ids == [5, 6, 7]
    assert parse(app, "parse_generate", {"text": ["a b", "c"]}).text == "a b"
    assert parse(app, "parse_generate", {"text": "x"}).max_new_tokens == 128  # SGLang's default


@pytest.mark.parametrize("obj, status, message", [
    ({"sampling_params": {}}, 400, "needs `text` or `input_ids`"),
    ({"text": 5}, 400, "`text` must be a string"),
    ({"input_ids": [1, "2"]}, 400, "`input_ids` must be a list of token ids"),
    ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens must be"),
    ({"text": "x", "sampling_params": {"max_new_tokens": True}}, 400, "max_new_tokens must be"),
    ({"text": "x", "sampling_params": []}, 400, "sampling_params must be an object"),
    ({"input_ids": list(range(64))}, 400, "64 tokens; the model's context length is 64"),
])
def test_generate_errors(app, obj, status, message):
    with pytest.raises(BadRequest) as e:
        parse(app, "parse_generate", obj)
    assert e.value.status == status and message in e.value.message


def test_completions_and_chat(app):
    r = parse(app, "parse_completions", {"model": "tiny", "prompt": ["first", "second"],
                                         "max_tokens": 3})
    assert r.text == "first" and r.max_new_tokens == 3
    assert parse(app, "parse_completions", {"prompt": [1, 2, 3]}).token_ids == [1, 2, 3]
    assert parse(app, "parse_completions", {"prompt": "x", "model": "default"}).max_new_tokens == 16
    msgs = [{"role": "user", "content": "hi"}]
    r = parse(app, "parse_chat", {"messages": msgs, "max_completion_tokens": 5})
    assert r.token_ids == app.tokenizer.encode_chat(msgs)[1] and r.max_new_tokens == 5
    assert r.text.startswith("<|user|>")
    # Without max_tokens a chat may use the rest of the context.
    assert parse(app, "parse_chat", {"messages": msgs}).max_new_tokens == 64 - len(r.token_ids)


@pytest.mark.parametrize("method, obj, status, message", [
    ("parse_completions", {"model": "gpt-9", "prompt": "x"}, 404, "'gpt-9' does not exist"),
    ("parse_completions", {"prompt": {"a": 1}}, 400, "`prompt` must be"),
    ("parse_chat", {"messages": "hi"}, 400, "non-empty `messages` list"),
    ("parse_chat", {"messages": [{"content": "x"}]}, 400, "every message needs a `role`"),
])
def test_openai_errors(app, method, obj, status, message):
    with pytest.raises(BadRequest) as e:
        parse(app, method, obj)
    assert e.value.status == status and message in e.value.message


def test_response_metadata_extraction():
    assert _meta_from_json(b'{"meta_info": {"id": "r1", "completion_tokens": 4}}') == ("r1", 4)
    assert _meta_from_json(b'{"id": "c1", "usage": {"completion_tokens": 2}}') == ("c1", 2)
    assert _meta_from_json(b"not json") == (None, None)
    assert _meta_from_json(b'{"id": "\xff\xfe"}') == (None, None)  # not UTF-8
    assert _meta_from_json(b'[{"meta_info": {"id": "b0", "completion_tokens": 1}}]') == ("b0", 1)
    assert _meta_from_json(b"[]") == (None, None) and _meta_from_json(b"7") == (None, None)
    assert _tokens_from_sse(b'data: {"meta_info": {"completion_tokens": 9}}', 3) == 9
    assert _tokens_from_sse(b'data: {"choices": []}', 3) == 3  # no usage: count the events


@functools.lru_cache(maxsize=1)
def _tokenizers():
    from tokenizers import Tokenizer

    folder = make_tiny_model()
    return PromptTokenizer(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_router_token_ids_equal_the_tokenizers_plain_encode(text):
    """The router's fast path (``encode_batch_fast``: no offsets) gives ``Tokenizer.encode``'s
    ids, special tokens included, for any text (SGLang's own ids: tests/integration)."""
    tok, plain = _tokenizers()
    assert tok.encode(text) == plain.encode(text, add_special_tokens=True).ids
    messages = [{"role": "user", "content": text}]
    rendered, ids = tok.encode_chat(messages)
    assert ids == plain.encode(rendered, add_special_tokens=False).ids
