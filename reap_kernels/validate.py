"""Input checks of ``fused_moe``, cached per shape, dtype and device, and the call's :class:`Plan`.

A call's inputs are summarised by a key (shapes, dtypes and devices of every tensor, the layout, the
config); the first call with a key runs every check and looks up the block sizes, later calls with the
same key find the :class:`Plan` in a dict. Error messages are formatted only when a check fails.

Two error classes: :class:`UnsupportedInputError` for inputs the kernels cannot compute although they
are valid PyTorch (a dtype the kernels do not take, weights in another dtype than the activations):
an engine that can fall back to PyTorch should; ``ValueError`` for inputs that are wrong for any engine
(shapes that do not fit). ``UnsupportedInputError`` derives from ``ValueError``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .config import MoEConfig, get_config
from .expert_stats import check_accumulators
from .gate_up import ACTIVATIONS
from .router_gate import RouterGate

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_PLANS = 4096  # distinct input signatures kept; the dict starts afresh beyond


class UnsupportedInputError(ValueError):
    """Inputs the kernels cannot compute (dtypes): valid for PyTorch, so a caller may fall back to it."""


@dataclass
class Plan:
    """What the launches need from a validated call: the layer's sizes and the block sizes (and, set by
    ``moe.py`` on the first launch, the launch parameters)."""

    num_tokens: int
    hidden_size: int
    num_experts: int
    inter_size: int
    top_k: int
    config: MoEConfig
    launches: object = field(default=None, compare=False, repr=False)  # moe.Launches, built on the first launch


def _check(condition: bool, template: str, *args: object) -> None:
    if not condition:
        raise ValueError(template.format(*args))


def _check_dtype(condition: bool, template: str, *args: object) -> None:
    if not condition:
        raise UnsupportedInputError(template.format(*args))


def _gates_signature(gates: torch.Tensor | RouterGate) -> tuple:
    """A gate tensor's (shape, dtype, device), or a RouterGate's: its logits' and whether it renormalises."""
    if type(gates) is not RouterGate:
        return gates.shape, gates.dtype, gates.device
    logits = gates.logits
    return logits.shape, logits.dtype, logits.device, gates.renormalize


_plans: dict[tuple, Plan] = {}


TENSOR_NAMES = ("w_gate_up", "w_down", "b_gate_up", "b_down", "top_k_index", "top_k_weights", "gates", "token_mask")


def plan_call(hidden_states: torch.Tensor, weights: tuple, routing: tuple, layout, config: MoEConfig | None,
              accumulators: dict[str, torch.Tensor] | None) -> Plan:
    """The :class:`Plan` of a ``fused_moe`` call (checked once per input signature), or raise.

    ``weights`` is (w_gate_up, w_down, b_gate_up, b_down), ``routing`` (top_k_index, top_k_weights, gates,
    token_mask), None where absent.
    """
    w_gate_up, w_down, b_gate_up, b_down = weights
    top_k_index, top_k_weights, gates, token_mask = routing
    key = (  # flat: one tuple, no per-tensor tuples for the tensors every call has
        layout, config, None if accumulators is None else tuple(accumulators),
        # the accumulator tensors by identity (they are created once per layer and updated in place); a key
        # is dropped when one of its tensors is freed, before its id can be reused (weakref.finalize below)
        None if accumulators is None else tuple(map(id, accumulators.values())),
        hidden_states.shape, hidden_states.dtype, hidden_states.device,
        w_gate_up.shape, w_gate_up.dtype, w_gate_up.device, w_down.shape, w_down.dtype, w_down.device,
        top_k_index.shape, top_k_index.dtype, top_k_index.device,
        top_k_weights.shape, top_k_weights.dtype, top_k_weights.device,
        None if b_gate_up is None else (b_gate_up.shape, b_gate_up.dtype, b_gate_up.device),
        None if b_down is None else (b_down.shape, b_down.dtype, b_down.device),
        None if gates is None else _gates_signature(gates),
        None if token_mask is None else (token_mask.shape, token_mask.dtype, token_mask.device),
    )
    plan = _plans.get(key)
    if plan is None:
        tensors = dict(zip(TENSOR_NAMES, (*weights, *routing)), hidden_states=hidden_states)
        plan = _validate(tensors, layout, config, accumulators)
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
        for tensor in (accumulators or {}).values():
            weakref.finalize(tensor, _plans.pop, key, None)
    return plan


def _validate(tensors: dict[str, torch.Tensor | None], layout, config: MoEConfig | None,
              accumulators: dict[str, torch.Tensor] | None) -> Plan:
    hidden = tensors["hidden_states"]
    _check(hidden.dim() == 2, "hidden_states must be (T, H), got shape {}", tuple(hidden.shape))
    dtype, device = hidden.dtype, hidden.device
    _check_dtype(dtype in SUPPORTED_DTYPES, "hidden_states dtype {} is not supported (fp16, bf16, fp32)", dtype)
    _check(layout.activation in ACTIVATIONS, "unsupported activation {!r}; supported: {}", layout.activation, ", ".join(ACTIVATIONS))
    num_tokens, hidden_size = hidden.shape
    for name in ("w_gate_up", "w_down"):
        weight = tensors[name]
        _check(weight.dim() == 3, "{} must be 3-D (E, out, in), got shape {}", name, tuple(weight.shape))
        _check_dtype(weight.dtype == dtype, "{} dtype {} differs from hidden_states dtype {}", name, weight.dtype, dtype)
        _check(weight.device == device, "{} is on {}, hidden_states on {}", name, weight.device, device)
    w_gate_up, w_down = tensors["w_gate_up"], tensors["w_down"]
    num_experts = w_gate_up.shape[0]
    gate_up_in, two_i = (w_gate_up.shape[1], w_gate_up.shape[2]) if layout.transposed else (w_gate_up.shape[2], w_gate_up.shape[1])
    _check(gate_up_in == hidden_size, "w_gate_up shape {} does not match hidden size {} (transposed={})",
           tuple(w_gate_up.shape), hidden_size, layout.transposed)
    _check(two_i % 2 == 0 and two_i > 0, "w_gate_up has {} gate+up columns, expected an even number", two_i)
    inter_size = two_i // 2
    expected_down = (num_experts, inter_size, hidden_size) if layout.transposed else (num_experts, hidden_size, inter_size)
    _check(tuple(w_down.shape) == expected_down, "w_down shape {}, expected {}", tuple(w_down.shape), expected_down)
    for name, size in (("b_gate_up", two_i), ("b_down", hidden_size)):
        bias = tensors[name]
        if bias is not None:
            _check(tuple(bias.shape) == (num_experts, size), "{} shape {}, expected {}", name, tuple(bias.shape), (num_experts, size))
            _check(bias.device == device, "{} must be on {}", name, device)
            _check_dtype(bias.dtype == dtype, "{} dtype {} differs from hidden_states dtype {}", name, bias.dtype, dtype)
    top_k = _check_routing(tensors, num_tokens, device)
    _check_statistics(tensors, (num_tokens, top_k, num_experts), device)
    if accumulators is not None:
        _check(tensors["gates"] is not None, "accumulators are only used with statistics (pass gates)")
        check_accumulators(accumulators, num_experts, device)
    if config is None:
        config = get_config(num_experts, hidden_size, inter_size, top_k, num_tokens, dtype, device=device)
    config.validate()
    return Plan(num_tokens, hidden_size, num_experts, inter_size, top_k, config)


def _check_routing(tensors: dict[str, torch.Tensor | None], num_tokens: int, device: torch.device) -> int:
    """Check top_k_index and top_k_weights; return k."""
    index, weights = tensors["top_k_index"], tensors["top_k_weights"]
    _check(index.dim() == 2 and index.shape[0] == num_tokens, "top_k_index must be (T={}, k), got shape {}",
           num_tokens, tuple(index.shape))
    _check(not index.is_floating_point() and index.dtype != torch.bool, "top_k_index must hold integer expert ids, got {}", index.dtype)
    top_k = index.shape[1]
    _check(top_k >= 1, "top_k_index has no slots (k = 0)")
    _check(tuple(weights.shape) == (num_tokens, top_k), "top_k_weights shape {}, expected {}", tuple(weights.shape), (num_tokens, top_k))
    _check_dtype(weights.dtype in SUPPORTED_DTYPES, "top_k_weights dtype {} is not supported (fp16, bf16, fp32)", weights.dtype)
    for name, tensor in (("top_k_index", index), ("top_k_weights", weights)):
        _check(tensor.device == device, "{} is on {}, hidden_states on {}", name, tensor.device, device)
    return top_k


def _check_statistics(tensors: dict, sizes: tuple[int, int, int], device: torch.device) -> None:
    """Check gates (a (T, k) tensor or a RouterGate of (T, E) logits) and token_mask; ``sizes`` is (T, k, E)."""
    num_tokens, top_k, num_experts = sizes
    gates, token_mask = tensors["gates"], tensors["token_mask"]
    if isinstance(gates, RouterGate):
        logits = gates.logits
        _check(logits.dim() == 2 and logits.shape[0] == num_tokens and logits.shape[1] == num_experts,
               "router logits shape {}, expected {}", tuple(logits.shape), (num_tokens, num_experts))
        _check(logits.device == device, "router logits must be on {}, got {}", device, logits.device)
        _check_dtype(logits.dtype in SUPPORTED_DTYPES, "router logits dtype {} is not supported (fp16, bf16, fp32)", logits.dtype)
    elif gates is not None:
        _check(tuple(gates.shape) == (num_tokens, top_k), "gates shape {}, expected {}", tuple(gates.shape), (num_tokens, top_k))
        _check(gates.device == device, "gates must be on {}, got {}", device, gates.device)
        _check_dtype(gates.is_floating_point(), "gates must be a float tensor, got {}", gates.dtype)
    if token_mask is not None:
        _check(gates is not None, "token_mask is only used with statistics (pass gates)")
        _check(token_mask.numel() == num_tokens, "token_mask has {} entries, expected T={}", token_mask.numel(), num_tokens)
        _check(token_mask.dtype == torch.bool and token_mask.device == device, "token_mask must be bool on {}", device)
