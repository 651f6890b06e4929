"""The fused MoE forward with optional REAP statistics: align -> gate_up+act -> down -> combine -> expert stats.

    hidden (T, H) ─┐
    top_k_index ───┼─ align.py ──> sorted_pair_ids, block_expert      (pairs sorted by expert, padded)
                   │
                   └─ gate_up.py ─> h (S, I)   act(x W_gate) * (x W_up), rows = pair ids
                      down_proj.py ─> y (S, H)  h W_down (+ bias), unweighted
                      combine.py ──> out (T, H) sum_slot y * w        and, with statistics on,
                                     ||y|| and max(y) of every pair (T*k,)
                      expert_stats.py ─> count / ean / weighted_ean / gate_sum / max per expert
                                     (one program per expert over its sorted pairs: no atomics)

``fused_moe`` validates every input (``validate.py``: one-line ``ValueError`` messages, ``UnsupportedInputError``
for dtypes the kernels do not take; checked once per input signature) and launches the five steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .align import align_by_expert
from .combine import combine
from .config import INTERPRET, MoEConfig
from .down_proj import down_projection
from .expert_stats import expert_statistics, statistics_buffers
from .gate_up import gate_up_activation
from .router_gate import RouterGate
from .registered import ACCUMULATOR_NAMES, STATS_NAMES, config_to_ints, fused_moe_op, layout_to_str
from .validate import SUPPORTED_DTYPES, UnsupportedInputError, plan_call  # noqa: F401 (re-exported)



@dataclass(frozen=True)
class ExpertsLayout:
    """How the expert weights are stored and which gated activation they use.

    transposed:  gate_up (E, H, 2I) and down (E, I, H) instead of (E, 2I, H) and (E, H, I)
    interleaved: gate/up columns alternate (gate0, up0, gate1, ...) instead of [gate; up]
    activation:  "silu" (silu(gate) * up) or "gpt_oss_swiglu" ((clamp(up) + 1) * g * sigmoid(alpha g))
    """

    transposed: bool = False
    interleaved: bool = False
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0


def fused_moe(
    hidden_states: torch.Tensor,  # (T, H) fp16/bf16/fp32
    w_gate_up: torch.Tensor,  # (E, 2I, H) or transposed (E, H, 2I), dtype of hidden_states
    w_down: torch.Tensor,  # (E, H, I) or transposed (E, I, H), dtype of hidden_states
    top_k_index: torch.Tensor,  # (T, k) integer expert ids in [0, E)
    top_k_weights: torch.Tensor,  # (T, k) float routing weights
    layout: ExpertsLayout = ExpertsLayout(),
    b_gate_up: torch.Tensor | None = None,  # (E, 2I)
    b_down: torch.Tensor | None = None,  # (E, H)
    gates: torch.Tensor | RouterGate | None = None,  # (T, k) float REAP g, or the router logits; statistics when given
    token_mask: torch.Tensor | None = None,  # (T,) bool: tokens counted in the statistics (None: all)
    config: MoEConfig | None = None,
    accumulators: dict[str, torch.Tensor] | None = None,  # running totals the statistics are added into
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Routed MoE forward; returns ``(out (T, H) in the input dtype, stats or None)``.

    ``stats`` (only when ``gates`` is given) holds per-expert (E,) tensors: ``count`` int64,
    ``ean_sum``, ``weighted_ean_sum``, ``gate_sum`` fp64 and ``max_activation`` fp32 (-inf for experts
    without counted pairs), plus ``tokens`` () int64, the number of counted tokens. They are bitwise
    reproducible: no float atomics, a summation order fixed by the routing. With ``accumulators``
    (tensors of those names, dtypes and shapes, optionally ``pairwise`` (E, E) int64) the statistics
    kernel adds this call's statistics into them (maximum for ``max_activation``; ``pairwise[i, j]``
    gains ``count[i] + count[j]``) and ``stats`` is ``accumulators``. ``gates`` may be a
    :class:`~reap_kernels.router_gate.RouterGate` (the router's logits): the combine kernel then computes
    REAP's g itself (no router GEMM, softmax or gather outside the kernels).

    Launches: alignment + gate_up + down + combine (+ statistics kernel, + a zero fill of ``tokens``
    without ``accumulators``); no host synchronisation.
    Every launch runs on the device of ``hidden_states`` (not the current CUDA device), with the block
    sizes looked up for that device's name.
    """
    weights = (w_gate_up, w_down, b_gate_up, b_down)
    routing = (top_k_index, top_k_weights, gates, token_mask)
    if torch.compiler.is_compiling():  # one opaque node for the compiler (registered.py)
        return _call_registered(hidden_states, weights, routing, layout, config, accumulators)
    return run_fused_moe(hidden_states, weights, routing, layout, config, accumulators)


def _call_registered(hidden_states, weights, routing, layout, config, accumulators):
    totals = [] if accumulators is None else [accumulators[name] for name in ACCUMULATOR_NAMES if name in accumulators]
    top_k_index, top_k_weights, gates, token_mask = routing
    source = gates.source() if isinstance(gates, RouterGate) else 0
    routing = [top_k_index, top_k_weights, gates.logits if source else gates, token_mask]
    out, *stats = fused_moe_op(hidden_states, list(weights), routing, totals, layout_to_str(layout),
                               config_to_ints(config), source)
    if routing[2] is None:
        return out, None
    return out, accumulators if accumulators is not None else dict(zip(STATS_NAMES, stats))


def run_fused_moe(
    hidden_states: torch.Tensor,
    weights: tuple,  # (w_gate_up, w_down, b_gate_up | None, b_down | None)
    routing: tuple,  # (top_k_index, top_k_weights, gates | None, token_mask | None)
    layout: ExpertsLayout,
    config: MoEConfig | None,
    accumulators: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """:func:`fused_moe` with its tensors grouped: checks (cached per signature), then the launches."""
    w_gate_up, w_down, b_gate_up, b_down = weights
    top_k_index, top_k_weights, gates, token_mask = routing
    plan = plan_call(hidden_states, weights, routing, layout, config, accumulators)
    num_tokens, hidden_size, num_experts, top_k, config = (
        plan.num_tokens, plan.hidden_size, plan.num_experts, plan.top_k, plan.config)
    dtype, device = hidden_states.dtype, hidden_states.device
    if num_tokens == 0:
        stats = None
        if gates is not None:
            stats = accumulators if accumulators is not None else statistics_buffers(num_experts, device, filled=True)
        return hidden_states.new_zeros(0, hidden_size), stats
    with device_guard(device):
        upcast = INTERPRET  # the interpreter's bf16 math is wrong: compute on fp32 tiles there
        alignment = align_by_expert(top_k_index, num_experts, config.block_m)
        num_pairs = alignment.num_pairs
        workspace = torch.empty(num_pairs * (plan.inter_size + hidden_size), dtype=dtype, device=device)  # h | y
        gate_up_activation(hidden_states, w_gate_up, b_gate_up, alignment, workspace, layout, config.gate_up, upcast)
        down_projection(workspace, w_down, b_down, alignment, layout.transposed, config.down, upcast)
        router = (gates, top_k_index) if isinstance(gates, RouterGate) else None
        out, pairs = combine(workspace, num_pairs * plan.inter_size, top_k_weights, gates is not None, router, config)
        if gates is None:
            return out, None
        mask = None if token_mask is None else token_mask if token_mask.dim() == 1 else token_mask.reshape(-1)
        stats = expert_statistics(alignment, pairs, None if router is not None else gates, mask, top_k, accumulators)
        return out, stats


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the launches (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
