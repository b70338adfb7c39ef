"""Pure-PyTorch stand-ins for the two sgl_kernel CPU ops SGLang's CPU KV pool calls.

Only for CPU test beds (see ../README.md). Anything else raises NotImplementedError.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

__version__ = "0.0.0+block_sgl_cpu_shim"
IS_BLOCK_SGL_CPU_SHIM = True


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Write each request's new KV slot indices into its row of ``req_to_token``.

    Same contract as the Triton kernel ``assign_req_to_token_pool`` in
    sglang/srt/mem_cache/allocation.py: request ``i`` gets
    ``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[o_i : o_i + end[i] - start[i]]``
    where ``o_i`` is the total length of the requests before it.
    """
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} != req_to_token row length {req_to_token.shape[1]}")
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """Copy rows ``src_loc`` to rows ``tgt_loc`` in every buffer whose base address is in
    ``data_ptrs`` (row size in bytes in ``strides``).

    Same contract as ``copy_all_layer_kv_cache_tiled`` in
    sglang/kernels/ops/kvcache/cache_move.py: all source rows are read before any target row is
    written, so overlapping moves are safe.
    """
    src = src_loc.to(torch.int64).numpy()
    tgt = tgt_loc.to(torch.int64).numpy()
    if src.shape != tgt.shape:
        raise ValueError(f"src_loc has {src.size} rows but tgt_loc has {tgt.size}")
    if src.size == 0:
        return
    rows = int(max(src.max(), tgt.max())) + 1
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        buf = (ctypes.c_uint8 * (rows * int(stride))).from_address(int(base))
        view = np.frombuffer(buf, dtype=np.uint8).reshape(rows, int(stride))
        view[tgt] = view[src]  # fancy-index gather copies first: in-place safe


def __getattr__(name: str):
    # SGLang imports many CPU ops at module import time (``from sgl_kernel import x``) on paths
    # the test bed never runs; hand out a stub that fails loudly only if it is called.
    if name.startswith("__"):
        raise AttributeError(name)

    def missing_op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not provided by block_sgl's CPU test-bed shim "
            "(only assign_req_to_token_pool_cpu and copy_all_layer_kv_cache_cpu are); "
            "install a real sgl_kernel for this code path")

    missing_op.__name__ = name
    return missing_op
