"""Per-expert REAP statistics: one program per expert reduces that expert's routed pairs in a fixed order.

The combine kernel leaves, for every routed pair p = t*k + slot, the L2 norm and the largest element
of the unweighted expert row y[p] (``pair_norm``, ``pair_max``, fp32). The alignment already lists
each expert's pairs contiguously (``sorted_pair_ids[expert_start[e] : expert_start[e] + counts[e]]``,
in token order), so program e walks exactly those rows, drops the pairs of masked tokens, and writes

* ``count[e]``            number of counted pairs (int64)
* ``ean_sum[e]``          sum ||y||          (fp64)
* ``weighted_ean_sum[e]`` sum g * ||y||      (fp64)
* ``gate_sum[e]``         sum g              (fp64)
* ``max_activation[e]``   max over the rows of max_j y_j (fp32; -inf when no pair is counted)

No atomics: every output element is written by one program, and the summation order depends only on
the routing, so the statistics are bitwise reproducible from run to run. Summing in fp64 makes the
per-call totals as exact as the fp32 row norms they add up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _expert_stats_kernel(
    sorted_pair_ids_ptr,  # (rows,) int32: pair ids grouped by expert (alignment)
    expert_start_ptr,  # (E,) int64: first row of each expert in sorted_pair_ids
    counts_ptr,  # (E,) int64: routed pairs of each expert
    pair_norm_ptr,  # (S,) fp32: ||y[p]||
    pair_max_ptr,  # (S,) fp32: max_j y[p, j]
    gates_ptr,  # (S,) fp32: REAP gate g of each pair (row-major (T, k))
    mask_ptr,  # (T,) uint8: 1 = token counted (read only when HAS_MASK)
    count_ptr,  # (E,) int64 out
    ean_ptr,  # (E,) fp64 out
    weighted_ean_ptr,  # (E,) fp64 out
    gate_sum_ptr,  # (E,) fp64 out
    max_ptr,  # (E,) fp32 out
    top_k,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(0)
    start = tl.load(expert_start_ptr + expert)
    num_rows = tl.load(counts_ptr + expert).to(tl.int32)  # < T*k; an int32 loop bound
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    ean = tl.zeros((BLOCK,), dtype=tl.float64)
    weighted_ean = tl.zeros((BLOCK,), dtype=tl.float64)
    gate_sum = tl.zeros((BLOCK,), dtype=tl.float64)
    row_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for row in range(0, num_rows, BLOCK):
        offs = row + tl.arange(0, BLOCK)
        counted = offs < num_rows
        pair = tl.load(sorted_pair_ids_ptr + start + offs, mask=counted, other=0).to(tl.int64)
        if HAS_MASK:
            counted = counted & (tl.load(mask_ptr + pair // top_k, mask=counted, other=0) != 0)
        norm = tl.load(pair_norm_ptr + pair, mask=counted, other=0.0).to(tl.float64)
        gate = tl.load(gates_ptr + pair, mask=counted, other=0.0).to(tl.float64)
        count += counted.to(tl.int64)
        ean += norm
        weighted_ean += gate * norm
        gate_sum += gate
        row_max = tl.maximum(row_max, tl.load(pair_max_ptr + pair, mask=counted, other=float("-inf")))
    tl.store(count_ptr + expert, tl.sum(count, axis=0))
    tl.store(ean_ptr + expert, tl.sum(ean, axis=0))
    tl.store(weighted_ean_ptr + expert, tl.sum(weighted_ean, axis=0))
    tl.store(gate_sum_ptr + expert, tl.sum(gate_sum, axis=0))
    tl.store(max_ptr + expert, tl.max(row_max, axis=0))


STATISTICS_DTYPES = {
    "count": torch.int64,
    "ean_sum": torch.float64,
    "weighted_ean_sum": torch.float64,
    "gate_sum": torch.float64,
    "max_activation": torch.float32,
}


def statistics_buffers(num_experts: int, device: torch.device, *, filled: bool) -> dict[str, torch.Tensor]:
    """The (E,) per-expert statistics tensors; ``filled``: the values of no counted pair (0, max -inf)."""
    if not filled:
        return {name: torch.empty(num_experts, dtype=dtype, device=device) for name, dtype in STATISTICS_DTYPES.items()}
    stats = {name: torch.zeros(num_experts, dtype=dtype, device=device) for name, dtype in STATISTICS_DTYPES.items()}
    stats["max_activation"].fill_(float("-inf"))
    return stats


def expert_statistics(
    sorted_pair_ids: torch.Tensor,
    expert_start: torch.Tensor,
    counts: torch.Tensor,
    pair_norm: torch.Tensor,
    pair_max: torch.Tensor,
    gates: torch.Tensor,
    token_mask: torch.Tensor | None,
    top_k: int,
    block: int = 256,
) -> dict[str, torch.Tensor]:
    """Reduce the per-pair norms and maxima into per-expert statistics (see the module docstring).

    ``gates`` is (T, k) fp32 and ``token_mask`` (T,) uint8 or None; the pair buffers are (T*k,) fp32.
    Inputs are validated by ``reap_kernels.moe.fused_moe``.
    """
    num_experts = counts.numel()
    stats = statistics_buffers(num_experts, pair_norm.device, filled=False)  # the kernel writes every element
    gates = gates.to(torch.float32).contiguous()
    _expert_stats_kernel[(num_experts,)](
        sorted_pair_ids,
        expert_start,
        counts,
        pair_norm,
        pair_max,
        gates,
        token_mask if token_mask is not None else pair_norm,  # never read without a mask
        stats["count"],
        stats["ean_sum"],
        stats["weighted_ean_sum"],
        stats["gate_sum"],
        stats["max_activation"],
        top_k,
        HAS_MASK=token_mask is not None,
        BLOCK=block,
    )
    return stats
