"""Combine: one program per token sums its k weighted expert rows and, optionally, measures each row.

For token t the program reads the k unweighted rows y[t*k + slot] (written by ``down_proj.py``) in
chunks of BLOCK_H columns and

* writes ``out[t] = sum_slot round_p(y[t, slot] * w[t, slot])`` accumulated in fp32 and cast to the
  output dtype once, where ``round_p`` rounds to the product dtype of PyTorch's ``y * w`` (the input
  dtype when the routing weights are 16-bit too, fp32 when they are fp32). This reproduces
  transformers' ``(y * w).view(T, k, H).sum(1).to(dtype)`` up to the summation order;
* when ``STATS`` (constexpr) is set, keeps per slot the fp32 sum of squares and the maximum of y over
  all H columns and stores ``pair_norm[t*k + slot] = ||y||`` and ``pair_max[t*k + slot] = max_j y_j``.
  ``expert_stats.py`` reduces these per expert. A row holding a NaN has the maximum NaN, as
  ``torch.amax`` gives (``tl.max`` alone would drop it).

With ``GATE_FROM_LOGITS`` (``router_gate.py``) the program also computes the REAP gate of each of the
token's pairs from the router logits and stores it (``gates``, (T*k,) fp32) for ``expert_stats.py``.

With ``STATS`` off the kernel is the plain MoE combine (no statistics code is compiled).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .sizes import next_power_of_2

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _combine_kernel(
    y_ptr,  # (T*k, H) fp16/bf16/fp32 from y_ptr + y_offset: unweighted expert rows, row = t*k + slot
    w_ptr,  # (T, k) float (any): routing weights top_k_weights
    out_ptr,  # (T, H) dtype of hidden_states: layer output
    pairs_ptr,  # (3, T*k) fp32 out from pairs_ptr + pairs_offset (any pointer type, its bits are fp32): ||y||,
    # max_j y_j (when STATS) and g (when GATE_FROM_LOGITS) of each row
    logits_ptr,  # (T, E) float: router logits (read only when GATE_FROM_LOGITS)
    index_ptr,  # (T, k) integer: top_k_index (read only when GATE_FROM_LOGITS)
    y_offset,
    pairs_offset,
    hidden_size,
    top_k,
    num_experts,
    stride_ys,
    stride_yh,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_le,
    stride_it,
    stride_ik,
    PROD_DTYPE: tl.constexpr,  # dtype of PyTorch's y * w product
    STATS: tl.constexpr,
    GATE_FROM_LOGITS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    K_PAD: tl.constexpr,  # next power of two >= k
    E_PAD: tl.constexpr,  # next power of two >= E
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pairs_ptr = (pairs_ptr + pairs_offset).to(tl.pointer_type(tl.float32), bitcast=True)
    slots = tl.arange(0, K_PAD)
    slot_ok = slots < top_k
    weight = tl.load(w_ptr + token * stride_wt + slots * stride_wk, mask=slot_ok, other=0.0).to(tl.float32)
    rows = token * top_k + slots
    num_pairs = tl.num_programs(0) * top_k
    if GATE_FROM_LOGITS:  # router_gate.py: softmax over E in fp32, gathered at the token's experts
        experts = tl.arange(0, E_PAD)
        logit_row = tl.load(logits_ptr + token * stride_lt + experts * stride_le, mask=experts < num_experts,
                            other=float("-inf")).to(tl.float32)
        row_max = tl.max(logit_row, axis=0)
        denominator = tl.sum(tl.exp(logit_row - row_max), axis=0)
        chosen = tl.load(index_ptr + token * stride_it + slots * stride_ik, mask=slot_ok, other=0).to(tl.int64)
        picked = tl.load(logits_ptr + token * stride_lt + chosen * stride_le, mask=slot_ok, other=float("-inf"))
        gate = tl.exp(picked.to(tl.float32) - row_max) / denominator
        if RENORMALIZE:
            gate = tl.maximum(gate / tl.sum(gate, axis=0), 1.1920928955078125e-07)  # clamp(min=fp32 eps)
        tl.store(pairs_ptr + 2 * num_pairs + rows, gate, mask=slot_ok)

    sum_sq = tl.zeros((K_PAD,), dtype=tl.float32)
    row_max = tl.full((K_PAD,), float("-inf"), dtype=tl.float32)
    row_nan = tl.zeros((K_PAD,), dtype=tl.int32)  # tl.max drops NaN; torch's amax returns it
    for h_start in range(0, hidden_size, BLOCK_H):
        offs_h = h_start + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hidden_size
        tile_ok = slot_ok[:, None] & h_ok[None, :]
        y = tl.load(y_ptr + y_offset + rows[:, None] * stride_ys + offs_h[None, :] * stride_yh, mask=tile_ok, other=0.0)
        y = y.to(tl.float32)
        product = (y * weight[:, None]).to(PROD_DTYPE).to(tl.float32)
        acc = tl.sum(product, axis=0)
        tl.store(out_ptr + token * stride_ot + offs_h * stride_oh, acc.to(out_ptr.dtype.element_ty), mask=h_ok)
        if STATS:
            sum_sq += tl.sum(y * y, axis=1)
            row_max = tl.maximum(row_max, tl.max(tl.where(tile_ok, y, float("-inf")), axis=1))
            row_nan |= tl.max((y != y).to(tl.int32), axis=1)

    if STATS:
        tl.store(pairs_ptr + rows, tl.sqrt(sum_sq), mask=slot_ok)
        tl.store(pairs_ptr + num_pairs + rows, tl.where(row_nan != 0, float("nan"), row_max), mask=slot_ok)


@lru_cache(maxsize=None)
def combine_launch(dtypes: tuple, sizes: tuple[int, int, int], with_stats: bool, renormalize: bool | None, config):
    """(the kernel's constexprs in its parameter order, launch options) for (y dtype, weights dtype), (k, E, H),
    statistics, router gate (None: none; else whether renormalised) and the config (built once per call
    signature: ``fused_moe`` keeps it in the call's plan)."""
    top_k, num_experts, hidden_size = sizes
    constexprs = (  # PROD_DTYPE, STATS, GATE_FROM_LOGITS, RENORMALIZE, K_PAD, E_PAD, BLOCK_H
        _TL_DTYPES[torch.promote_types(*dtypes)], with_stats, renormalize is not None, bool(renormalize),
        next_power_of_2(top_k), next_power_of_2(num_experts) if renormalize is not None else 1,
        min(config.combine_block_h, next_power_of_2(hidden_size)),
    )
    return constexprs, dict(num_warps=config.combine_num_warps)


def combine(
    workspace: torch.Tensor,  # 1-D, input dtype: y (S, H) from ``y_offset`` on (down_proj.py)
    y_offset: int,
    top_k_weights: torch.Tensor,
    pairs_into,  # reap_kernels.align.Alignment whose pairs scratch receives the statistics; None: no statistics
    router: tuple | None,  # (RouterGate, top_k_index): compute the REAP gates from the router logits
    launch: tuple,  # combine_launch(...)
) -> torch.Tensor:
    """Weighted sum of each token's k rows of y -> ``out`` (T, H) in the workspace dtype.

    With ``pairs_into``, per routed pair ||y|| goes to [0, S) of its pairs scratch, max(y) to [S, 2S) and,
    with ``router``, g to [2S, 3S) (fp32). Inputs are validated by ``reap_kernels.moe.fused_moe``.
    """
    num_tokens, top_k = top_k_weights.shape
    hidden_size = (workspace.numel() - y_offset) // (num_tokens * top_k)
    out = torch.empty(num_tokens, hidden_size, dtype=workspace.dtype, device=workspace.device)
    pairs, pairs_offset = (out, 0) if pairs_into is None else (pairs_into.buffer, pairs_into.pairs_offset)
    logits, index = (router[0].logits, router[1]) if router is not None else (out, top_k_weights)  # unread without
    constexprs, options = launch
    _combine_kernel[(num_tokens,)](
        workspace, top_k_weights, out, pairs, logits, index, y_offset, pairs_offset,
        hidden_size, top_k, logits.shape[1],
        hidden_size, 1, *top_k_weights.stride(), hidden_size, 1, *logits.stride(), *index.stride(), *constexprs, **options,
    )
    return out
