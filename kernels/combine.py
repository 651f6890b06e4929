"""Combine + REAP statistics: one program per token sums its k weighted expert rows and, optionally,
accumulates the per-expert REAP statistics of those rows.

For token t the program reads the k unweighted rows y[t*k + slot] (written by ``down_proj.py``) in
chunks of BLOCK_H columns and

* writes ``out[t] = sum_slot round_p(y[t, slot] * w[t, slot])`` accumulated in fp32 and cast to the
  output dtype once, where ``round_p`` rounds to the product dtype of PyTorch's ``y * w`` (the input
  dtype when the routing weights are 16-bit too, fp32 when they are fp32). This reproduces
  transformers' ``(y * w).view(T, k, H).sum(1).to(dtype)`` up to the summation order;
* when ``STATS`` (constexpr) is set and the token's mask is True, keeps per slot the fp32 sum of
  squares and the maximum of y over all H columns, then adds, with fp32 atomics into per-expert
  buffers indexed by e = top_k_index[t, slot]:
  ``count[e] += 1`` (int32), ``ean[e] += ||y||``, ``weighted_ean[e] += g * ||y||``,
  ``gate_sum[e] += g``, and ``max[e] = max(max[e], max_j y_j)`` (atomic_max; buffer starts at -inf).

With ``STATS`` off the kernel is the plain MoE combine (no statistics code is compiled).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _combine_kernel(
    y_ptr,  # (T*k, H) fp16/bf16/fp32: unweighted expert rows, row = t*k + slot
    w_ptr,  # (T, k) float (any): routing weights top_k_weights
    out_ptr,  # (T, H) dtype of hidden_states: layer output
    idx_ptr,  # (T, k) int32: expert of each slot (read only when STATS)
    gates_ptr,  # (T, k) fp32: REAP gate g of each slot (read only when STATS)
    mask_ptr,  # (T,) uint8: 1 = token counted in the statistics (read only when STATS and HAS_MASK)
    count_ptr,  # (E,) int32: routed, counted pairs per expert (zero-initialised)
    ean_ptr,  # (E,) fp32: sum ||y|| (zero-initialised)
    weighted_ean_ptr,  # (E,) fp32: sum g * ||y|| (zero-initialised)
    gate_sum_ptr,  # (E,) fp32: sum g (zero-initialised)
    max_ptr,  # (E,) fp32: max_j y_j over the expert's rows (-inf-initialised)
    hidden_size,
    top_k,
    stride_ys,
    stride_yh,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_oh,
    stride_it,
    stride_ik,
    stride_gt,
    stride_gk,
    PROD_DTYPE: tl.constexpr,  # dtype of PyTorch's y * w product
    STATS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    K_PAD: tl.constexpr,  # next power of two >= k
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, K_PAD)
    slot_ok = slots < top_k
    weight = tl.load(w_ptr + token * stride_wt + slots * stride_wk, mask=slot_ok, other=0.0).to(tl.float32)
    rows = token * top_k + slots

    sum_sq = tl.zeros((K_PAD,), dtype=tl.float32)
    row_max = tl.full((K_PAD,), float("-inf"), dtype=tl.float32)
    for h_start in range(0, hidden_size, BLOCK_H):
        offs_h = h_start + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hidden_size
        tile_ok = slot_ok[:, None] & h_ok[None, :]
        y = tl.load(y_ptr + rows[:, None] * stride_ys + offs_h[None, :] * stride_yh, mask=tile_ok, other=0.0)
        y = y.to(tl.float32)
        product = (y * weight[:, None]).to(PROD_DTYPE).to(tl.float32)
        acc = tl.sum(product, axis=0)
        tl.store(out_ptr + token * stride_ot + offs_h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=h_ok)
        if STATS:
            sum_sq += tl.sum(y * y, axis=1)
            row_max = tl.maximum(row_max, tl.max(tl.where(tile_ok, y, float("-inf")), axis=1))

    if STATS:
        counted = slot_ok
        if HAS_MASK:
            # a (K_PAD,) load of the one mask byte: the interpreter mishandles scalar & vector masks
            counted = counted & (tl.load(mask_ptr + token + slots * 0) != 0)
        expert = tl.load(idx_ptr + token * stride_it + slots * stride_ik, mask=slot_ok, other=0)
        gate = tl.load(gates_ptr + token * stride_gt + slots * stride_gk, mask=slot_ok, other=0.0).to(tl.float32)
        norm = tl.sqrt(sum_sq)
        tl.atomic_add(count_ptr + expert, tl.full((K_PAD,), 1, dtype=tl.int32), mask=counted)
        tl.atomic_add(ean_ptr + expert, norm, mask=counted)
        tl.atomic_add(weighted_ean_ptr + expert, gate * norm, mask=counted)
        tl.atomic_add(gate_sum_ptr + expert, gate, mask=counted)
        tl.atomic_max(max_ptr + expert, row_max, mask=counted)


def combine(
    y: torch.Tensor,
    top_k_weights: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    stats: dict[str, torch.Tensor] | None = None,
    top_k_index: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    block_h: int,
    num_warps: int,
) -> torch.Tensor:
    """Weighted sum of each token's k rows of ``y`` (T*k, H) -> (T, H) in ``out_dtype``.

    When ``stats`` is given (buffers count int32, ean/weighted_ean/gate_sum fp32 zeros, max fp32
    -inf, each (E,)), the statistics of the counted tokens are accumulated into it; then
    ``top_k_index`` (T, k) int32 and ``gates`` (T, k) fp32 are required and ``token_mask`` (T,) uint8
    is optional. Inputs are validated by ``reap_kernels.moe.fused_moe``.
    """
    num_tokens, top_k = top_k_weights.shape
    hidden_size = y.shape[1]
    out = torch.empty(num_tokens, hidden_size, dtype=out_dtype, device=y.device)
    if num_tokens == 0:
        return out
    prod_dtype = torch.promote_types(y.dtype, top_k_weights.dtype)
    if prod_dtype not in _TL_DTYPES:
        raise ValueError(f"routing weights of dtype {top_k_weights.dtype} are not supported")
    with_stats = stats is not None
    if with_stats:
        idx, g = top_k_index, gates
        mask = token_mask if token_mask is not None else idx
        buffers = (stats["count"], stats["ean_sum"], stats["weighted_ean_sum"], stats["gate_sum"], stats["max_activation"])
    else:
        idx, g, mask = top_k_weights, top_k_weights, top_k_weights  # never read
        buffers = (out, out, out, out, out)
    k_pad = triton.next_power_of_2(top_k)
    block_h = min(block_h, triton.next_power_of_2(hidden_size))
    _combine_kernel[(num_tokens,)](
        y,
        top_k_weights,
        out,
        idx,
        g,
        mask,
        *buffers,
        hidden_size,
        top_k,
        stride_ys=y.stride(0),
        stride_yh=y.stride(1),
        stride_wt=top_k_weights.stride(0),
        stride_wk=top_k_weights.stride(1),
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        stride_it=idx.stride(0),
        stride_ik=idx.stride(1) if idx.dim() == 2 else 0,
        stride_gt=g.stride(0),
        stride_gk=g.stride(1) if g.dim() == 2 else 0,
        PROD_DTYPE=_TL_DTYPES[prod_dtype],
        STATS=with_stats,
        HAS_MASK=with_stats and token_mask is not None,
        K_PAD=k_pad,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out
