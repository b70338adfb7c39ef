"""The emulated test bed's extend attention equals SGLang's CPU extend attention."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from block_sgl.hooks.cpu_extend import extend_new_rows_only

torch_native = pytest.importorskip("sglang.srt.layers.attention.torch_native_backend")
ORIGINAL = torch_native.TorchNativeAttnBackend._run_sdpa_forward_extend


def make_batch(seed, requests, heads, kv_heads, head_size=8):
    """requests: [(prefix_len, new_len)]; a KV pool holding every request's tokens, shuffled."""
    g = torch.Generator().manual_seed(seed)
    total_kv = sum(p + n for p, n in requests)
    k_cache = torch.randn(total_kv + 3, kv_heads, head_size, generator=g)
    v_cache = torch.randn(total_kv + 3, kv_heads, head_size, generator=g)
    slots = torch.randperm(total_kv + 3, generator=g)[:total_kv]
    max_len = max(p + n for p, n in requests)
    req_to_token = torch.zeros(len(requests) + 2, max_len, dtype=torch.int64)
    rows = torch.randperm(len(requests) + 2, generator=g)[:len(requests)]
    at = 0
    for row, (p, n) in zip(rows.tolist(), requests):
        req_to_token[row, :p + n] = slots[at:at + p + n]
        at += p + n
    new_tokens = sum(n for _, n in requests)
    query = torch.randn(new_tokens, heads, head_size, generator=g)
    lens = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token,
                req_pool_indices=rows, seq_lens=lens([p + n for p, n in requests]),
                extend_prefix_lens=lens([p for p, _ in requests]),
                extend_seq_lens=lens([n for _, n in requests]))


def run(fn, batch, **kw):
    output = torch.full_like(batch["query"], float("nan"))
    args = (batch["query"], output, batch["k_cache"], batch["v_cache"], batch["req_to_token"],
            batch["req_pool_indices"], batch["seq_lens"], batch["extend_prefix_lens"],
            batch["extend_seq_lens"], None)
    return fn(*args, **kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000),
       requests=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12)), min_size=1, max_size=4),
       gqa=st.booleans())
def test_equals_sglangs_extend_attention(seed, requests, gqa):
    batch = make_batch(seed, requests, heads=4, kv_heads=2 if gqa else 4)
    kw = dict(scaling=0.3, enable_gqa=gqa, causal=True)
    expected = run(lambda *a, **k: ORIGINAL(None, *a, **k), batch, **kw)
    got = run(lambda *a, **k: extend_new_rows_only(ORIGINAL, None, *a, **k), batch, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cases_it_does_not_cover_go_to_sglangs_function():
    batch = make_batch(0, [(5, 3)], heads=2, kv_heads=2)
    calls = []

    def original(*args, **kwargs):
        calls.append(kwargs)
        return "original"

    for kw in (dict(causal=False), dict(causal=True, is_cross_attn=True),
               dict(causal=True, sliding_window_size=4)):
        assert run(lambda *a, **k: extend_new_rows_only(original, None, *a, **k), batch, **kw) \
            == "original"
    assert len(calls) == 3
    assert run(lambda *a, **k: extend_new_rows_only(original, None, *a, **k), batch,
               causal=True, sliding_window_size=-1) is not None
    assert len(calls) == 3  # -1 = no sliding window: the fast path
