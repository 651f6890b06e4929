"""Tiny random-weight configs of every supported MoE family (for tests, demos and benchmarks).

Each config keeps the family's routing semantics (renormalisation, sigmoid + correction bias,
group-limited routing, shared experts, transposed weights with biases, dense first layers, Llama-4's
input-scaled experts) at CPU-friendly sizes.
"""

from __future__ import annotations

import transformers

from .tiny import tiny_qwen3_moe_config

_COMMON = dict(
    vocab_size=264,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    eos_token_id=256,
    pad_token_id=257,
    bos_token_id=None,
)


def _qwen3_5_moe(num_experts: int, top_k: int, layers: int):
    return transformers.Qwen3_5MoeTextConfig(
        **_COMMON,
        num_hidden_layers=layers,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )


def _qwen3_next(num_experts: int, top_k: int, layers: int):
    return transformers.Qwen3NextConfig(
        **_COMMON,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )


def _deepseek_v3(num_experts: int, top_k: int, layers: int):
    settings = {key: value for key, value in _COMMON.items() if key != "head_dim"}
    settings["num_key_value_heads"] = settings["num_attention_heads"]  # multi-head latent attention
    return transformers.DeepseekV3Config(
        **settings,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=layers + 1,
        first_k_dense_replace=1,
        n_routed_experts=num_experts,
        n_shared_experts=1,
        num_experts_per_tok=top_k,
        n_group=2,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    )


def _glm4_moe(num_experts: int, top_k: int, layers: int):
    return transformers.Glm4MoeConfig(
        **_COMMON,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=layers + 1,
        first_k_dense_replace=1,
        n_routed_experts=num_experts,
        n_shared_experts=1,
        num_experts_per_tok=top_k,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
    )


def _mixtral(num_experts: int, top_k: int, layers: int):
    return transformers.MixtralConfig(
        **_COMMON, intermediate_size=32, num_hidden_layers=layers, num_local_experts=num_experts, num_experts_per_tok=top_k
    )


def _olmoe(num_experts: int, top_k: int, layers: int):
    settings = {key: value for key, value in _COMMON.items() if key != "head_dim"}
    return transformers.OlmoeConfig(
        **settings, intermediate_size=32, num_hidden_layers=layers, num_experts=num_experts, num_experts_per_tok=top_k
    )


def _gpt_oss(num_experts: int, top_k: int, layers: int):
    return transformers.GptOssConfig(
        **_COMMON,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        layer_types=["full_attention"] * layers,
    )


def _llama4(num_experts: int, top_k: int, layers: int):
    # MoE in every second layer (as Llama-4 Maverick), dense MLPs in between
    return transformers.Llama4TextConfig(
        **_COMMON,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=2 * layers,
        interleave_moe_layer_step=2,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )


def _ernie4_5_moe(num_experts: int, top_k: int, layers: int):
    settings = {key: value for key, value in _COMMON.items() if key != "head_dim"}
    return transformers.Ernie4_5_MoeConfig(
        **settings,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=layers + 1,
        moe_layer_start_index=1,  # a dense first layer, as ERNIE-4.5-21B-A3B
        moe_layer_interval=1,
        moe_num_experts=num_experts,
        moe_k=top_k,
        moe_num_shared_experts=1,
    )


def _deepseek_v2(num_experts: int, top_k: int, layers: int):
    settings = {key: value for key, value in _COMMON.items() if key != "head_dim"}
    settings["num_key_value_heads"] = settings["num_attention_heads"]  # multi-head latent attention
    return transformers.DeepseekV2Config(
        **settings,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=layers + 1,
        first_k_dense_replace=1,
        n_routed_experts=num_experts,
        n_shared_experts=1,
        num_experts_per_tok=top_k,
        topk_method="group_limited_greedy",  # DeepSeek-V2's routing (V2-Lite: greedy, n_group 1)
        n_group=2,
        topk_group=1,
        routed_scaling_factor=16.0,
        norm_topk_prob=False,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    )


def _qwen3_moe(num_experts: int, top_k: int, layers: int):
    return tiny_qwen3_moe_config(num_experts=num_experts, num_experts_per_tok=top_k, num_hidden_layers=layers)


TINY_CONFIGS = {
    "qwen3_moe": _qwen3_moe,
    "qwen3_5_moe": _qwen3_5_moe,
    "qwen3_next": _qwen3_next,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _glm4_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "llama4": _llama4,
    "ernie4_5_moe": _ernie4_5_moe,
    "deepseek_v2": _deepseek_v2,
}


def tiny_family_config(family: str, num_experts: int = 8, top_k: int = 2, layers: int = 2):
    """A tiny config of ``family`` with ``layers`` MoE layers (dense first layers added where the family has them)."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_CONFIGS)}")
    return TINY_CONFIGS[family](num_experts, top_k, layers)
