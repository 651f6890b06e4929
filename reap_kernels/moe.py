"""The fused MoE forward with optional REAP statistics: align -> gate_up+act -> down -> combine -> expert stats.

    hidden (T, H) ─┐
    top_k_index ───┼─ align.py ──> sorted_pair_ids, block_expert      (pairs sorted by expert, padded)
                   │
                   └─ gate_up.py ─> h (S, I)   act(x W_gate) * (x W_up), rows = pair ids
                      down_proj.py ─> y (S, H)  h W_down (+ bias), unweighted
                      combine.py ──> out (T, H) sum_slot y * w        and, with statistics on,
                                     ||y|| and max(y) of every pair (T*k,)
                      expert_stats.py ─> the statistics per expert, under upstream's file keys
                                     (one program per expert over its sorted pairs: no atomics)

``fused_moe`` validates every input (``validate.py``: one-line ``ValueError`` messages, ``UnsupportedInputError``
for dtypes the kernels do not take; checked once per input signature) and launches the five steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .align import align_launch, align_pairs
from .combine import combine, combine_launch
from .config import INTERPRET, CachedHash, MoEConfig
from .down_proj import down_launch, down_projection
from .expert_stats import expert_statistics, statistics_buffers
from .gate_up import gate_up_activation, gate_up_launch
from .router_gate import RouterGate
from .registered import ACCUMULATOR_NAMES, STATS_NAMES, config_to_ints, fused_moe_op, layout_to_str
from .validate import SUPPORTED_DTYPES, Plan, UnsupportedInputError, plan_call  # noqa: F401 (re-exported)



@dataclass(frozen=True)
class ExpertsLayout(CachedHash):
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
    __hash__ = CachedHash.__hash__


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

    ``stats`` (only when ``gates`` is given) holds, under the keys of upstream's observation files,
    per-expert (E,) tensors: ``expert_frequency`` int64, ``ean_sum``, ``weighted_ean_sum``,
    ``weighted_expert_frequency_sum`` fp64 and ``max_activations`` fp32 (-inf for experts without counted
    pairs), plus ``total_tokens`` () int64, the number of counted tokens. They are bitwise
    reproducible: no float atomics, a summation order fixed by the routing. With ``accumulators``
    (tensors of those names, dtypes and shapes, optionally ``pairwise_expert_frequency`` (E, E) int64) the
    statistics kernel adds this call's statistics into them (maximum for ``max_activations``;
    ``pairwise_expert_frequency[i, j]`` gains ``expert_frequency[i] + expert_frequency[j]``) and ``stats`` is ``accumulators``. ``gates`` may be a
    :class:`~reap_kernels.router_gate.RouterGate` (the router's logits): the combine kernel then computes
    REAP's g itself (no router GEMM, softmax or gather outside the kernels).

    Launches: alignment + gate_up + down + combine (+ statistics kernel, + a zero fill of ``total_tokens``
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


@dataclass(frozen=True)
class Launches:
    """The launch parameters of one call signature (grids, constexprs, buffer sizes), built on its first call."""

    align: tuple
    gate_up: tuple
    down: tuple
    combine: tuple
    workspace: int  # elements of h | y


def _launches(plan: Plan, layout: ExpertsLayout, dtypes: tuple, has_bias: bool, gates) -> Launches:
    """The :class:`Launches` of a call with ``plan`` (the gate kind and renormalisation are part of its key);
    ``dtypes`` is (hidden_states dtype, top_k_weights dtype)."""
    config, num_pairs = plan.config, plan.num_tokens * plan.top_k
    align = align_launch(num_pairs, plan.num_experts, config.block_m)
    sizes = (config.block_m, align[0], plan.hidden_size, plan.inter_size)
    dtype, upcast = dtypes[0], INTERPRET  # the interpreter's bf16 math is wrong: compute on fp32 tiles there
    renormalize = gates.renormalize if isinstance(gates, RouterGate) else None
    return Launches(
        align=align,
        gate_up=gate_up_launch(layout, has_bias, dtype, upcast, config.gate_up, sizes),
        down=down_launch(has_bias, dtype, upcast, config.down, sizes),
        combine=combine_launch(dtypes, (plan.top_k, plan.num_experts, plan.hidden_size), gates is not None,
                              renormalize, config),
        workspace=num_pairs * (plan.inter_size + plan.hidden_size),
    )


def run_fused_moe(
    hidden_states: torch.Tensor,
    weights: tuple,  # (w_gate_up, w_down, b_gate_up | None, b_down | None)
    routing: tuple,  # (top_k_index, top_k_weights, gates | None, token_mask | None)
    layout: ExpertsLayout,
    config: MoEConfig | None,
    accumulators: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """:func:`fused_moe` with its tensors grouped: checks (cached per signature), then the launches."""
    plan = plan_call(hidden_states, weights, routing, layout, config, accumulators)
    w_gate_up, w_down, b_gate_up, b_down = weights
    top_k_index, top_k_weights, gates, token_mask = routing
    if plan.num_tokens == 0:
        stats = None
        if gates is not None:
            device = hidden_states.device
            stats = accumulators if accumulators is not None else statistics_buffers(plan.num_experts, device, filled=True)
        return hidden_states.new_zeros(0, plan.hidden_size), stats
    launches = plan.launches
    if launches is None:
        launches = plan.launches = _launches(plan, layout, (hidden_states.dtype, top_k_weights.dtype),
                                             b_gate_up is not None, gates)
    device = hidden_states.device
    with device_guard(device):
        alignment = align_pairs(top_k_index, plan.num_experts, launches.align)
        workspace = torch.empty(launches.workspace, dtype=hidden_states.dtype, device=device)  # h | y
        gate_up_activation(hidden_states, w_gate_up, b_gate_up, alignment, workspace, layout, launches.gate_up)
        down_projection(workspace, w_down, b_down, alignment, layout.transposed, launches.down)
        router = (gates, top_k_index) if type(gates) is RouterGate else None
        out = combine(workspace, alignment.num_pairs * plan.inter_size, top_k_weights,
                      None if gates is None else alignment, router, launches.combine)
        if gates is None:
            return out, None
        mask = None if token_mask is None else token_mask if token_mask.dim() == 1 else token_mask.reshape(-1)
        stats = expert_statistics(alignment, None, None if router is not None else gates, mask, plan.top_k, accumulators)
        return out, stats


_NO_GUARD = contextlib.nullcontext()  # reusable: nothing to enter off CUDA


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the launches (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_GUARD
