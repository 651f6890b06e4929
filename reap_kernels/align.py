"""Routing alignment: sort the (token, slot) pairs by expert and pad every expert's segment to BLOCK_M.

The grouped GEMMs process the routed pairs in blocks of ``BLOCK_M`` rows that all belong to one
expert. One Triton program builds, on the device and without any host synchronisation, the padded
row order and the expert of every block (the counting-sort idea of vLLM's ``moe_align_block_size``:
histogram, scan, scatter; written independently here), in one launch (``_align_kernel``, grid (1,)):

1. fill ``sorted_pair_ids`` with the padding value S;
2. the histogram of expert ids over all pairs (``CHUNK`` at a time) -> ``counts``; its scan over the
   padded totals -> ``expert_start``;
3. the pairs again, ``CHUNK`` at a time in pair order: ``tl.sort`` of the keys expert * CHUNK + position
   lists the step's pairs by expert, each expert's in their order, so the j-th sorted pair's row is its
   expert's next free row plus j minus the number of the step's pairs of smaller experts (one
   ``tl.gather`` from an E-long vector; no scratch memory, no barrier);
4. ``block_expert`` from the padded segment ends.

One program suffices: the alignment reads 4 bytes per pair (64 KB at T = 2048, k = 8) where the GEMMs
read the layer's weights, and a grid of programs would need a grid-wide barrier between the histogram
and the scatter (a second launch).

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

Within an expert the pairs keep their original order (steps and ranks follow the pair ids), so the
result is deterministic. The grid of the GEMMs is launched over
``max_blocks``, an upper bound known on the host without reading any device value:
sum_e cdiv(c_e, BLOCK_M) <= cdiv(S, BLOCK_M) + (number of used experts). An expert id outside
[0, E) fails a device assertion on a GPU and raises ``ValueError`` on the CPU (interpreter); it
never gives wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .sizes import next_power_of_2

CHUNK = 1024  # pairs per step (one sort); fewer when S is smaller
ALIGN_NUM_WARPS = 8
BLOCKS_PER_STEP = 32  # block_expert entries computed per loop step


@dataclass(slots=True)
class Alignment:
    """The padded, expert-sorted row order of one MoE call, in one int32 device tensor ``buffer``:

    ``[sorted_pair_ids (max_blocks * BLOCK_M) | block_expert (max_blocks) | counts (E) | expert_start (E) | pairs (3 S)]``

    (one allocation; the kernels find each part from ``max_blocks``, ``BLOCK_M`` and E). ``pairs`` is scratch
    for the statistics: combine.py stores fp32 values there (their bits), expert_stats.py reads them.
    """

    buffer: torch.Tensor  # int32, see above
    max_blocks: int  # host-side upper bound on the number of non-empty blocks (grid size)
    block_m: int
    num_pairs: int  # S = T * k
    num_experts: int

    @property
    def num_rows(self) -> int:
        return self.max_blocks * self.block_m

    @property
    def sorted_pair_ids(self) -> torch.Tensor:
        """(max_blocks * BLOCK_M,) pair id t*k+slot of each row, or S for padding."""
        return self.buffer[: self.num_rows]

    @property
    def block_expert(self) -> torch.Tensor:
        """(max_blocks,) expert of each block, or E for an empty block."""
        return self.buffer[self.num_rows : self.num_rows + self.max_blocks]

    @property
    def counts(self) -> torch.Tensor:
        """(E,) routed pairs per expert (all tokens, masked ones included)."""
        start = self.num_rows + self.max_blocks
        return self.buffer[start : start + self.num_experts]

    @property
    def expert_start(self) -> torch.Tensor:
        """(E,) first row of each expert in sorted_pair_ids."""
        start = self.num_rows + self.max_blocks + self.num_experts
        return self.buffer[start : start + self.num_experts]

    @property
    def pairs_offset(self) -> int:
        """Where the per-pair statistics scratch (3 S fp32) starts in ``buffer``."""
        return self.num_rows + self.max_blocks + 2 * self.num_experts


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
def _align_kernel(
    index_ptr,  # (T, k) any integer dtype: top_k_index
    sorted_pair_ids_ptr,  # int32 out: the Alignment buffer (sorted_pair_ids, block_expert, counts, expert_start)
    num_pairs,  # S
    top_k,
    num_experts,
    max_blocks,
    stride_t,
    stride_k,
    BLOCK_M: tl.constexpr,
    E_BINS: tl.constexpr,  # next power of two >= E
    CHUNK: tl.constexpr,  # pairs per step
    BLOCKS_PER_STEP: tl.constexpr,
):
    bins = tl.arange(0, E_BINS)
    bin_ok = bins < num_experts
    offs = tl.arange(0, CHUNK)
    num_rows = max_blocks * BLOCK_M
    block_expert_ptr = sorted_pair_ids_ptr + num_rows
    counts_ptr = block_expert_ptr + max_blocks
    expert_start_ptr = counts_ptr + num_experts
    for row in range(0, num_rows, CHUNK):  # padding everywhere; the real rows are overwritten below
        tl.store(sorted_pair_ids_ptr + row + offs, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs, mask=row + offs < num_rows)

    # 1. pairs per expert
    total = tl.zeros((E_BINS,), dtype=tl.int32)
    for first in range(0, num_pairs, CHUNK):
        expert, valid, counted = _load_experts(index_ptr, first + offs, num_pairs, num_experts, top_k, stride_t, stride_k)
        tl.device_assert(counted | ~valid, "expert id out of range [0, E)")
        total += _histogram(expert, counted, E_BINS)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    tl.store(counts_ptr + bins, total, mask=bin_ok)
    tl.store(expert_start_ptr + bins, padded_start, mask=bin_ok)

    # 2. place the pairs, CHUNK at a time in pair order: sorting the keys (expert, position) lists the step's
    # pairs by expert, in their order; the j-th sorted pair goes to its expert's next free row plus its rank
    # among the step's pairs of that expert (j minus the number of the step's pairs of smaller experts)
    next_row = padded_start
    for first in range(0, num_pairs, CHUNK):
        expert, valid, counted = _load_experts(index_ptr, first + offs, num_pairs, num_experts, top_k, stride_t, stride_k)
        key = tl.sort(tl.where(counted, expert, E_BINS) * CHUNK + offs)
        sorted_expert = key // CHUNK
        placed = sorted_expert < E_BINS
        hist = _histogram(expert, counted, E_BINS)
        base = next_row - (tl.cumsum(hist, axis=0) - hist)  # row of sorted position 0 for each expert
        dest = tl.gather(base, tl.where(placed, sorted_expert, 0), 0) + offs
        tl.store(sorted_pair_ids_ptr + dest, first + key % CHUNK, mask=placed)
        next_row += hist

    # 3. block b belongs to the number of experts whose padded segment ends at or before row b * BLOCK_M
    for first in range(0, max_blocks, BLOCKS_PER_STEP):
        block = first + tl.arange(0, BLOCKS_PER_STEP)
        ended = (padded_end[None, :] <= block[:, None] * BLOCK_M) & bin_ok[None, :]
        tl.store(block_expert_ptr + block, tl.sum(ended.to(tl.int32), axis=1), mask=block < max_blocks)


@lru_cache(maxsize=256)
def align_launch(num_pairs: int, num_experts: int, block_m: int) -> tuple[int, int, tuple, dict]:
    """(max_blocks, buffer length, the kernel's constexprs in its parameter order, launch options) for S pairs,
    E experts and ``block_m``: built once per call signature (``fused_moe`` keeps it in the call's plan)."""
    if block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m}")
    max_blocks = max_blocks_bound(num_pairs, num_experts, block_m)
    chunk = min(CHUNK, max(16, next_power_of_2(num_pairs)))  # small calls sort small steps
    constexprs = (block_m, next_power_of_2(num_experts), chunk, BLOCKS_PER_STEP)  # BLOCK_M, E_BINS, CHUNK, BLOCKS_PER_STEP
    length = max_blocks * (block_m + 1) + 2 * num_experts + 3 * num_pairs
    return max_blocks, length, constexprs, dict(num_warps=ALIGN_NUM_WARPS)


def align_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the routed pairs of ``top_k_index`` (T, k) by expert, padding each expert to ``block_m`` rows.

    One Triton launch; ``top_k_index`` may have any integer dtype and strides (read as it is).
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be (T, k), got shape {tuple(top_k_index.shape)}")
    return align_pairs(top_k_index, num_experts, align_launch(top_k_index.numel(), num_experts, block_m))


def align_pairs(top_k_index: torch.Tensor, num_experts: int, launch: tuple[int, int, tuple, dict]) -> Alignment:
    """:func:`align_by_expert` with its launch parameters given (``align_launch``; the inputs checked)."""
    device = top_k_index.device
    num_pairs = top_k_index.numel()
    max_blocks, length, constexprs, options = launch
    buffer = torch.empty(length, dtype=torch.int32, device=device)
    alignment = Alignment(buffer, max_blocks, constexprs[0], num_pairs, num_experts)
    if top_k_index.is_cpu and num_pairs:
        # The interpreter skips device assertions: check on the host here, in numpy (CPU tensors only;
        # no torch op, so the launch counts of the GPU path are the same).
        ids = top_k_index.detach().numpy()
        if ids.min() < 0 or ids.max() >= num_experts:
            raise ValueError(f"top_k_index holds expert ids outside [0, {num_experts})")
    if num_pairs == 0:
        buffer.zero_()
        return alignment
    _align_kernel[(1,)](
        top_k_index, buffer, num_pairs, top_k_index.shape[1], num_experts, max_blocks, *top_k_index.stride(), *constexprs, **options,
    )
    return alignment
