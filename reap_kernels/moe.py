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

``fused_moe`` validates every input (one-line ``ValueError`` messages) and launches the five steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .align import align_by_expert
from .combine import combine
from .config import INTERPRET, MoEConfig, get_config
from .down_proj import down_projection
from .expert_stats import check_accumulators, expert_statistics, statistics_buffers
from .gate_up import ACTIVATIONS, gate_up_activation

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def fused_moe(
    hidden_states: torch.Tensor,  # (T, H) fp16/bf16/fp32
    w_gate_up: torch.Tensor,  # (E, 2I, H) or transposed (E, H, 2I), dtype of hidden_states
    w_down: torch.Tensor,  # (E, H, I) or transposed (E, I, H), dtype of hidden_states
    top_k_index: torch.Tensor,  # (T, k) integer expert ids in [0, E)
    top_k_weights: torch.Tensor,  # (T, k) float routing weights
    layout: ExpertsLayout = ExpertsLayout(),
    b_gate_up: torch.Tensor | None = None,  # (E, 2I)
    b_down: torch.Tensor | None = None,  # (E, H)
    gates: torch.Tensor | None = None,  # (T, k) float: REAP g; statistics are computed when given
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
    gains ``count[i] + count[j]``) and ``stats`` is ``accumulators``.

    Launches: 2 (alignment) + gate_up + down + combine (+ 1 statistics kernel); no host synchronisation.
    Every launch runs on the device of ``hidden_states`` (not the current CUDA device), with the block
    sizes looked up for that device's name.
    """
    _check(hidden_states.dim() == 2, f"hidden_states must be (T, H), got shape {tuple(hidden_states.shape)}")
    dtype, device = hidden_states.dtype, hidden_states.device
    _check(dtype in SUPPORTED_DTYPES, f"hidden_states dtype {dtype} is not supported (fp16, bf16, fp32)")
    _check(layout.activation in ACTIVATIONS, f"unsupported activation {layout.activation!r}; supported: {', '.join(ACTIVATIONS)}")
    num_tokens, hidden_size = hidden_states.shape
    for name, weight in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        _check(weight.dim() == 3, f"{name} must be 3-D (E, out, in), got shape {tuple(weight.shape)}")
        _check(weight.dtype == dtype, f"{name} dtype {weight.dtype} differs from hidden_states dtype {dtype}")
        _check(weight.device == device, f"{name} is on {weight.device}, hidden_states on {device}")
    num_experts = w_gate_up.shape[0]
    gate_up_in, two_i = (w_gate_up.shape[1], w_gate_up.shape[2]) if layout.transposed else (w_gate_up.shape[2], w_gate_up.shape[1])
    _check(gate_up_in == hidden_size, f"w_gate_up shape {tuple(w_gate_up.shape)} does not match hidden size {hidden_size} (transposed={layout.transposed})")
    _check(two_i % 2 == 0 and two_i > 0, f"w_gate_up has {two_i} gate+up columns, expected an even number")
    inter_size = two_i // 2
    expected_down = (num_experts, inter_size, hidden_size) if layout.transposed else (num_experts, hidden_size, inter_size)
    _check(tuple(w_down.shape) == expected_down, f"w_down shape {tuple(w_down.shape)}, expected {expected_down}")
    for name, bias, size in (("b_gate_up", b_gate_up, two_i), ("b_down", b_down, hidden_size)):
        if bias is not None:
            _check(tuple(bias.shape) == (num_experts, size), f"{name} shape {tuple(bias.shape)}, expected {(num_experts, size)}")
            _check(bias.dtype == dtype and bias.device == device, f"{name} must be {dtype} on {device}")
    _check(top_k_index.dim() == 2 and top_k_index.shape[0] == num_tokens,
           f"top_k_index must be (T={num_tokens}, k), got shape {tuple(top_k_index.shape)}")
    _check(not top_k_index.is_floating_point() and top_k_index.dtype != torch.bool,
           f"top_k_index must hold integer expert ids, got {top_k_index.dtype}")
    top_k = top_k_index.shape[1]
    _check(top_k >= 1, "top_k_index has no slots (k = 0)")
    _check(tuple(top_k_weights.shape) == (num_tokens, top_k),
           f"top_k_weights shape {tuple(top_k_weights.shape)}, expected {(num_tokens, top_k)}")
    _check(top_k_weights.is_floating_point() and top_k_weights.dtype in SUPPORTED_DTYPES + (torch.float64,),
           f"top_k_weights dtype {top_k_weights.dtype} is not a supported float type")
    _check(top_k_weights.dtype != torch.float64, "top_k_weights is float64; pass fp32 or the model dtype")
    for name, tensor in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        _check(tensor.device == device, f"{name} is on {tensor.device}, hidden_states on {device}")
    if gates is not None:
        _check(tuple(gates.shape) == (num_tokens, top_k), f"gates shape {tuple(gates.shape)}, expected {(num_tokens, top_k)}")
        _check(gates.is_floating_point() and gates.device == device, f"gates must be a float tensor on {device}")
    if token_mask is not None:
        _check(gates is not None, "token_mask is only used with statistics (pass gates)")
        _check(token_mask.numel() == num_tokens, f"token_mask has {token_mask.numel()} entries, expected T={num_tokens}")
        _check(token_mask.dtype == torch.bool and token_mask.device == device, f"token_mask must be bool on {device}")
    if accumulators is not None:
        _check(gates is not None, "accumulators are only used with statistics (pass gates)")
        check_accumulators(accumulators, num_experts, device)
    if config is None:
        config = get_config(num_experts, hidden_size, inter_size, top_k, num_tokens, dtype, device=device)
    config.validate()

    if num_tokens == 0:
        stats = None
        if gates is not None:
            stats = accumulators if accumulators is not None else statistics_buffers(num_experts, device, filled=True)
        return hidden_states.new_zeros(0, hidden_size), stats
    with device_guard(device):
        upcast = INTERPRET  # the interpreter's bf16 math is wrong: compute on fp32 tiles there
        alignment = align_by_expert(top_k_index, num_experts, config.block_m)
        intermediate = gate_up_activation(
            hidden_states, w_gate_up, b_gate_up, alignment.sorted_pair_ids, alignment.block_expert,
            alignment.max_blocks, top_k, transposed=layout.transposed, interleaved=layout.interleaved,
            activation=layout.activation, alpha=layout.alpha, limit=layout.limit, gemm=config.gate_up,
            block_m=config.block_m, upcast=upcast,
        )
        y = down_projection(
            intermediate, w_down, b_down, alignment.sorted_pair_ids, alignment.block_expert, alignment.max_blocks,
            transposed=layout.transposed, gemm=config.down, block_m=config.block_m, upcast=upcast,
        )
        out, pair_norm, pair_max = combine(
            y, top_k_weights, dtype, with_stats=gates is not None,
            block_h=config.combine_block_h, num_warps=config.combine_num_warps,
        )
        if gates is None:
            return out, None
        mask = None if token_mask is None else token_mask.reshape(-1)
        stats = expert_statistics(alignment, pair_norm, pair_max, gates, mask, top_k, accumulators)
        return out, stats


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the launches (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
