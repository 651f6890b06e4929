"""Routing alignment: sort the (token, slot) pairs by expert and pad every expert's segment to BLOCK_M.

The grouped GEMMs process the routed pairs in blocks of ``BLOCK_M`` rows that all belong to one
expert. Two Triton kernels build, on the device and without any host synchronisation, the padded
row order and the expert of every block (the counting-sort idea of vLLM's ``moe_align_block_size``:
histogram, scan, scatter; written independently here):

1. ``_count_kernel``, one program per chunk of ``CHUNK`` consecutive pairs: the chunk's histogram of
   expert ids -> ``chunk_counts[chunk, :]``; it also fills its share of ``sorted_pair_ids`` with the
   padding value S (the scatter overwrites the real rows afterwards, on the same stream).
2. ``_scatter_kernel``, one program per chunk: sums all chunk histograms (totals per expert) and
   those of the earlier chunks (the offset of this chunk inside each expert's segment), scans the
   padded totals into each expert's first row, then walks the chunk's pairs in order, ``SUB`` at a
   time: a pair's row is its expert's next free row plus its rank among the same expert's pairs
   earlier in the step. Program 0 also writes ``counts`` and ``expert_start``; every
   program writes its share of ``block_expert``.

Worked example: T = 4 tokens, k = 2, E = 3 experts, BLOCK_M = 4::

    top_k_index = [[0, 2],      pair ids (t * k + slot):  0 1
                   [2, 1],                                2 3
                   [0, 2],                                4 5
                   [2, 0]]                                6 7
    flat expert of each pair   = [0, 2, 2, 1, 0, 2, 2, 0]
    counts per expert          = [3, 1, 4]
    padded counts (x BLOCK_M)  = [4, 4, 4]      -> blocks per expert [1, 1, 1]
    max_blocks (upper bound)   = cdiv(S, BLOCK_M) + min(E, S) = cdiv(8, 4) + 3 = 5
    sorted_pair_ids (5 x 4)    = [0, 4, 7, 8 | 3, 8, 8, 8 | 1, 2, 5, 6 | 8, 8, 8, 8 | 8, 8, 8, 8]
                                  (8 = S marks a padding row: loads are masked, nothing is stored)
    block_expert               = [0, 1, 2, 3, 3]   (E = 3 marks an empty block: the program exits)
    expert_start               = [0, 4, 8]         (first row of each expert; its counts[e] rows follow)

Within an expert the pairs keep their original order (chunks, steps and ranks all follow the pair
ids), so the result is deterministic. The grid of the GEMMs is launched over
``max_blocks``, an upper bound known on the host without reading any device value:
sum_e cdiv(c_e, BLOCK_M) <= cdiv(S, BLOCK_M) + (number of used experts). An expert id outside
[0, E) fails a device assertion on a GPU and raises ``ValueError`` on the CPU (interpreter); it
never gives wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

CHUNK = 1024  # pairs per program
SUB = 64  # pairs ranked together inside a program (a SUB x SUB comparison)
ALIGN_NUM_WARPS = 8
SUMMARY_ROWS = 16  # chunk histograms summed per loop step in the scatter kernel
BLOCKS_PER_STEP = 32  # block_expert entries computed per loop step


@dataclass
class Alignment:
    """The padded, expert-sorted row order of one MoE call (all tensors on the device)."""

    sorted_pair_ids: torch.Tensor  # (max_blocks * BLOCK_M,) int32, pair id t*k+slot, or S for padding
    block_expert: torch.Tensor  # (max_blocks,) int32, expert of each block, or E for an empty block
    counts: torch.Tensor  # (E,) int32, routed pairs per expert (all tokens, masked ones included)
    expert_start: torch.Tensor  # (E,) int32, first row of each expert in sorted_pair_ids
    max_blocks: int  # host-side upper bound on the number of non-empty blocks (grid size)
    block_m: int
    num_pairs: int  # S = T * k


def max_blocks_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e cdiv(count_e, block_m) that needs no device value."""
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


@triton.jit
def _load_experts(index_ptr, pair, num_pairs, num_experts, top_k, stride_t, stride_k):
    """Expert id (int32) of each pair id in ``pair``, whether the pair exists (< S), and whether it
    exists with an id in [0, E) (the pairs that are counted and placed)."""
    valid = pair < num_pairs
    token = pair // top_k
    expert = tl.load(index_ptr + token.to(tl.int64) * stride_t + (pair - token * top_k) * stride_k, mask=valid, other=0)
    expert = expert.to(tl.int32)
    return expert, valid, valid & (expert >= 0) & (expert < num_experts)


@triton.jit
def _histogram(expert, counted, E_BINS: tl.constexpr):
    """Histogram of ``expert`` over E_BINS bins, counting only where ``counted``."""
    hist = tl.histogram(tl.where(counted, expert, 0), E_BINS)  # the others land in bin 0, taken out below
    return hist - tl.where(tl.arange(0, E_BINS) == 0, tl.sum((~counted).to(tl.int32), axis=0), 0)


@triton.jit(debug=True)  # keeps the device assertion on expert ids in every build (costs one compare)
def _count_kernel(
    index_ptr,  # (T, k) any integer dtype: top_k_index
    chunk_counts_ptr,  # (P, E_BINS) int32 out: histogram of each chunk
    sorted_pair_ids_ptr,  # (rows,) int32 out: filled with S here, real rows by _scatter_kernel
    num_pairs,  # S
    top_k,
    num_experts,
    num_rows,  # max_blocks * BLOCK_M
    stride_t,
    stride_k,
    E_BINS: tl.constexpr,  # next power of two >= E
    CHUNK: tl.constexpr,
):
    chunk = tl.program_id(0)
    num_chunks = tl.num_programs(0)
    pair = chunk * CHUNK + tl.arange(0, CHUNK)
    expert, valid, counted = _load_experts(index_ptr, pair, num_pairs, num_experts, top_k, stride_t, stride_k)
    tl.device_assert(counted | ~valid, "expert id out of range [0, E)")
    tl.store(chunk_counts_ptr + chunk * E_BINS + tl.arange(0, E_BINS), _histogram(expert, counted, E_BINS))

    rows_per_chunk = tl.cdiv(num_rows, num_chunks)
    end = tl.minimum((chunk + 1) * rows_per_chunk, num_rows)
    for row in range(chunk * rows_per_chunk, end, CHUNK):
        offs = row + tl.arange(0, CHUNK)
        tl.store(sorted_pair_ids_ptr + offs, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs, mask=offs < end)


@triton.jit
def _scatter_kernel(
    index_ptr,  # (T, k) any integer dtype: top_k_index
    chunk_counts_ptr,  # (P, E_BINS) int32: histogram of each chunk (from _count_kernel)
    base_ptr,  # (P, E_BINS) int32 scratch: next free row of each expert for this chunk
    sorted_pair_ids_ptr,  # (rows,) int32 out
    block_expert_ptr,  # (max_blocks,) int32 out
    counts_ptr,  # (E,) int32 out
    expert_start_ptr,  # (E,) int32 out
    num_pairs,
    top_k,
    num_experts,
    max_blocks,
    stride_t,
    stride_k,
    BLOCK_M: tl.constexpr,
    E_BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,  # pairs placed per loop step (ranked by a SUB x SUB comparison)
    SUMMARY_ROWS: tl.constexpr,
    BLOCKS_PER_STEP: tl.constexpr,
):
    chunk = tl.program_id(0)
    num_chunks = tl.num_programs(0)
    bins = tl.arange(0, E_BINS)
    bin_ok = bins < num_experts

    # totals per expert, and the pairs of each expert in the chunks before this one
    total = tl.zeros((E_BINS,), dtype=tl.int32)
    before = tl.zeros((E_BINS,), dtype=tl.int32)
    for first in range(0, num_chunks, SUMMARY_ROWS):
        rows = first + tl.arange(0, SUMMARY_ROWS)
        tile = tl.load(chunk_counts_ptr + rows[:, None] * E_BINS + bins[None, :], mask=(rows < num_chunks)[:, None], other=0)
        total += tl.sum(tile, axis=0)
        before += tl.sum(tl.where((rows < chunk)[:, None], tile, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    if chunk == 0:
        tl.store(counts_ptr + bins, total, mask=bin_ok)
        tl.store(expert_start_ptr + bins, padded_start, mask=bin_ok)

    # this chunk's pairs, SUB at a time, in order: row = next free row of the expert + rank among
    # the same expert's pairs earlier in the step
    next_row = padded_start + before
    offs = tl.arange(0, SUB)
    earlier = offs[None, :] < offs[:, None]
    for first in range(chunk * CHUNK, tl.minimum((chunk + 1) * CHUNK, num_pairs), SUB):
        pair = first + offs
        expert, valid, counted = _load_experts(index_ptr, pair, num_pairs, num_experts, top_k, stride_t, stride_k)
        tl.store(base_ptr + chunk * E_BINS + bins, next_row)
        tl.debug_barrier()  # the gather below reads what other threads of this program stored
        row = tl.load(base_ptr + chunk * E_BINS + expert, mask=counted, other=0)
        tl.debug_barrier()  # every thread has read before the next step overwrites
        same = (expert[:, None] == expert[None, :]) & earlier & counted[None, :]
        row += tl.sum(same.to(tl.int32), axis=1)
        tl.store(sorted_pair_ids_ptr + row, pair, mask=counted)
        next_row += _histogram(expert, counted, E_BINS)

    # block b belongs to the number of experts whose padded segment ends at or before row b * BLOCK_M
    blocks_per_chunk = tl.cdiv(max_blocks, num_chunks)
    end = tl.minimum((chunk + 1) * blocks_per_chunk, max_blocks)
    for first in range(chunk * blocks_per_chunk, end, BLOCKS_PER_STEP):
        block = first + tl.arange(0, BLOCKS_PER_STEP)
        ended = (padded_end[None, :] <= block[:, None] * BLOCK_M) & bin_ok[None, :]
        tl.store(block_expert_ptr + block, tl.sum(ended.to(tl.int32), axis=1), mask=block < end)


def align_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the routed pairs of ``top_k_index`` (T, k) by expert, padding each expert to ``block_m`` rows.

    Two Triton launches; ``top_k_index`` may have any integer dtype and strides (read as it is).
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be (T, k), got shape {tuple(top_k_index.shape)}")
    if block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m}")
    device = top_k_index.device
    num_pairs = top_k_index.numel()
    max_blocks = max_blocks_bound(num_pairs, num_experts, block_m)
    num_rows = max_blocks * block_m
    sorted_pair_ids = torch.empty(num_rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_start = torch.empty(num_experts, dtype=torch.int32, device=device)
    alignment = Alignment(sorted_pair_ids, block_expert, counts, expert_start, max_blocks, block_m, num_pairs)
    if device.type == "cpu" and num_pairs:
        # The interpreter skips device assertions: check on the host here, in numpy (CPU tensors only;
        # no torch op, so the launch counts of the GPU path are the same).
        ids = top_k_index.detach().numpy()
        if ids.min() < 0 or ids.max() >= num_experts:
            raise ValueError(f"top_k_index holds expert ids outside [0, {num_experts})")
    if num_pairs == 0:
        counts.zero_()
        expert_start.zero_()
        return alignment
    e_bins = triton.next_power_of_2(num_experts)
    num_chunks = triton.cdiv(num_pairs, CHUNK)
    chunk_counts = torch.empty(num_chunks, e_bins, dtype=torch.int32, device=device)
    base = torch.empty(num_chunks, e_bins, dtype=torch.int32, device=device)
    top_k = top_k_index.shape[1]
    strides = dict(stride_t=top_k_index.stride(0), stride_k=top_k_index.stride(1))
    _count_kernel[(num_chunks,)](
        top_k_index, chunk_counts, sorted_pair_ids, num_pairs, top_k, num_experts, num_rows,
        **strides, E_BINS=e_bins, CHUNK=CHUNK, num_warps=ALIGN_NUM_WARPS,
    )
    _scatter_kernel[(num_chunks,)](
        top_k_index, chunk_counts, base, sorted_pair_ids, block_expert, counts, expert_start,
        num_pairs, top_k, num_experts, max_blocks, **strides,
        BLOCK_M=block_m, E_BINS=e_bins, CHUNK=CHUNK, SUB=SUB, SUMMARY_ROWS=SUMMARY_ROWS, BLOCKS_PER_STEP=BLOCKS_PER_STEP,
        num_warps=ALIGN_NUM_WARPS,
    )
    return alignment
