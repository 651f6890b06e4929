"""Upstream REAP's rules where they are not reap-fast's defaults, and the notes printed where upstream errs.

Every function here either reproduces an upstream rule (unless a ``ReapFastArgs`` flag asks for
reap-fast's) or returns the one line that names a place where the drop-in deliberately does something
else because upstream would crash or act on the wrong layer.
"""

from __future__ import annotations

from typing import Any

from ..config.observe import RENORMALIZE_ALWAYS
from ..models.base import text_config

# Score keys upstream's prune() sets to +inf for super experts (``prune.py``); other methods ignore
# --perserve_super_experts / --perserve_outliers. reap-fast's names for the same keys.
UPSTREAM_PROTECTED_METHODS = frozenset(
    {"reap", "ean_sum", "ean_mean", "weighted_ean_sum", "weighted_frequency_sum", "weighted_expert_frequency_sum"}
)

# model_type -> why upstream's observer does not give reap-fast's numbers for it.
_FAMILY_NOTES = {
    "glm4_moe": "upstream's observer cannot read GLM-4.5's in-tree MoE block (it returns no router logits; "
    "upstream runs only its own patched copy, whose g is the softmax of the raw logits over their top-k); "
    "reap-fast observes the model's own routing with g = its weight / routed_scaling_factor",
    "deepseek_v3": "upstream REAP has no observer for deepseek_v3; reap-fast's adapter is used",
    "kimi_k2": "upstream REAP has no observer for kimi_k2; reap-fast's adapter is used",
    "qwen3_5_moe": "upstream REAP has no observer for qwen3_5_moe; reap-fast's adapter is used",
    "qwen3_next": "upstream REAP has no observer for qwen3_next; reap-fast's adapter is used",
    "olmoe": "upstream REAP has no observer for olmoe; reap-fast's adapter is used",
    "gpt_oss": "upstream REAP has no observer for gpt_oss; reap-fast's adapter is used",
    "ernie4_5_moe": "upstream's patched ERNIE-4.5 code chooses experts without the moe_statics correction bias; "
    "reap-fast observes the model's own choice (softmax + bias), with upstream's g (softmax of the logits)",
    "deepseek_v2": "upstream's observer takes the top-k of the raw router logits, which differs from the model's "
    "choice under group_limited_greedy routing (DeepSeek-V2; V2-Lite's greedy routing agrees); reap-fast observes "
    "the model's own choice, with upstream's g (softmax of the logits)",
}


def observer_renormalize(config: Any, flag: bool, layerwise: bool, rule: str) -> bool | str:
    """The Observer's ``renormalize`` for ``--renormalize_router_weights``.

    ``rule="upstream"``: ``prune.py`` renormalises only when the config has a true ``norm_topk_prob``
    (so never for Mixtral, whose router always renormalises); ``layerwise_prune.py`` passes the flag on
    as it is, for every family. ``rule="model"``: where the model renormalises its own top-k weights.
    """
    if not flag:
        return False
    if rule == "model":
        return True
    if layerwise or getattr(config, "norm_topk_prob", False):
        return RENORMALIZE_ALWAYS
    return False


def family_note(config: Any) -> str | None:
    """The line naming how upstream's observer differs for this model family, if it does."""
    model_type = getattr(config, "model_type", None)
    text_type = getattr(text_config(config), "model_type", None)
    return _FAMILY_NOTES.get(model_type) or _FAMILY_NOTES.get(text_type)


def super_experts_apply(method: str, all_methods: bool) -> bool:
    """Whether upstream's super-expert protection changes anything for ``method``."""
    return all_methods or method in UPSTREAM_PROTECTED_METHODS


def super_expert_layer_note(layers: list[int]) -> str | None:
    """Upstream matches super experts to layers by their position in the observation, not their number.

    For a model whose MoE layers are not numbered 0..L-1 (dense first layers), upstream would protect
    experts of the wrong layers; reap-fast protects each expert in its own layer.
    """
    if layers == list(range(len(layers))):
        return None
    return (
        f"MoE layers are numbered {layers[0]}..{layers[-1]}, not from 0: upstream would protect super experts "
        "in the layer whose number equals their position; reap-fast protects them in their own layer"
    )
