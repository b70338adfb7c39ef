"""The CPU sgl_kernel shim against direct reference implementations."""

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SHIM_DIR = Path(__file__).resolve().parents[2] / "block_sgl" / "testing" / "cpu_shim"


@pytest.fixture(scope="module")
def shim():
    spec = importlib.util.spec_from_file_location("block_sgl_test_shim", SHIM_DIR / "sgl_kernel" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_assign(req_pool_indices, req_to_token, start, end, out_cache_loc):
    expected = req_to_token.clone()
    offset = 0
    for i in range(len(req_pool_indices)):
        for j in range(int(end[i] - start[i])):
            expected[int(req_pool_indices[i]), int(start[i]) + j] = out_cache_loc[offset + j]
        offset += int(end[i] - start[i])
    return expected


@pytest.mark.parametrize("seed", range(5))
def test_assign_req_to_token_pool_matches_reference(shim, seed):
    g = torch.Generator().manual_seed(seed)
    rows, pool_len, bs = 8, 64, 4
    req_to_token = torch.randint(0, 1000, (rows, pool_len), generator=g, dtype=torch.int32)
    req_pool_indices = torch.randperm(rows, generator=g)[:bs]
    start = torch.randint(0, 32, (bs,), generator=g)
    end = start + torch.randint(0, 32, (bs,), generator=g)
    out_cache_loc = torch.randint(0, 10_000, (int((end - start).sum()),), generator=g)
    expected = reference_assign(req_pool_indices, req_to_token, start, end, out_cache_loc)
    shim.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, pool_len)
    assert torch.equal(req_to_token, expected)


def test_assign_rejects_wrong_pool_len(shim):
    t = torch.zeros((2, 8), dtype=torch.int32)
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="pool_len"):
        shim.assign_req_to_token_pool_cpu(one, t, one, one + 1, one, 9)


@pytest.mark.parametrize("overlap", [False, True])
def test_copy_all_layer_kv_cache_matches_reference(shim, overlap):
    g = torch.Generator().manual_seed(1)
    buffers = [torch.randn(32, 4, 8, generator=g), torch.randn(32, 2, 8, generator=g).to(torch.bfloat16)]
    originals = [b.clone() for b in buffers]
    if overlap:  # targets and sources intersect: all reads happen before writes
        src, tgt = torch.tensor([3, 4, 5, 6]), torch.tensor([4, 5, 6, 7])
    else:
        src, tgt = torch.tensor([1, 9, 30]), torch.tensor([2, 0, 31])
    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers], dtype=torch.int64)
    shim.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)
    for buf, orig in zip(buffers, originals):
        expected = orig.clone()
        expected[tgt] = orig[src]
        assert torch.equal(buf, expected)


def test_other_ops_fail_loudly_only_when_called(shim):
    op = shim.some_other_kernel  # importable: SGLang imports many ops it never calls here
    with pytest.raises(NotImplementedError, match="some_other_kernel"):
        op()


def test_shim_never_shadows_a_real_sgl_kernel():
    """If sgl_kernel resolves to the shim, no other sgl_kernel may exist on sys.path."""
    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or not str(spec.origin).startswith(str(SHIM_DIR)):
        pytest.skip("the shim is not installed in this environment")
    others = [p for p in sys.path if p and not p.startswith(str(SHIM_DIR))
              and (Path(p) / "sgl_kernel").is_dir()]
    assert others == []
