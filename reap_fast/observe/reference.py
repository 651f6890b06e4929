"""The reference engine: a plain PyTorch routed MoE forward that also returns REAP statistics.

Only routed (token, expert) pairs are computed. Rows are sorted by expert once; each expert that
received tokens runs its projections on its contiguous slice (one host synchronisation per call for
the slice sizes, none per expert); the statistics are then reduced for all experts at once with
``index_add_`` / ``scatter_reduce_``. The weighted combination repeats the stock transformers
implementation's operations, so the layer output is the one the model computes without reap-fast.
"""

from __future__ import annotations

import torch
from torch import nn

from ..metrics import BatchStats, LayerAccumulator
from .experts import expert_forward


def expert_output_rows(experts: nn.Module, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Unweighted expert outputs y for ``rows`` sorted by expert (``counts[e]`` rows for expert e)."""
    out = rows.new_empty(rows.shape[0], rows.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        stop = start + count
        out[start:stop] = expert_forward(experts, expert, rows[start:stop])
        start = stop
    return out


def expert_statistics(
    y: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    valid: torch.Tensor,
    num_experts: int,
    total_tokens: torch.Tensor,
) -> BatchStats:
    """Per-expert REAP sums over the rows ``y`` (S, H) of routed pairs; ``valid`` excludes padding."""
    norms = torch.linalg.vector_norm(y.float(), dim=-1)  # (S,) fp32, as upstream's fp32 activations
    weight = valid.to(torch.float64)
    norms64 = norms.to(torch.float64) * weight
    gates64 = gates.to(torch.float64) * weight
    zeros = torch.zeros(num_experts, dtype=torch.float64, device=y.device)
    row_max = torch.where(valid, y.float().amax(dim=-1), float("-inf"))
    max_activations = torch.full((num_experts,), float("-inf"), device=y.device).scatter_reduce_(
        0, expert_ids, row_max, reduce="amax"
    )
    return BatchStats(
        total_tokens=total_tokens,
        expert_frequency=torch.zeros(num_experts, dtype=torch.int64, device=y.device).index_add_(
            0, expert_ids, valid.long()
        ),
        ean_sum=zeros.clone().index_add_(0, expert_ids, norms64),
        weighted_ean_sum=zeros.clone().index_add_(0, expert_ids, norms64 * gates64),
        weighted_expert_frequency_sum=zeros.clone().index_add_(0, expert_ids, gates64),
        max_activations=max_activations,
    )


def reference_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gates: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    accumulator: LayerAccumulator | None = None,
) -> tuple[torch.Tensor, BatchStats | None]:
    """Routed MoE forward of ``experts`` for (T, H) ``hidden_states``; statistics when ``gates`` is given.

    ``gates`` (T, k) fp32 is REAP's g per routed pair; ``token_mask`` (T,) bool marks the tokens counted
    in the statistics (None: all). Returns the layer output (T, H) and :class:`BatchStats` or None;
    with ``accumulator`` the statistics are added into it and None is returned in their place.
    """
    num_tokens, top_k = top_k_index.shape
    num_experts = int(experts.down_proj.shape[0])
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, order = torch.sort(expert_ids, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_experts).tolist()  # the one host sync
    rows = hidden_states[order // top_k]
    y_sorted = expert_output_rows(experts, rows, counts)

    stats = None
    if gates is not None:
        if token_mask is None:
            token_mask = torch.ones(num_tokens, dtype=torch.bool, device=hidden_states.device)
        token_mask = token_mask.to(hidden_states.device)  # layers may sit on different GPUs
        valid = token_mask.reshape(-1)[order // top_k]
        stats = expert_statistics(
            y_sorted,
            sorted_ids,
            gates.reshape(-1)[order],
            valid,
            num_experts,
            token_mask.sum().to(torch.int64),
        )

    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    weighted = y * top_k_weights.reshape(-1, 1)
    out = weighted.view(num_tokens, top_k, -1).sum(dim=1)
    if accumulator is not None and stats is not None:
        accumulator.add(stats)
        stats = None
    return out.to(hidden_states.dtype), stats
