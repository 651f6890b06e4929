"""Registered MoE families, and the lookup from a config's ``model_type`` to its adapter.

One entry per family holds everything reap-fast needs to know about it: routing and gate semantics,
router tensors to slice, the ``config.json`` keys a pruned checkpoint edits, how layer streaming reads
its checkpoints (``streaming``) and what the Triton kernels compute for its experts (``kernel``).
"""

from __future__ import annotations

from .base import KernelLayout, MoEAdapter, StreamingLayout, UnsupportedModelError, text_config

ADAPTERS: tuple[MoEAdapter, ...] = (
    MoEAdapter(family="qwen3_moe", model_types=("qwen3_moe",), num_experts_key="num_experts"),
    MoEAdapter(
        family="qwen3_5_moe",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
        num_experts_key="num_experts",
        always_renormalizes=True,
        notes="shared expert and its gate are left untouched",
    ),
    MoEAdapter(
        family="qwen3_next",
        model_types=("qwen3_next",),
        num_experts_key="num_experts",
        notes="shared expert and its gate are left untouched",
    ),
    MoEAdapter(
        family="deepseek_v3",
        model_types=("deepseek_v3", "kimi_k2"),
        num_experts_key="n_routed_experts",
        gate_mode="model_weights",
        router_tensors=("weight", "e_score_correction_bias"),
        scaling_factor_key="routed_scaling_factor",
        group_keys=("n_group", "topk_group"),
        notes="sigmoid router; g is the model's own weight without routed_scaling_factor",
    ),
    MoEAdapter(
        family="glm4_moe",
        model_types=("glm4_moe",),
        num_experts_key="n_routed_experts",
        gate_mode="model_weights",
        router_tensors=("weight", "e_score_correction_bias"),
        scaling_factor_key="routed_scaling_factor",
        group_keys=("n_group", "topk_group"),
        notes="sigmoid router; g is the model's own weight without routed_scaling_factor",
    ),
    MoEAdapter(
        family="mixtral",
        model_types=("mixtral",),
        num_experts_key="num_local_experts",
        always_renormalizes=True,
        # checkpoints name the MoE block block_sparse_moe and the experts w1 (gate), w3 (up), w2 (down)
        streaming=StreamingLayout(
            prefixes=(("mlp.", "block_sparse_moe."),),
            fused_experts=(("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))),
        ),
    ),
    MoEAdapter(family="olmoe", model_types=("olmoe",), num_experts_key="num_experts"),
    MoEAdapter(
        family="gpt_oss",
        model_types=("gpt_oss",),
        num_experts_key="num_local_experts",
        renormalize_key=None,
        always_renormalizes=True,
        router_tensors=("weight", "bias"),
        extra_top_k_keys=("experts_per_token",),
        kernel=KernelLayout(
            activation="gpt_oss_swiglu", gate_class="GptOssExperts", interleaved=True, constants=("alpha", "limit")
        ),
        notes="softmax over the top-k logits equals renormalised full softmax; router bias sliced",
    ),
    MoEAdapter(
        family="llama4",
        model_types=("llama4", "llama4_text"),
        num_experts_key="num_local_experts",
        renormalize_key=None,  # the router never renormalises (sigmoid of each chosen logit)
        expert_input_scaled=True,
        streaming=StreamingLayout(
            model_types=("llama4_text",),
            refusal="this multimodal llama4 checkpoint keeps its text layers under another prefix",
        ),
        notes="sigmoid of the top-k logits scales the expert input; g = softmax over all logits and y = the "
        "expert on the unscaled input, as upstream REAP records them; shared expert untouched",
    ),
    MoEAdapter(
        family="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        num_experts_key="moe_num_experts",
        top_k_key="moe_k",
        renormalize_key=None,
        always_renormalizes=True,  # weights / max(top-k sum, moe_norm_min), no config flag
        router_tensors=("weight", "moe_statics.e_score_correction_bias"),
        router_fp32=True,
        expert_list_keys=("moe_capacity",),
        streaming=StreamingLayout(
            renames=(("gate.moe_statics.e_score_correction_bias", "moe_statics.e_score_correction_bias"),)
        ),
        notes="softmax router; moe_statics correction bias only selects experts; shared experts untouched",
    ),
    MoEAdapter(
        family="deepseek_v2",
        model_types=("deepseek_v2",),
        num_experts_key="n_routed_experts",
        renormalize_key=None,  # transformers' DeepseekV2TopkRouter never renormalises (weights = softmax x scale)
        router_fp32=True,
        group_keys=("n_group", "topk_group"),
        scaling_factor_key="routed_scaling_factor",
        notes="softmax router, greedy or group-limited greedy; g = softmax over all logits (the model's weight "
        "without routed_scaling_factor); shared experts untouched",
    ),
)

_BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


def supported_model_types() -> list[str]:
    """The ``model_type`` values reap-fast has an adapter for."""
    return sorted(_BY_MODEL_TYPE)


def get_adapter(config) -> MoEAdapter:
    """The adapter for a transformers config (outer or text config), or a clear error."""
    candidates = [getattr(config, "model_type", None), getattr(text_config(config), "model_type", None)]
    return adapter_for_model_types(candidates)


def adapter_for_model_types(candidates: list[str | None]) -> MoEAdapter:
    """The adapter of the first model type in ``candidates`` that has one (outer config first), or a clear error."""
    for model_type in candidates:
        if model_type in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[model_type]
    raise UnsupportedModelError(
        f"model type {candidates[0] if candidates else None!r} is not a supported MoE family; supported: "
        f"{', '.join(supported_model_types())} (see 'Adding a model family' in the README)"
    )


def streaming_families() -> tuple[str, ...]:
    """The families whose checkpoints layer streaming reads (its statistics are tested equal to in memory)."""
    return tuple(adapter.family for adapter in ADAPTERS if adapter.streaming is not None)


def kernel_layout(gate_class: str | None) -> KernelLayout | None:
    """The kernel layout of experts whose ``_apply_gate`` comes from class ``gate_class``.

    None for ``gate_class``: transformers' default gate. Returns None when no family names that class.
    """
    for adapter in ADAPTERS:
        if adapter.kernel.gate_class == gate_class:
            return adapter.kernel
    return None
