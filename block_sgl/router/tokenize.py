"""The served model's tokenizer at the router, without transformers.

Importing transformers pulls in torch (≈12 s and ≈700 MB RSS here), too heavy for a router
replica. A Hugging Face model folder's ``tokenizer.json`` is loaded with the ``tokenizers``
library and its chat template (``tokenizer_config.json`` or ``chat_template.jinja``) is
rendered with a sandboxed jinja2 environment set up the way transformers' ``apply_chat_template``
sets it up (trim_blocks, lstrip_blocks, ``raise_exception``, ``tojson``), so the token ids equal
the ones SGLang computes (verified against a live instance in tests/integration/test_router.py).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path


class TokenizerError(ValueError):
    """The tokenizer folder is missing, unreadable, or a chat request cannot be rendered."""


def _special(config: dict, key: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):  # AddedToken serialisation
        value = value.get("content")
    return value or ""


class PromptTokenizer:
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        folder = Path(path)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {str(folder)!r}; --tokenizer-path must be a local Hugging "
                "Face model or tokenizer folder with a fast tokenizer")
        self.path = str(folder)
        self._tok = Tokenizer.from_file(str(file))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        self._specials = {k: _special(config, k) for k in ("bos_token", "eos_token",
                                                          "unk_token", "pad_token")}
        self._template = self._compile(template) if template else None

    @staticmethod
    def _compile(source: str):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(source)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt, special tokens added as SGLang's ``tokenizer.encode``.

        ``encode_batch_fast`` gives the same ids as ``encode`` without computing character
        offsets, which the router never reads: ≈ 25 % less time on long prompts here (an
        8000-character prompt: 3.9 ms instead of 5.3 ms)."""
        return self._tok.encode_batch_fast([text], add_special_tokens=True)[0].ids

    def render_chat(self, messages: list, **template_kwargs) -> str:
        """The chat prompt as text (generation prompt added), as SGLang renders it."""
        if self._template is None:
            raise TokenizerError(f"the tokenizer in {self.path!r} has no chat template")
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         **self._specials, **template_kwargs)
        except TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None

    def encode_chat(self, messages: list, **template_kwargs) -> tuple[str, list[int]]:
        text = self.render_chat(messages, **template_kwargs)
        return text, self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids
