"""The Triton engine: the routed MoE forward and the REAP statistics in fused Triton kernels.

Same signature and semantics as :func:`reap_fast.observe.reference.reference_experts_forward`; the
kernels live in ``reap_kernels`` (folder ``kernels/``). The weights and the layout flags are read from
the transformers experts module (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``,
``has_post_expert_norm`` and its ``_apply_gate``). Supported: gated experts with transformers' default
gate (silu(gate) * up, concatenated [gate; up]: Qwen3-MoE, Mixtral, DeepSeek-V3, GLM-4-MoE, OLMoE, ...)
and gpt-oss's clamped, interleaved swiglu with biases. Anything else raises ``EngineUnavailableError``.
Forward only (no autograd).
"""

from __future__ import annotations

import torch
from torch import nn

from ..metrics import BatchStats


def _unavailable(message: str) -> Exception:
    from .engines import EngineUnavailableError  # lazy: engines imports this module lazily too

    return EngineUnavailableError(message)


def _import_kernels():
    try:
        import reap_kernels
    except ImportError as exc:  # triton missing, or the package not installed
        raise _unavailable(f"the triton engine needs triton and the reap_kernels package: {exc}") from None
    return reap_kernels


def _is_silu(act_fn: object) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ in ("SiLUActivation", "SiLU")


def experts_layout(experts: nn.Module):
    """The kernels' :class:`reap_kernels.ExpertsLayout` for a transformers experts module, or raise."""
    kernels = _import_kernels()
    name = type(experts).__name__
    if not getattr(experts, "has_gate", True):
        raise _unavailable(f"{name}: experts without a gate (up_proj + activation) are not supported by the triton engine")
    if getattr(experts, "has_post_expert_norm", False):
        raise _unavailable(f"{name}: a post-expert norm is not supported by the triton engine")
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    apply_gate = getattr(type(experts), "_apply_gate", None)
    # transformers installs its default gate (silu(gate) * up on [gate; up]) as `_default_apply_gate`
    if apply_gate is not None and apply_gate.__qualname__ == "_default_apply_gate":
        if not concatenated:
            raise _unavailable(f"{name}: the default gate needs the concatenated [gate; up] layout")
        if not _is_silu(getattr(experts, "act_fn", None)):
            act = type(getattr(experts, "act_fn", None)).__name__
            raise _unavailable(f"{name}: activation {act} is not supported by the triton engine (silu only)")
        return kernels.ExpertsLayout(transposed=transposed, interleaved=False, activation="silu")
    if apply_gate is not None and apply_gate.__qualname__.startswith("GptOssExperts."):
        if concatenated:
            raise _unavailable(f"{name}: gpt-oss swiglu expects the interleaved gate/up layout")
        return kernels.ExpertsLayout(
            transposed=transposed, interleaved=True, activation="gpt_oss_swiglu",
            alpha=float(experts.alpha), limit=float(experts.limit),
        )
    raise _unavailable(f"{name}: its custom _apply_gate is not supported by the triton engine")


def triton_experts_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gates: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BatchStats | None]:
    """Routed MoE forward of ``experts`` for (T, H) ``hidden_states``; statistics when ``gates`` is given.

    ``gates`` (T, k) fp32 is REAP's g per routed pair; ``token_mask`` (T,) bool marks the tokens counted
    in the statistics (None: all). Returns the layer output (T, H) and :class:`BatchStats` (fp64 sums,
    int64 counts, bitwise reproducible) or None.
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
    out, stats = kernels.fused_moe(
        hidden_states.detach(), w_gate_up, w_down, top_k_index, top_k_weights.detach(), layout,
        b_gate_up=b_gate_up, b_down=b_down,
        gates=None if gates is None else gates.detach().to(torch.float32),
        token_mask=token_mask if gates is not None else None,
    )
    if stats is None:
        return out, None
    return out, BatchStats(
        tokens=stats["tokens"],
        count=stats["count"],
        ean_sum=stats["ean_sum"],
        weighted_ean_sum=stats["weighted_ean_sum"],
        gate_sum=stats["gate_sum"],
        max_activation=stats["max_activation"],
    )
