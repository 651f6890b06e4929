"""``fused_moe`` as a PyTorch custom op (``torch.ops.reap_kernels.fused_moe``), for torch.compile and CUDA graphs.

Eager calls of :func:`reap_kernels.fused_moe` run the kernels directly (no dispatcher on the hot path);
while torch.compile traces, ``fused_moe`` calls this op instead, which the compiler keeps as one opaque
node: its fake implementation gives the output shapes without running anything, so the config lookup,
the checks and the launches are never traced (no graph breaks).

The op's arguments are flat (the schema has no dicts or dataclasses): the weights and the routing as
lists of optional tensors, the layout as a short string, the block sizes as a list of ints, and the
running totals as a list of tensors in :data:`ACCUMULATOR_NAMES` order (empty: none) that the op mutates in place.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from .config import GemmConfig, MoEConfig
from .expert_stats import PAIRWISE_KEY, STATISTICS_DTYPES
from .router_gate import RouterGate

ACCUMULATOR_NAMES = ("total_tokens", *STATISTICS_DTYPES, PAIRWISE_KEY)  # the pairwise total is optional (last)
STATS_NAMES = ("total_tokens", *STATISTICS_DTYPES)


def config_to_ints(config: MoEConfig | None) -> list[int] | None:
    """``config`` as the op's int list (block_m, gate_up fields, down fields, combine block and warps)."""
    if config is None:
        return None
    gemm = [(g.block_n, g.block_k, g.group_m, g.num_warps, g.num_stages) for g in (config.gate_up, config.down)]
    return [config.block_m, *gemm[0], *gemm[1], config.combine_block_h, config.combine_num_warps]


def config_from_ints(values: list[int] | None) -> MoEConfig | None:
    if values is None:
        return None
    return MoEConfig(block_m=values[0], gate_up=GemmConfig(*values[1:6]), down=GemmConfig(*values[6:11]),
                     combine_block_h=values[11], combine_num_warps=values[12])


def layout_to_str(layout) -> str:
    """An ``ExpertsLayout`` as the op's string: 'transposed,interleaved,activation,alpha,limit'."""
    return f"{int(layout.transposed)},{int(layout.interleaved)},{layout.activation},{layout.alpha!r},{layout.limit!r}"


@lru_cache(maxsize=64)
def layout_from_str(text: str):
    from .moe import ExpertsLayout

    transposed, interleaved, activation, alpha, limit = text.split(",")
    return ExpertsLayout(bool(int(transposed)), bool(int(interleaved)), activation, float(alpha), float(limit))


@torch.library.custom_op("reap_kernels::fused_moe", mutates_args=("accumulators",))
def fused_moe_op(
    hidden_states: torch.Tensor,
    weights: list[Optional[torch.Tensor]],  # w_gate_up, w_down, b_gate_up, b_down
    routing: list[Optional[torch.Tensor]],  # top_k_index, top_k_weights, gates, token_mask
    accumulators: list[torch.Tensor],  # empty: no running totals
    layout: str,
    config: Optional[list[int]],
    gate_source: int,  # routing[2] is: 0 the gates, 1 router logits (softmax), 2 router logits (renormalised)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed MoE forward; returns ``out`` and the statistics in :data:`STATS_NAMES` order (empty
    tensors without gates, and when the statistics went into ``accumulators``: the compiler's
    functionalisation wants a fixed number of plain tensor outputs)."""
    from .moe import run_fused_moe

    totals = dict(zip(ACCUMULATOR_NAMES, accumulators)) if accumulators else None
    top_k_index, top_k_weights, gates, token_mask = routing
    if gates is not None:
        gates = RouterGate.from_source(gates, gate_source)
    out, stats = run_fused_moe(hidden_states, tuple(weights), (top_k_index, top_k_weights, gates, token_mask),
                               layout_from_str(layout), config_from_ints(config), totals)
    if stats is None or accumulators:
        return out, *_empty_stats(hidden_states)
    return out, *(stats[name] for name in STATS_NAMES)


def _empty_stats(like: torch.Tensor) -> list[torch.Tensor]:
    return [like.new_empty(0, dtype=dtype) for dtype in (torch.int64, *STATISTICS_DTYPES.values())]


@fused_moe_op.register_fake
def _(hidden_states, weights, routing, accumulators, layout, config, gate_source):
    num_tokens, hidden_size = hidden_states.shape
    out = hidden_states.new_empty(num_tokens, hidden_size)
    if routing[2] is None or accumulators:
        return out, *_empty_stats(hidden_states)
    num_experts = weights[0].shape[0]
    stats = [hidden_states.new_empty((), dtype=torch.int64)]
    stats += [hidden_states.new_empty(num_experts, dtype=dtype) for dtype in STATISTICS_DTYPES.values()]
    return out, *stats
