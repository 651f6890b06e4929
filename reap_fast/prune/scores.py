"""Saliency scores of every expert of every layer, stacked into one (layers, experts) tensor.

Method names follow upstream REAP (``PruneArgs.prune_method`` and ``prune.prune``): upstream looks the
method up as a key of the observation dictionary, after mapping ``frequency`` to ``expert_frequency``.
reap-fast accepts the same names, the raw key names, and a few aliases:

=========================  ==========================================================
method                     score (per layer, per expert; the lowest are removed)
=========================  ==========================================================
``reap`` (default)         ``reap`` = weighted_ean_sum / expert_frequency
``frequency``              ``expert_frequency`` (alias ``expert_frequency``)
``expert_proba``           expert_frequency / total_tokens (upstream computes it too)
``ean_sum``                ``ean_sum``
``ean_mean``               ``ean_mean``
``weighted_ean_sum``       ``weighted_ean_sum``
``weighted_frequency_sum`` ``weighted_expert_frequency_sum`` (upstream's choice name;
                           upstream itself looks up the missing key
                           ``weighted_frequency_sum`` and fails, reap-fast maps it)
``max_activations``        ``max_activations``
``ean_ca``                 ``||routed_characteristic_activation[e]||`` (upstream
                           merging key; only in files recorded without
                           ``--record_pruning_metrics_only``)
``random``                 uniform [0, 1) from a generator seeded with ``seed``
any other key              used as is when every layer has a length-E tensor under it
                           (upstream's ``observer_data[layer].get(prune_method)``, e.g.
                           ``reap_l2`` / ``weighted_ean_sum_l2`` of newer upstream files)
=========================  ==========================================================
"""

from __future__ import annotations

import logging

import torch

from ..config.checks import DEFAULT_SEED
from ..config.prune import DEFAULT_METHOD
from ..errors import ReapFastError, UsageError
from ..metrics import LayerMetrics

logger = logging.getLogger(__name__)


# method name -> observation key (methods computed from several keys are handled in layer_scores)
METHOD_KEYS: dict[str, str] = {
    "reap": "reap",
    "frequency": "expert_frequency",
    "expert_frequency": "expert_frequency",
    "ean_sum": "ean_sum",
    "ean_mean": "ean_mean",
    "weighted_ean_sum": "weighted_ean_sum",
    "weighted_frequency_sum": "weighted_expert_frequency_sum",
    "weighted_expert_frequency_sum": "weighted_expert_frequency_sum",
    "max_activations": "max_activations",
}
COMPUTED_METHODS = ("expert_proba", "ean_ca", "random")



class UnknownMethodError(ReapFastError, ValueError):
    """A pruning method that is neither known nor a key of the observation file."""


def known_methods() -> list[str]:
    """Every method name accepted without looking at an observation file."""
    return sorted(set(METHOD_KEYS) | set(COMPUTED_METHODS))


def sorted_layers(metrics: dict[int, LayerMetrics]) -> list[int]:
    """Layer indices in increasing order (the row order of every stacked tensor)."""
    return sorted(metrics)


def num_experts_of(metrics: dict[int, LayerMetrics]) -> int:
    """The common expert count of all layers, or a clear error when layers differ."""
    counts = {layer: int(metrics[layer]["expert_frequency"].shape[0]) for layer in metrics}
    distinct = sorted(set(counts.values()))
    if len(distinct) != 1:
        raise UsageError(f"layers of the observation have different expert counts: {counts}")
    return distinct[0]


def stack_key(metrics: dict[int, LayerMetrics], key: str, layers: list[int] | None = None) -> torch.Tensor:
    """``metrics[layer][key]`` of all layers stacked into a (layers, E) float64 tensor on the CPU."""
    layers = sorted_layers(metrics) if layers is None else layers
    return torch.stack([metrics[layer][key].detach().to("cpu", torch.float64).reshape(-1) for layer in layers])


def layer_scores(metrics: dict[int, LayerMetrics], method: str = DEFAULT_METHOD, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The (layers, E) float64 score tensor of ``method``; rows follow :func:`sorted_layers`.

    NaN scores (e.g. a hand-edited file) count as the lowest possible score, with a warning.
    """
    layers = sorted_layers(metrics)
    num_experts = num_experts_of(metrics)
    if method in METHOD_KEYS:
        scores = stack_key(metrics, METHOD_KEYS[method], layers)
    elif method == "expert_proba":
        freq = stack_key(metrics, "expert_frequency", layers)
        tokens = torch.stack([metrics[layer]["total_tokens"].detach().to("cpu", torch.float64) for layer in layers])
        scores = freq / tokens.clamp(min=1).unsqueeze(1)
    elif method == "ean_ca":
        if not all("routed_characteristic_activation" in metrics[layer] for layer in layers):
            raise UnknownMethodError(
                "prune method 'ean_ca' needs the upstream merging key 'routed_characteristic_activation', "
                "which this observation file lacks (files recorded with --record_pruning_metrics_only, and "
                "reap-fast files, do not have it)"
            )
        activations = torch.stack(
            [metrics[layer]["routed_characteristic_activation"].detach().to("cpu", torch.float64) for layer in layers]
        )
        scores = torch.linalg.vector_norm(activations.flatten(2), dim=-1)
    elif method == "random":
        generator = torch.Generator().manual_seed(int(seed))
        scores = torch.rand((len(layers), num_experts), generator=generator, dtype=torch.float64)
    elif all(
        isinstance(metrics[layer].get(method), torch.Tensor) and metrics[layer][method].numel() == num_experts
        for layer in layers
    ):
        scores = stack_key(metrics, method, layers)
    else:
        raise UnknownMethodError(
            f"unknown prune method {method!r}: choose one of {', '.join(known_methods())}, or a per-expert key of "
            f"the observation file (this file has: {', '.join(sorted(metrics[layers[0]]))})"
        )
    nan = torch.isnan(scores)
    if bool(nan.any()):
        logger.warning("%d NaN %s scores are treated as the lowest scores", int(nan.sum()), method)
        scores = scores.masked_fill(nan, float("-inf"))
    return scores


def super_expert_mask(metrics: dict[int, LayerMetrics], include_last_layers: bool = False) -> torch.Tensor:
    """(layers, E) bool mask of "super experts", as upstream ``model_util.get_super_expert_indices``.

    An expert is a super expert when its ``max_activations`` exceeds
    ``max(quantile_99.5(all layers' max_activations), max(all) / 10)``. Unless ``include_last_layers``
    (upstream ``--perserve_outliers``), the last 25 % of the layers (rows from ``int(0.75 * L)`` on, in
    the observation's layer order) are never marked (upstream ``--perserve_super_experts``).
    """
    layers = sorted_layers(metrics)
    values = torch.stack([metrics[layer]["max_activations"].detach().to("cpu", torch.float32).reshape(-1) for layer in layers])
    flat = values.flatten()
    threshold = max(torch.quantile(flat, 0.995).item(), flat.max().item() / 10)
    mask = values > threshold
    if not include_last_layers:
        mask[int(len(layers) * 0.75) :, :] = False
    return mask
