"""Grouped down-projection GEMM: the unweighted expert output rows y = h W_down^T (+ bias), per routed pair.

One program computes a (BLOCK_M, BLOCK_N) tile of y for one block of expert-sorted rows (see
``align.py``): it reads the block's rows of the intermediate written by ``gate_up.py`` (row = pair id),
multiplies by the block's expert ``down_proj`` and stores the tile, in the input dtype, at the pair's
row of y (S, H). The rows are NOT multiplied by the routing weight: REAP's statistics need the
unweighted y, and ``combine.py`` applies the weights when it sums a token's k rows.

Layouts: ``down_proj`` (E, H, I) (not transposed) or (E, I, H) (transposed, gpt-oss, with
``down_proj_bias`` (E, H)). The result is rounded to the input dtype, and again after the bias, as
``F.linear(...) + bias`` does in the PyTorch path.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .sizes import cdiv
from .tiles import accumulate_k, grouped_tile

from .gate_up import dot_precision


@triton.jit
def _down_proj_kernel(
    h_ptr,  # (S, I) fp16/bf16/fp32: activated intermediate, row = pair id
    w_ptr,  # (E, H, I) or, transposed, (E, I, H); same dtype as h: down_proj
    b_ptr,  # (E, H) same dtype as h: down_proj_bias (read only when HAS_BIAS)
    y_ptr,  # (S, H) same dtype as h, from y_ptr + y_offset: unweighted expert output rows, row = pair id
    sorted_pair_ids_ptr,  # int32 Alignment buffer: padded pair ids (S = padding), then block_expert (E = empty)
    y_offset,  # elements from y_ptr to y[0, 0] (y and h share one workspace)
    num_pairs,  # S
    num_experts,
    inter_size,  # I (reduction length)
    hidden_size,  # H (output columns)
    max_blocks,
    stride_hs,
    stride_hi,
    stride_we,
    stride_wn,  # stride along H (output columns)
    stride_wk,  # stride along I
    stride_be,
    stride_bn,
    stride_ys,
    stride_yh,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,  # I % BLOCK_K == 0: no K masks
    EVEN_N: tl.constexpr,  # H % BLOCK_N == 0: no column masks
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), max_blocks, hidden_size, BLOCK_N, GROUP_M)

    expert = tl.load(sorted_pair_ids_ptr + max_blocks * BLOCK_M + pid_m)  # block_expert
    if expert >= num_experts:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden_size
    offs_k = tl.arange(0, BLOCK_K)

    # padding rows read row 0 (loaded, never stored): no row masks
    h_ptrs = h_ptr + tl.where(row_ok, pair64, 0)[:, None] * stride_hs + offs_k[None, :] * stride_hi
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_k(h_ptrs, w_ptrs, acc, inter_size, col_ok, stride_hi, stride_wk, UPCAST, EVEN_K, EVEN_N,
                       DOT_PRECISION, BLOCK_K)

    io_dtype = y_ptr.dtype.element_ty
    y = acc.to(io_dtype)
    if HAS_BIAS:
        bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + offs_n * stride_bn, mask=col_ok, other=0.0)
        y = (y.to(tl.float32) + bias.to(tl.float32)[None, :]).to(io_dtype)
    y_ptrs = y_ptr + y_offset + pair64[:, None] * stride_ys + offs_n[None, :] * stride_yh
    tl.store(y_ptrs, y, mask=row_ok[:, None] & col_ok[None, :])


@lru_cache(maxsize=None)
def down_launch(has_bias: bool, dtype: torch.dtype, upcast: bool, gemm, sizes: tuple[int, int, int, int]):
    """(grid, constexprs in the kernel's parameter order, launch options) of the kernel for ``sizes`` (block_m,
    max_blocks, H, I): built once per call signature (``fused_moe`` keeps it in the call's plan)."""
    block_m, max_blocks, hidden_size, inter_size = sizes
    constexprs = (has_bias, upcast, inter_size % gemm.block_k == 0, hidden_size % gemm.block_n == 0,
                  dot_precision(dtype, upcast), *gemm.tile(block_m))
    return (max_blocks * cdiv(hidden_size, gemm.block_n),), constexprs, gemm.options()


def down_projection(
    workspace: torch.Tensor,  # 1-D, input dtype: h (S, I) at [0, S * I); y (S, H) is written after it
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alignment,  # reap_kernels.align.Alignment
    transposed: bool,
    launch: tuple,  # down_launch(...)
) -> None:
    """Launch the grouped down projection: y (S, H) rows (= pair ids) into ``workspace`` from S * I on."""
    hidden_size, inter_size = (weight.shape[2], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[2])
    num_pairs = alignment.num_pairs
    stride_we, stride_1, stride_2 = weight.stride()
    stride_wn, stride_wk = (stride_2, stride_1) if transposed else (stride_1, stride_2)
    stride_be, stride_bn = bias.stride() if bias is not None else (0, 0)
    grid, constexprs, options = launch
    _down_proj_kernel[grid](
        workspace, weight, bias if bias is not None else weight, workspace, alignment.buffer, num_pairs * inter_size,
        num_pairs, weight.shape[0], inter_size, hidden_size, alignment.max_blocks,
        inter_size, 1, stride_we, stride_wn, stride_wk, stride_be, stride_bn, hidden_size, 1, *constexprs, **options,
    )
