"""Per-expert REAP statistics: one program per expert reduces that expert's routed pairs in a fixed order.

The combine kernel leaves, for every routed pair p = t*k + slot, the L2 norm and the largest element
of the unweighted expert row y[p] (``pair_norm``, ``pair_max``, fp32). The alignment already lists
each expert's pairs contiguously (``sorted_pair_ids[expert_start[e] : expert_start[e] + counts[e]]``,
in token order), so program e walks exactly those rows, drops the pairs of masked tokens, and writes

* ``expert_frequency[e]``              number of counted pairs (int64)
* ``ean_sum[e]``                       sum ||y||          (fp64)
* ``weighted_ean_sum[e]``              sum g * ||y||      (fp64)
* ``weighted_expert_frequency_sum[e]`` sum g              (fp64)
* ``max_activations[e]``               max over the rows of max_j y_j (fp32; -inf when no pair is counted;
                                        NaN when a counted row holds a NaN, as torch's ``amax`` /
                                        ``maximum`` propagate it)

(upstream's observation-file keys, the names every caller uses).

Every program also counts the counted tokens of a 1/E slice of T into ``total_tokens`` (() int64, by an
integer atomic add; without ``accumulators`` it starts from a zeroed tensor). With ``ACCUMULATE``
the kernel adds its results into running totals instead (``max_activations``: the maximum), e.g. the
accumulators of a layer, and adds ``expert_frequency[i] + expert_frequency[j]`` into the (E, E)
``pairwise_expert_frequency`` totals, so one launch does the whole statistics update of a MoE call.

No floating-point atomics: every float output element is written by one program, and the summation
order depends only on the routing, so the statistics are bitwise reproducible from run to run. (The
pairwise totals are int64 atomic adds: integer sums do not depend on their order.) Summing in fp64
makes the per-call totals as exact as the fp32 row norms they add up.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _update(ptr, value, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        value += tl.load(ptr)
    tl.store(ptr, value)


@triton.jit
def _expert_stats_kernel(
    sorted_pair_ids_ptr,  # int32 Alignment buffer: pair ids grouped by expert, ..., counts (E), expert_start (E)
    pairs_ptr,  # (2 or 3, S) fp32 from pairs_ptr + pairs_offset (any pointer type, its bits are fp32): ||y[p]||,
    # max_j y[p, j] (and g when GATES_IN_PAIRS), from combine
    gates_ptr,  # float: REAP gate g of each pair (T, k), read through stride_gt, stride_gk (unless GATES_IN_PAIRS)
    mask_ptr,  # (T,) bool, any stride: True = token counted (read only when HAS_MASK)
    total_tokens_ptr,  # () int64 in/out: counted tokens are added (atomically)
    expert_frequency_ptr,  # (E,) int64 out
    ean_sum_ptr,  # (E,) fp64 out
    weighted_ean_sum_ptr,  # (E,) fp64 out
    weighted_expert_frequency_sum_ptr,  # (E,) fp64 out
    max_activations_ptr,  # (E,) fp32 out
    pairwise_expert_frequency_ptr,  # (E, E) int64 in/out (only with PAIRWISE)
    counts_offset,  # where counts start in the Alignment buffer (expert_start follows)
    pairs_offset,
    num_tokens,
    num_experts,
    top_k,
    stride_mask,
    stride_gt,
    stride_gk,
    HAS_MASK: tl.constexpr,
    GATES_IN_PAIRS: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add into the outputs (maximum for max_activations_ptr) instead of overwriting them
    PAIRWISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(0)
    pairs_ptr = (pairs_ptr + pairs_offset).to(tl.pointer_type(tl.float32), bitcast=True)
    # the token counter, split over the programs: each adds the counted tokens of its slice of T
    # (int64 atomics: integer sums do not depend on their order)
    per_program = tl.cdiv(num_tokens, num_experts)
    slice_end = tl.minimum((expert + 1) * per_program, num_tokens)
    tokens = tl.zeros((BLOCK,), dtype=tl.int64)
    for first in range(expert * per_program, slice_end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        if HAS_MASK:
            tokens += tl.load(mask_ptr + offs.to(tl.int64) * stride_mask, mask=offs < slice_end, other=0).to(tl.int64)
        else:
            tokens += (offs < slice_end).to(tl.int64)
    tl.atomic_add(total_tokens_ptr, tl.sum(tokens, axis=0))

    num_pairs = num_tokens * top_k
    if GATES_IN_PAIRS:
        gates_ptr = pairs_ptr + 2 * num_pairs
    num_rows = tl.load(sorted_pair_ids_ptr + counts_offset + expert)  # counts[e] < T*k
    start = tl.load(sorted_pair_ids_ptr + counts_offset + num_experts + expert)  # expert_start[e]
    count = tl.zeros((BLOCK,), dtype=tl.int64)
    ean = tl.zeros((BLOCK,), dtype=tl.float64)
    weighted_ean = tl.zeros((BLOCK,), dtype=tl.float64)
    gate_sum = tl.zeros((BLOCK,), dtype=tl.float64)
    row_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    has_nan = tl.zeros((BLOCK,), dtype=tl.int32)  # tl.maximum drops NaN; torch's amax / maximum keep it
    for row in range(0, num_rows, BLOCK):
        offs = row + tl.arange(0, BLOCK)
        counted = offs < num_rows
        pair = tl.load(sorted_pair_ids_ptr + start + offs, mask=counted, other=0).to(tl.int64)
        if HAS_MASK:
            counted = counted & (tl.load(mask_ptr + (pair // top_k) * stride_mask, mask=counted, other=0) != 0)
        norm = tl.load(pairs_ptr + pair, mask=counted, other=0.0).to(tl.float64)
        gate_ptrs = gates_ptr + (pair // top_k) * stride_gt + (pair % top_k) * stride_gk
        gate = tl.load(gate_ptrs, mask=counted, other=0.0).to(tl.float64)
        count += counted.to(tl.int64)
        ean += norm
        weighted_ean += gate * norm
        gate_sum += gate
        pair_max = tl.load(pairs_ptr + num_pairs + pair, mask=counted, other=float("-inf"))
        row_max = tl.maximum(row_max, pair_max)
        has_nan |= (pair_max != pair_max).to(tl.int32)
    expert_count = tl.sum(count, axis=0)
    _update(expert_frequency_ptr + expert, expert_count, ACCUMULATE)
    _update(ean_sum_ptr + expert, tl.sum(ean, axis=0), ACCUMULATE)
    _update(weighted_ean_sum_ptr + expert, tl.sum(weighted_ean, axis=0), ACCUMULATE)
    _update(weighted_expert_frequency_sum_ptr + expert, tl.sum(gate_sum, axis=0), ACCUMULATE)
    expert_max = tl.max(row_max, axis=0)
    expert_nan = tl.max(has_nan, axis=0) != 0
    if ACCUMULATE:
        running = tl.load(max_activations_ptr + expert)
        expert_max = tl.maximum(expert_max, running)
        expert_nan = expert_nan | (running != running)
    tl.store(max_activations_ptr + expert, tl.where(expert_nan, float("nan"), expert_max))
    if PAIRWISE:  # row e and column e each get count[e]: element (i, j) gains count[i] + count[j]
        for first in range(0, num_experts, BLOCK):
            other = first + tl.arange(0, BLOCK)
            ok = other < num_experts
            add = tl.zeros((BLOCK,), dtype=tl.int64) + expert_count
            tl.atomic_add(pairwise_expert_frequency_ptr + expert * num_experts + other, add, mask=ok)
            tl.atomic_add(pairwise_expert_frequency_ptr + other * num_experts + expert, add, mask=ok)


# The statistics under the keys of upstream's observation files (reap_fast.metrics saves them as they are).
STATISTICS_DTYPES = {
    "expert_frequency": torch.int64,
    "ean_sum": torch.float64,
    "weighted_ean_sum": torch.float64,
    "weighted_expert_frequency_sum": torch.float64,
    "max_activations": torch.float32,
}
PAIRWISE_KEY = "pairwise_expert_frequency"  # the optional (E, E) running total


def statistics_buffers(num_experts: int, device: torch.device, *, filled: bool) -> dict[str, torch.Tensor]:
    """The per-call statistics tensors ((E,) each, plus () ``total_tokens``, always zeroed); ``filled``: the values
    of no counted pair (0, max -inf), else uninitialised."""
    stats = {name: torch.empty(num_experts, dtype=dtype, device=device) for name, dtype in STATISTICS_DTYPES.items()}
    stats["total_tokens"] = torch.zeros((), dtype=torch.int64, device=device)  # the kernel adds into it
    if filled:
        for name, tensor in stats.items():
            if name != "total_tokens":
                tensor.fill_(float("-inf") if name == "max_activations" else 0)
    return stats


def check_accumulators(accumulators: dict[str, torch.Tensor], num_experts: int, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``accumulators`` holds the statistics tensors (and optionally
    ``pairwise_expert_frequency`` (E, E) int64) with the right shapes, dtypes and device, contiguous."""
    expected = {**STATISTICS_DTYPES, "total_tokens": torch.int64, PAIRWISE_KEY: torch.int64}
    for name, tensor in accumulators.items():
        if name not in expected:
            raise ValueError(f"unknown accumulator {name!r}; expected {', '.join(expected)}")
        shape = () if name == "total_tokens" else (num_experts, num_experts) if name == PAIRWISE_KEY else (num_experts,)
        if tuple(tensor.shape) != shape or tensor.dtype != expected[name] or tensor.device != device or not tensor.is_contiguous():
            raise ValueError(f"accumulator {name!r} must be a contiguous {expected[name]} tensor of shape {shape} on {device}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    missing = [name for name in expected if name != PAIRWISE_KEY and name not in accumulators]
    if missing:
        raise ValueError(f"accumulators missing: {', '.join(missing)}")


def expert_statistics(
    alignment,  # reap_kernels.align.Alignment
    pairs: torch.Tensor | None,
    gates: torch.Tensor | None,
    token_mask: torch.Tensor | None,
    top_k: int,
    accumulators: dict[str, torch.Tensor] | None = None,
    block: int = 256,
) -> dict[str, torch.Tensor]:
    """Reduce the per-pair norms and maxima into per-expert statistics (see the module docstring).

    ``pairs`` holds fp32 ||y|| at [0, S), max(y) at [S, 2S) and, when ``gates`` is None, the gates at
    [2S, 3S) (None: the alignment's pairs scratch, where combine.py wrote them); else ``gates`` is (T, k) float. ``token_mask`` is (T,) bool (any stride) or None.
    Without ``accumulators`` the statistics of this call are returned in new tensors; with them (as
    checked by :func:`check_accumulators`) they are added in, and ``accumulators`` is returned.
    Inputs are validated by ``reap_kernels.moe.fused_moe``.
    """
    num_experts = alignment.num_experts
    pairs, pairs_offset = (alignment.buffer, alignment.pairs_offset) if pairs is None else (pairs, 0)
    stats = accumulators if accumulators is not None else statistics_buffers(num_experts, pairs.device, filled=False)
    pairwise = stats.get(PAIRWISE_KEY)
    gate_strides = (top_k, 1) if gates is None else gates.stride()
    _expert_stats_kernel[(num_experts,)](
        alignment.buffer, pairs, gates if gates is not None else pairs,
        token_mask if token_mask is not None else pairs,  # never read without a mask
        stats["total_tokens"], stats["expert_frequency"], stats["ean_sum"], stats["weighted_ean_sum"],
        stats["weighted_expert_frequency_sum"], stats["max_activations"],
        pairwise if pairwise is not None else stats["expert_frequency"],  # never touched without PAIRWISE
        alignment.num_rows + alignment.max_blocks, pairs_offset, alignment.num_pairs // top_k, num_experts, top_k,
        token_mask.stride(0) if token_mask is not None else 0, *gate_strides,
        # constexprs by position (no keyword binding per call): HAS_MASK, GATES_IN_PAIRS, ACCUMULATE, PAIRWISE, BLOCK
        token_mask is not None, gates is None, accumulators is not None, pairwise is not None, block,
    )
    return stats
