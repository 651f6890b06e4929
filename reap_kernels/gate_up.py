"""Grouped gate_up GEMM with the gated activation fused: h = act(x W_gate^T) * (x W_up^T), per routed pair.

One program computes a (BLOCK_M, BLOCK_N) tile of the activated intermediate for one block of
expert-sorted rows (see ``align.py``): it gathers the block's token rows of ``hidden_states``,
multiplies them by the gate and the up columns of that block's expert (two fp32 accumulators),
applies the activation in fp32 and stores the tile, in the input dtype, at the rows of the pairs
(row = t * k + slot), so the down projection and the combine step can address pairs directly.

Layouts (``transformers.integrations.moe`` flags):

    concatenated, not transposed  gate_up_proj (E, 2I, H): gate = rows [0, I), up = rows [I, 2I)
                                  (Qwen3-MoE, Mixtral, DeepSeek-V3, GLM-4-MoE, OLMoE, ...)
    interleaved, transposed       gate_up_proj (E, H, 2I): gate = columns 0, 2, 4..., up = 1, 3, 5...
                                  plus gate_up_proj_bias (E, 2I) (gpt-oss)

Activations (``ACTIVATION`` constexpr):

    0 "silu"            h = silu(gate) * up                          (transformers' default _apply_gate)
    1 "gpt_oss_swiglu"  g = min(gate, limit); u = clamp(up, -limit, limit)
                        h = (u + 1) * g * sigmoid(alpha * g)          (GptOssExperts._apply_gate)

Rounding follows the PyTorch path: the GEMM result (and the result after the bias) is rounded to the
input dtype before the activation, as ``F.linear`` returns it, and every elementwise step of the
activation is rounded where PyTorch rounds it (silu(gate) before the product; each op of the gpt-oss
swiglu). For fp32 inputs every rounding is a no-op.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .sizes import cdiv
from .tiles import accumulate_k, grouped_tile

ACTIVATIONS = {"silu": 0, "gpt_oss_swiglu": 1}


def dot_precision(dtype: torch.dtype, upcast: bool) -> str:
    """tl.dot input precision: IEEE for fp32 operands (matches torch's default, which disables TF32)."""
    return "ieee" if dtype == torch.float32 or upcast else "tf32"  # ignored for fp16/bf16 operands


@triton.jit
def _gate_up_kernel(
    x_ptr,  # (T, H) fp16/bf16/fp32: hidden states
    w_ptr,  # (E, 2I, H) or, transposed, (E, H, 2I); same dtype as x: gate_up_proj
    b_ptr,  # (E, 2I) same dtype as x: gate_up_proj_bias (read only when HAS_BIAS)
    out_ptr,  # (S, I) same dtype as x: activated intermediate, row = pair id t*k+slot
    sorted_pair_ids_ptr,  # int32 Alignment buffer: padded pair ids (S = padding), then block_expert (E = empty)
    num_pairs,  # S = T * k
    top_k,
    num_experts,
    hidden_size,  # H (reduction length)
    inter_size,  # I (output columns)
    max_blocks,
    alpha,  # fp32 scalar (gpt-oss swiglu only)
    limit,  # fp32 scalar (gpt-oss swiglu only)
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,  # stride between output columns (gate/up index) of one expert's weight
    stride_wk,  # stride along H
    stride_be,
    stride_bn,
    stride_os,
    stride_oi,
    ACTIVATION: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,  # convert tiles to fp32 before tl.dot (interpreter, fp32 inputs)
    EVEN_K: tl.constexpr,  # H % BLOCK_K == 0: no K masks
    EVEN_N: tl.constexpr,  # I % BLOCK_N == 0: no column masks
    DOT_PRECISION: tl.constexpr,  # "ieee" keeps fp32 GEMMs exact (no tf32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), max_blocks, inter_size, BLOCK_N, GROUP_M)

    expert = tl.load(sorted_pair_ids_ptr + max_blocks * BLOCK_M + pid_m)  # block_expert
    if expert >= num_experts:  # block past the last expert's padded segment
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m)
    row_ok = pair < num_pairs
    token = tl.where(row_ok, pair // top_k, 0).to(tl.int64)  # padding rows read token 0, never stored

    # one [BLOCK_K, 2 * BLOCK_N] weight tile per step: column 2j is gate column n_j, 2j + 1 up column n_j, so
    # a single load and a single dot cover both, and the accumulator splits into gate and up in registers
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter_size
    pair_n = pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N) // 2
    is_up = tl.arange(0, 2 * BLOCK_N) % 2
    if INTERLEAVED:  # the tile is 2 * BLOCK_N contiguous columns (written so the compiler sees it)
        w_col = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    else:
        w_col = pair_n + is_up * inter_size
    w_col_ok = pair_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)

    w_base = w_ptr + expert.to(tl.int64) * stride_we
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_ptrs = w_base + offs_k[:, None] * stride_wk + w_col[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    acc = accumulate_k(x_ptrs, w_ptrs, acc, hidden_size, w_col_ok, stride_xh, stride_wk, UPCAST, EVEN_K, EVEN_N,
                       DOT_PRECISION, BLOCK_K)
    acc_gate, acc_up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))

    io_dtype = out_ptr.dtype.element_ty
    gate = acc_gate.to(io_dtype).to(tl.float32)  # F.linear's output is in the input dtype
    up = acc_up.to(io_dtype).to(tl.float32)
    if HAS_BIAS:
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        gate_col = 2 * offs_n if INTERLEAVED else offs_n
        up_col = gate_col + 1 if INTERLEAVED else offs_n + inter_size
        gate_bias = tl.load(b_base + gate_col * stride_bn, mask=col_ok, other=0.0).to(tl.float32)
        up_bias = tl.load(b_base + up_col * stride_bn, mask=col_ok, other=0.0).to(tl.float32)
        gate = (gate + gate_bias[None, :]).to(io_dtype).to(tl.float32)
        up = (up + up_bias[None, :]).to(io_dtype).to(tl.float32)

    if ACTIVATION == 0:
        act = (gate * tl.sigmoid(gate)).to(io_dtype).to(tl.float32)
        h = act * up
    else:
        # every elementwise op of GptOssExperts._apply_gate rounds to the input dtype in PyTorch
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        scaled = (gate * alpha).to(io_dtype).to(tl.float32)
        sig = tl.sigmoid(scaled).to(io_dtype).to(tl.float32)
        glu = (gate * sig).to(io_dtype).to(tl.float32)
        h = (up + 1.0).to(io_dtype).to(tl.float32) * glu

    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_os + offs_n[None, :] * stride_oi
    tl.store(out_ptrs, h.to(io_dtype), mask=row_ok[:, None] & col_ok[None, :])


@lru_cache(maxsize=None)
def gate_up_launch(layout, has_bias: bool, dtype: torch.dtype, upcast: bool, gemm, sizes: tuple[int, int, int, int]):
    """(grid, constexprs in the kernel's parameter order, launch options) of the kernel for ``sizes`` (block_m,
    max_blocks, H, I): built once per call signature (``fused_moe`` keeps it in the call's plan), so a call
    only reads strides and launches (constexprs passed by position: no keyword binding per call)."""
    block_m, max_blocks, hidden_size, inter_size = sizes
    constexprs = (ACTIVATIONS[layout.activation], layout.interleaved, has_bias, upcast, hidden_size % gemm.block_k == 0,
                  inter_size % gemm.block_n == 0, dot_precision(dtype, upcast), *gemm.tile(block_m))
    return (max_blocks * cdiv(inter_size, gemm.block_n),), constexprs, gemm.options()


def gate_up_activation(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alignment,  # reap_kernels.align.Alignment
    workspace: torch.Tensor,  # 1-D, input dtype: h is written at [0, S * I) as (S, I) rows
    layout,  # reap_kernels.moe.ExpertsLayout
    launch: tuple,  # gate_up_launch(...)
) -> None:
    """Launch the fused gate_up + activation kernel: the (S, I) intermediate h into ``workspace``.

    Inputs are validated by ``reap_kernels.moe.fused_moe``; this launcher only derives strides.
    """
    transposed = layout.transposed
    hidden_size = hidden_states.shape[1]
    inter_size = (weight.shape[2] if transposed else weight.shape[1]) // 2
    stride_we, stride_1, stride_2 = weight.stride()
    stride_wn, stride_wk = (stride_2, stride_1) if transposed else (stride_1, stride_2)
    stride_be, stride_bn = bias.stride() if bias is not None else (0, 0)
    grid, constexprs, options = launch
    _gate_up_kernel[grid](
        hidden_states, weight, bias if bias is not None else weight, workspace, alignment.buffer,
        alignment.num_pairs, alignment.num_pairs // hidden_states.shape[0], weight.shape[0], hidden_size, inter_size,
        alignment.max_blocks, layout.alpha, layout.limit,
        *hidden_states.stride(), stride_we, stride_wn, stride_wk, stride_be, stride_bn,
        inter_size, 1, *constexprs, **options,
    )
