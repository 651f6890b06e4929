"""Routing alignment: sort the (token, slot) pairs by expert and pad every expert's segment to BLOCK_M.

The grouped GEMMs process the routed pairs in blocks of ``BLOCK_M`` rows that all belong to one
expert. This module builds, on the device and without any host synchronisation, the padded row
order and the expert of every block (the idea of vLLM's ``moe_align_block_size``, written here with
vectorized torch ops).

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

Within an expert the pairs keep their original order (stable sort), so the result is deterministic.
The grid of the GEMMs is launched over ``max_blocks``, an upper bound known on the host without
reading any device value: sum_e cdiv(c_e, BLOCK_M) <= cdiv(S, BLOCK_M) + (number of used experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    """The padded, expert-sorted row order of one MoE call (all tensors on the device)."""

    sorted_pair_ids: torch.Tensor  # (max_blocks * BLOCK_M,) int32, pair id t*k+slot, or S for padding
    block_expert: torch.Tensor  # (max_blocks,) int32, expert of each block, or E for an empty block
    counts: torch.Tensor  # (E,) int64, routed pairs per expert (all tokens, masked ones included)
    expert_start: torch.Tensor  # (E,) int64, first row of each expert in sorted_pair_ids
    max_blocks: int  # host-side upper bound on the number of non-empty blocks (grid size)
    block_m: int
    num_pairs: int  # S = T * k


def max_blocks_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e cdiv(count_e, block_m) that needs no device value."""
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


def align_by_expert(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the routed pairs of ``top_k_index`` (T, k) by expert, padding each expert to ``block_m`` rows.

    An expert id outside [0, E) raises (CPU) or triggers a device-side assert (CUDA) in the
    ``scatter_add_`` below; it never produces silently wrong numbers.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be (T, k), got shape {tuple(top_k_index.shape)}")
    if block_m <= 0 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m}")
    device = top_k_index.device
    expert_ids = top_k_index.reshape(-1).to(torch.int64)  # (S,)
    num_pairs = expert_ids.numel()
    max_blocks = max_blocks_bound(num_pairs, num_experts, block_m)

    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))  # bounds-checked, no host sync
    sorted_experts, order = torch.sort(expert_ids, stable=True)  # order: pair ids grouped by expert

    blocks_per_expert = (counts + block_m - 1) // block_m  # (E,)
    block_end = torch.cumsum(blocks_per_expert, 0)  # (E,) exclusive end block of each expert
    padded_start = (block_end - blocks_per_expert) * block_m  # (E,) first padded row of each expert
    pair_start = torch.cumsum(counts, 0) - counts  # (E,) first sorted (unpadded) position of each expert

    rank = torch.arange(num_pairs, device=device) - pair_start[sorted_experts]  # position inside the expert
    destination = padded_start[sorted_experts] + rank  # (S,) padded row of each sorted pair
    sorted_pair_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, destination, order.to(torch.int32))

    block_ids = torch.arange(max_blocks, device=device)
    block_expert = torch.searchsorted(block_end, block_ids, right=True).to(torch.int32)  # E past the end
    return Alignment(sorted_pair_ids, block_expert, counts, padded_start, max_blocks, block_m, num_pairs)
