"""Prefix-skipping extend attention for emulated CPU test beds.

SGLang 0.5.23's CPU attention (``TorchNativeAttnBackend._run_sdpa_forward_extend`` in
``sglang/srt/layers/attention/torch_native_backend.py``) computes, for every request of an
extend batch, causal attention over the *whole* sequence — queries for the cached prefix too —
and then keeps the rows of the new tokens. So on the CPU a request whose 2048-token prefix is
cached costs as much attention as one that prefills all 2176 tokens (≈ 50 ms on the 2-core test
bed for 128 new tokens, against ≈ 7 ms × time scale on the emulated H100), and an emulated
instance's prefix-cached prefills became CPU-bound: the emulated GPU time was no longer what
set the pace.

``extend_new_rows_only`` computes just the new tokens' rows: each attends to the whole cached
prefix and causally to the new tokens before it (a bottom-right-aligned causal mask), which is
what the original keeps of its redundant result. Same outputs up to float rounding (tested
against SGLang's function on random batches); the cases it does not cover (cross-attention,
encoder lengths, sliding windows, non-causal) go to SGLang's original. It is installed only
with GPU-speed emulation (``BLOCK_SGL_EMULATE``), whose step times must stay above the CPU's.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

TORCH_NATIVE_EXTEND = ("sglang.srt.layers.attention.torch_native_backend."
                       "TorchNativeAttnBackend._run_sdpa_forward_extend")


def extend_new_rows_only(original, backend, query, output, k_cache, v_cache, req_to_token,
                         req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                         encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
                         is_cross_attn=False, sliding_window_size=None):
    """AROUND hook with SGLang's signature of ``_run_sdpa_forward_extend``."""
    if (encoder_lens is not None or is_cross_attn or not causal
            or (sliding_window_size is not None and sliding_window_size > -1)):
        return original(backend, query, output, k_cache, v_cache, req_to_token,
                        req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
                        encoder_lens, scaling=scaling, enable_gqa=enable_gqa, causal=causal,
                        is_cross_attn=is_cross_attn, sliding_window_size=sliding_window_size)
    query = query.movedim(0, query.dim() - 2)  # [heads, tokens, head_size]
    prefix_lens = extend_prefix_lens.tolist()
    new_lens = extend_seq_lens.tolist()
    kv_lens = seq_lens.tolist()
    pool_rows = req_pool_indices.tolist()
    start_q = 0
    for prefix, new, kv_len, row in zip(prefix_lens, new_lens, kv_lens, pool_rows):
        end_q = start_q + new
        q = query[:, start_q:end_q, :]
        tokens = req_to_token[row, :kv_len]
        k = k_cache[tokens].movedim(0, query.dim() - 2)
        v = v_cache[tokens].movedim(0, query.dim() - 2)
        if not (q.dtype == k.dtype == v.dtype):
            k, v = k.to(q.dtype), v.to(q.dtype)
        if prefix == 0:
            mask, is_causal = None, True
        else:
            # new token i (position prefix + i) sees key positions 0 .. prefix + i
            mask = (torch.arange(kv_len, device=q.device)[None, :]
                    <= torch.arange(prefix, prefix + new, device=q.device)[:, None])
            is_causal = False
        out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           attn_mask=mask, enable_gqa=enable_gqa,
                                           scale=scaling, is_causal=is_causal)
        output[start_q:end_q, :, :] = out.squeeze(0).movedim(query.dim() - 2, 0)
        start_q = end_q
    return output


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TORCH_NATIVE_EXTEND, extend_new_rows_only, HookType.AROUND)
