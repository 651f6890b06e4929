"""The Triton engine: the routed MoE forward and the REAP statistics in fused Triton kernels.

Same signature and semantics as :func:`reap_fast.observe.reference.reference_experts_forward`; the
kernels live in ``reap_kernels`` (folder ``reap_kernels/``). The weights and the layout flags are read from
the transformers experts module (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``,
``has_post_expert_norm`` and its ``_apply_gate``); what the kernels compute for it is the
:class:`~reap_fast.models.KernelLayout` of the family whose entry names the class of that ``_apply_gate``
(transformers' default gate, silu(gate) * up on concatenated [gate; up], unless a family names its own).
Anything the kernels cannot compute (the layouts above, dtypes: mixed, or other than fp16/bf16/fp32) raises
``EngineUnavailableError`` with the reason, before any launch. Forward only (no autograd).

A layout with interleaved gate and up columns (gate0, up0, gate1, ...; gpt-oss) is read as it is: the
gate_up kernel's weight tile interleaves gate and up columns itself, so for gpt-oss's transposed weights
an interleaved pair of columns is contiguous in memory. The module's weights are never rewritten.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EngineUnavailableError
from ..metrics import BatchStats, LayerAccumulator
from ..models import kernel_layout


def _unavailable(message: str) -> Exception:
    return EngineUnavailableError(message)


def _import_kernels():
    try:
        import reap_kernels
    except ImportError as exc:  # triton missing, or the package not installed
        raise _unavailable(f"the triton engine needs triton and the reap_kernels package: {exc}") from None
    return reap_kernels


def _is_silu(act_fn: object) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLUActivation", "SiLU")


@torch.compiler.assume_constant_result  # torch.compile cannot trace __qualname__: it calls this once, eagerly
def _gate_class(experts_class: type) -> str | None:
    """The class that defines ``_apply_gate`` (None: transformers' default gate; "": no gate method)."""
    qualname = getattr(getattr(experts_class, "_apply_gate", None), "__qualname__", "")
    # transformers installs its default gate (act_fn(gate) * up on [gate; up]) as `_default_apply_gate`
    if qualname == "_default_apply_gate":
        return None
    return qualname.rpartition(".")[0]


def experts_layout(experts: nn.Module):
    """The kernels' :class:`reap_kernels.ExpertsLayout` for a transformers experts module, or raise."""
    kernels = _import_kernels()
    name = type(experts).__name__
    if not getattr(experts, "has_gate", True):
        raise _unavailable(f"{name}: experts without a gate (up_proj + activation) are not supported by the triton engine")
    if getattr(experts, "has_post_expert_norm", False):
        raise _unavailable(f"{name}: a post-expert norm is not supported by the triton engine")
    layout = kernel_layout(_gate_class(type(experts)))
    if layout is None:
        raise _unavailable(f"{name}: its custom _apply_gate is not supported by the triton engine")
    if bool(getattr(experts, "is_concatenated", True)) == layout.interleaved:
        expected = "interleaved gate/up" if layout.interleaved else "concatenated [gate; up]"
        raise _unavailable(f"{name}: the {layout.activation} gate needs the {expected} layout")
    if layout.gate_class is None and not _is_silu(getattr(experts, "act_fn", None)):
        act = type(getattr(experts, "act_fn", None)).__name__
        raise _unavailable(f"{name}: activation {act} is not supported by the triton engine (silu only)")
    return kernels.ExpertsLayout(
        transposed=bool(getattr(experts, "is_transposed", False)),
        interleaved=layout.interleaved,
        activation=layout.activation,
        **{constant: float(getattr(experts, constant)) for constant in layout.constants},
    )


def triton_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gates: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    accumulator: LayerAccumulator | None = None,
) -> tuple[torch.Tensor, BatchStats | None]:
    """Routed MoE forward of ``experts`` for (T, H) ``hidden_states``; statistics when ``gates`` is given.

    ``gates`` (T, k) fp32 is REAP's g per routed pair (or a ``reap_kernels.RouterGate`` from
    :func:`router_gate`: the kernels compute g from the router's logits); ``token_mask`` (T,) bool marks the tokens counted
    in the statistics (None: all). Returns the layer output (T, H) and :class:`BatchStats` (fp64 sums,
    int64 counts, bitwise reproducible) or None. With ``accumulator`` (on the layer's device) the
    statistics kernel adds into it directly and None is returned in place of the statistics.
    """
    kernels = _import_kernels()
    if hidden_states.device.type == "cpu" and not kernels.INTERPRET:
        raise _unavailable(
            "the triton engine needs a CUDA device (or TRITON_INTERPRET=1 set before reap_kernels is imported)"
        )
    layout = experts_layout(experts)
    has_bias = bool(getattr(experts, "has_bias", False))
    w_gate_up = experts.gate_up_proj.detach()
    w_down = experts.down_proj.detach()
    b_gate_up = experts.gate_up_proj_bias.detach() if has_bias else None
    b_down = experts.down_proj_bias.detach() if has_bias else None
    if token_mask is not None:
        token_mask = token_mask.reshape(-1).to(device=hidden_states.device, dtype=torch.bool)
    accumulate = accumulator is not None and gates is not None
    try:
        out, stats = kernels.fused_moe(
            hidden_states.detach(), w_gate_up, w_down, top_k_index, top_k_weights.detach(), layout,
            b_gate_up=b_gate_up, b_down=b_down,
            gates=gates if gates is None or isinstance(gates, kernels.RouterGate) else gates.detach().to(torch.float32),
            token_mask=token_mask if gates is not None else None,
            accumulators=accumulator.reap_tensors() if accumulate else None,
        )
    except kernels.UnsupportedInputError as exc:  # raised before any launch: the caller may fall back
        raise _unavailable(f"{type(experts).__name__}: {exc}") from None
    if stats is None or accumulate:
        return out, None
    return out, BatchStats(**stats)


def router_gate(logits: torch.Tensor, renormalize: bool):
    """REAP's gate as the kernels compute it from the router's (T, E) ``logits`` (softmax, gathered at the
    top k, renormalised when asked): pass it as ``gates`` instead of a (T, k) tensor. ``Observer`` does
    so for softmax-gate families, with the logits the model's router returned (no second router GEMM)."""
    return _import_kernels().RouterGate(logits.detach(), renormalize)


triton_experts_forward.router_gate = router_gate  # the engines that take router logits say so (session.py)
