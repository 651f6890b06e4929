"""Hand-written routing and REAP-gate semantics per family: the expectation the code is checked against.

Nothing here imports reap_fast. Each row was read off the router's ``forward`` in transformers 5.x
(``models/<family>/modeling_<family>.py``) and off upstream REAP (``src/reap/main.py::_setup_observer``
and ``src/reap/pruning_metrics.py::update_pruning_state``); the float64 routing below follows the rows,
not the adapters of reap-fast.

Router of each family (what the model computes):

* qwen3_moe, qwen3_next, olmoe: p = softmax(x W^T) over all E; top-k of p; divided by the top-k sum
  when ``config.norm_topk_prob``.
* qwen3_5_moe, mixtral: the same, but the top-k is always divided by its sum (no config flag).
* gpt_oss: logits = x W^T + b; top-k of the logits; softmax over the k chosen logits (equal to the
  full softmax renormalised over the top-k).
* deepseek_v3, glm4_moe: s = sigmoid(x W^T); the choice uses s + e_score_correction_bias (the bias
  only selects); group-limited: groups of E / n_group contiguous experts scored by the sum of their 2
  best choice values, the best ``topk_group`` groups kept, top-k of the choice among them; the weight
  is s at the chosen experts, divided by its sum when ``norm_topk_prob``, times
  ``routed_scaling_factor``.
* llama4: top-k of the logits; the weight sigmoid(logit) multiplies the expert's INPUT (not its
  output); never renormalised (Llama4TextMoe / Llama4Router).
* ernie4_5_moe: p = softmax of fp32 logits; the choice is the top-k of p + moe_statics
  e_score_correction_bias (shape (1, E); it only selects); the weight is p / max(top-k sum, norm_min):
  always renormalised, no config flag.
* deepseek_v2: p = softmax of fp32 logits; ``group_limited_greedy``: groups scored by their best p,
  the best ``topk_group`` groups kept (``greedy``: no groups); the weight is p x
  ``routed_scaling_factor``; transformers 5 never renormalises (``norm_topk_prob`` is not read).

REAP's g (the weight in weighted_ean_sum / reap):

* reap-fast native: the router's probability of the chosen expert with the model's scaling factor
  left out (softmax of all logits, or the sigmoid score without correction bias), divided by the
  top-k sum only where the model itself renormalises AND --renormalize-router-weights is true; for
  the sigmoid families g is the model's own weight / routed_scaling_factor, so it is renormalised
  exactly when the model is (the flag cannot undo the model's own normalisation).
* upstream REAP (the drop-in's reference): softmax over all router logits at the chosen experts,
  divided by the top-k sum iff ``getattr(model.config, "norm_topk_prob", False)`` and the flag.
  For Llama-4, upstream's hook runs the experts on the unscaled hidden states (y = E(x)), and so does
  reap-fast: the oracle's expert outputs are those on the unscaled input for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RouterRow:
    score: str  # "softmax": softmax over all E logits; "sigmoid": one sigmoid per expert
    logit_bias: bool  # the router adds its own bias to the logits (gpt-oss)
    selection_bias: bool  # e_score_correction_bias is added to the scores for the choice only
    grouped: bool  # group-limited choice (n_group / topk_group)
    model_renorm: str  # when the model divides its top-k weights by their sum: "always" | "norm_topk_prob" | "never"
    scale_key: str | None  # config key of the factor the model multiplies its weights by
    group_score: str = "top2_sum"  # how a routing group is scored: sum of its 2 best choice values, or "max"
    model_weight: str = "probs"  # "probs": the (renormalised, scaled) scores; "sigmoid_logit": Llama-4's input scale


ROUTERS: dict[str, RouterRow] = {
    "qwen3_moe": RouterRow("softmax", False, False, False, "norm_topk_prob", None),
    "qwen3_5_moe": RouterRow("softmax", False, False, False, "always", None),
    "qwen3_next": RouterRow("softmax", False, False, False, "norm_topk_prob", None),
    "deepseek_v3": RouterRow("sigmoid", False, True, True, "norm_topk_prob", "routed_scaling_factor"),
    "glm4_moe": RouterRow("sigmoid", False, True, True, "norm_topk_prob", "routed_scaling_factor"),
    "mixtral": RouterRow("softmax", False, False, False, "always", None),
    "olmoe": RouterRow("softmax", False, False, False, "norm_topk_prob", None),
    "gpt_oss": RouterRow("softmax", True, False, False, "always", None),
    "llama4": RouterRow("softmax", False, False, False, "never", None, model_weight="sigmoid_logit"),
    "ernie4_5_moe": RouterRow("softmax", False, True, False, "always", None),
    "deepseek_v2": RouterRow("softmax", False, False, True, "never", "routed_scaling_factor", group_score="max"),
}

# Is g divided by its top-k sum?  family -> {config norm_topk_prob: (flag true, flag false)}.
# The key None: the family's config has no norm_topk_prob.
NATIVE_RENORMALISED: dict[str, dict[bool | None, tuple[bool, bool]]] = {
    "qwen3_moe": {True: (True, False), False: (False, False)},
    "qwen3_5_moe": {None: (True, False)},
    "qwen3_next": {True: (True, False), False: (False, False)},
    "deepseek_v3": {True: (True, True), False: (False, False)},
    "glm4_moe": {True: (True, True), False: (False, False)},
    "mixtral": {None: (True, False)},
    "olmoe": {True: (True, False), False: (False, False)},
    "gpt_oss": {None: (True, False)},
    "llama4": {None: (False, False)},
    "ernie4_5_moe": {None: (True, False)},
    "deepseek_v2": {None: (False, False)},
}

# Upstream REAP reads only model.config.norm_topk_prob: Mixtral, Qwen3.5 and gpt-oss get the raw softmax.
UPSTREAM_RENORMALISED: dict[str, dict[bool | None, tuple[bool, bool]]] = {
    "qwen3_moe": {True: (True, False), False: (False, False)},
    "qwen3_5_moe": {None: (False, False)},
    "qwen3_next": {True: (True, False), False: (False, False)},
    "mixtral": {None: (False, False)},
    "olmoe": {True: (True, False), False: (False, False)},
    "gpt_oss": {None: (False, False)},
    "llama4": {None: (False, False)},
    "ernie4_5_moe": {None: (False, False)},
    "deepseek_v2": {True: (True, False), False: (False, False)},
}

# The factor divided out of the model's weights to get g (1 where the family has none).
NATIVE_SCALE_KEY = {family: row.scale_key for family, row in ROUTERS.items()}


# model_type values of a family's configs that differ from the family name
MODEL_TYPE_FAMILY = {"qwen3_5_moe_text": "qwen3_5_moe", "kimi_k2": "deepseek_v3", "llama4_text": "llama4"}


def table_family(config) -> str:
    """The table row of a transformers config (by its text config's ``model_type``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = text.model_type
    return MODEL_TYPE_FAMILY.get(model_type, model_type)


def renormalised(table: dict, family: str, config, flag: bool) -> bool:
    """The table's answer for ``family`` with ``config`` (its norm_topk_prob, when the family reads it)."""
    rows = table[family]
    key = None if None in rows else bool(getattr(config, "norm_topk_prob"))
    return rows[key][0 if flag else 1]


@dataclass
class Routing:
    """Float64 routing of T tokens: chosen experts (T, k) sorted, the model's weights and REAP's g."""

    index: torch.Tensor  # (T, k) int64, sorted ascending per token
    model_weights: torch.Tensor  # (T, k) float64: what the model multiplies expert outputs by
    probs: torch.Tensor  # (T, k) float64: g before any renormalisation


def route64(family: str, config, router, hidden: torch.Tensor) -> Routing:
    """Route ``hidden`` (T, H) through ``router``'s parameters in float64, following ``ROUTERS[family]``."""
    row = ROUTERS[family]
    top_k = int(config.num_experts_per_tok)
    weight = router.weight.detach().double()
    logits = hidden.double() @ weight.T
    if row.logit_bias:
        logits = logits + router.bias.detach().double()
    scores = torch.softmax(logits, dim=-1) if row.score == "softmax" else torch.sigmoid(logits)
    choice = scores + selection_bias(router) if row.selection_bias else logits.clone()
    if row.grouped and getattr(config, "topk_method", None) != "greedy":  # DeepSeek-V2 "greedy": no groups
        choice = limit_to_groups(choice, int(config.n_group), int(config.topk_group), row.group_score)
    index = torch.sort(choice.topk(top_k, dim=-1).indices, dim=-1).values
    probs = scores.gather(1, index)
    if row.model_weight == "sigmoid_logit":
        return Routing(index=index, model_weights=torch.sigmoid(logits.gather(1, index)), probs=probs)
    model_renorm = row.model_renorm == "always" or (
        row.model_renorm == "norm_topk_prob" and bool(getattr(config, "norm_topk_prob", False))
    )
    weights = probs / probs.sum(-1, keepdim=True) if model_renorm else probs.clone()
    if row.scale_key is not None:
        weights = weights * float(getattr(config, row.scale_key))
    return Routing(index=index, model_weights=weights, probs=probs)


def selection_bias(router) -> torch.Tensor:
    """The correction bias (E,) added to the scores for the choice: the router's own, or ERNIE's moe_statics (1, E)."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        bias = router.moe_statics.e_score_correction_bias
    return bias.detach().double().reshape(-1)


def limit_to_groups(choice: torch.Tensor, n_group: int, topk_group: int, score: str = "top2_sum") -> torch.Tensor:
    """``choice`` with every expert outside the ``topk_group`` best groups set to -inf.

    Groups are scored by the sum of their 2 best choice values (DeepSeek-V3, GLM-4.5) or by their best ("max",
    DeepSeek-V2)."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, n_group, experts // n_group)
    group_score = grouped.max(dim=-1).values if score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    best = group_score.topk(topk_group, dim=-1).indices
    allowed = torch.zeros(tokens, n_group, dtype=torch.bool).scatter_(1, best, True)
    return choice.masked_fill(~allowed.repeat_interleave(experts // n_group, dim=1), float("-inf"))


def gates64(routing: Routing, renormalise: bool) -> torch.Tensor:
    """REAP's g in float64: the probabilities, divided by their top-k sum when ``renormalise``."""
    if not renormalise:
        return routing.probs
    return routing.probs / routing.probs.sum(-1, keepdim=True)
