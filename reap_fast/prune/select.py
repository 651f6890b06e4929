"""Which experts to keep: vectorized over all layers at once.

Rules (where upstream REAP is silent, the choice made here is stated):

* **Lowest scores are removed.** Upstream calls ``torch.topk(score, n, largest=False)``, whose choice
  among equal scores is unspecified. reap-fast is deterministic: **among equal scores the lowest expert
  index is kept** (the removal order is a stable sort on ``(score ascending, expert index descending)``).
* **Budget.** ``compression_ratio r`` in (0, 1) removes ``n = int(E * r)`` experts per layer (upstream
  ``prune.main``); ``n_experts_to_prune n`` removes ``n`` (0 <= n < E). A layer never keeps fewer experts
  than the model's top-k, nor fewer than ``min_experts_per_layer``: a clear error names the numbers.
* **Group-limited routing** (DeepSeek-V3 / GLM-4.5 ``n_group``/``topk_group``): the router views the
  experts as ``n_group`` contiguous groups of equal size, so the same number is removed from every
  group (the lowest scores *within* each group). When ``n`` is not a multiple of ``n_group`` it is
  **rounded down** to one, with a warning. Every group keeps at least 2 experts (the router ranks
  groups by their two best experts) and ``topk_group * kept_per_group >= top_k``.
* **Super experts** (``preserve_super_experts``, upstream ``--perserve_super_experts``; and
  ``preserve_outliers``, upstream ``--perserve_outliers``): see :func:`.scores.super_expert_mask`; their
  score is set to +inf before ranking, as upstream does. Upstream only does so for some score keys
  (not ``expert_frequency`` nor ``max_activations``); reap-fast protects them for every method.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..config.prune import PruneConfig, SelectionError
from ..metrics import LayerMetrics
from .scores import layer_scores, num_experts_of, sorted_layers, super_expert_mask

logger = logging.getLogger(__name__)


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Expert indices along the last dim, first to remove first: score ascending, ties -> higher index first."""
    num_experts = scores.shape[-1]
    flipped_order = torch.sort(scores.flip(-1), dim=-1, stable=True).indices
    return (num_experts - 1) - flipped_order


def experts_to_prune(
    num_experts: int, config: PruneConfig, top_k: int | None = None, groups: int | Sequence[int] | None = None
) -> int:
    """The per-layer number of experts to remove: ``int(E * r)`` from the ratio (as upstream), or the count.

    The config has checked the budget on its own; here a count is checked against the model's ``E`` (its
    ``top_k`` and routing ``groups``, when given), and a refusal names the range the model accepts: every count
    in it passes :func:`uniform_prune_count`.
    """
    lowest, highest, reason = _count_range(num_experts, top_k, groups)
    allowed = f"between {lowest} and {highest}" if highest >= lowest else "none (it cannot be pruned)"
    routing = f" and routes each token to {top_k}" if top_k else ""
    if config.n_experts_to_prune is not None:
        count = config.n_experts_to_prune
        if not lowest <= count <= highest:
            raise SelectionError(
                f"{{0}}={count} is out of range: the model has {num_experts} experts per layer{routing}, "
                f"so it must be {allowed}{reason}", "n_experts_to_prune", owner="PruneConfig"
            )
        return count
    count = int(num_experts * config.compression_ratio)
    if count == 0:
        raise SelectionError(
            f"{{0}}={config.compression_ratio} removes int({num_experts} x {config.compression_ratio}) = 0 "
            f"of {num_experts} experts per layer: nothing would be pruned; use at least {1 / num_experts:.4g}",
            "compression_ratio", owner="PruneConfig"
        )
    return count


def _count_range(num_experts: int, top_k: int | None, groups: int | Sequence[int] | None) -> tuple[int, int, str]:
    """(lowest, highest, why) experts a layer may lose: the top-k must stay; with routing groups the count is a
    multiple of n_group (smaller counts would round down to nothing) and every group keeps at least 2 experts and
    enough for the routed groups to hold the top-k."""
    top = max(int(top_k or 1), 1)
    highest = num_experts - top
    reason = f": pruning more leaves fewer than the model's top-k of {top_k} experts per token" if top_k else ""
    num_groups, topk_group = _group_settings(groups)
    if num_groups > 1 and num_experts % num_groups == 0:
        per_group = max(2, -(-top // topk_group) if top_k and topk_group else 2)
        by_groups = num_experts - num_groups * per_group
        if by_groups < highest:
            highest = by_groups
            reason = (f": with {num_groups} routing groups every group must keep at least {per_group} experts "
                      f"(counts between multiples of {num_groups} are rounded down)")
        return num_groups, highest, reason
    return 1, highest, reason


def _group_settings(groups: int | Sequence[int] | None) -> tuple[int, int | None]:
    if groups is None:
        return 1, None
    if isinstance(groups, int):
        return int(groups), None
    values = tuple(int(v) for v in groups)
    if len(values) != 2:
        raise SelectionError(f"groups must be n_group or (n_group, topk_group), got {groups!r}")
    return values[0], values[1]


def _keep_dict(layers: list[int], keep_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    counts = keep_mask.sum(dim=1).tolist()
    indices = torch.arange(keep_mask.shape[1]).expand_as(keep_mask)[keep_mask]
    return {layer: part.clone() for layer, part in zip(layers, torch.split(indices, counts))}


def _uniform_mask(scores: torch.Tensor, count: int, num_groups: int) -> torch.Tensor:
    """(L, E) keep mask removing ``count`` per layer (``count / num_groups`` from each group)."""
    num_layers, num_experts = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count == 0:
        return keep
    group_size = num_experts // num_groups
    grouped = scores.reshape(num_layers, num_groups, group_size)
    removed_in_group = removal_order(grouped)[..., : count // num_groups]
    offsets = (torch.arange(num_groups) * group_size).view(1, num_groups, 1)
    removed = (removed_in_group + offsets).reshape(num_layers, -1)
    keep.scatter_(1, removed, False)
    return keep


def uniform_prune_count(
    num_experts: int,
    count: int,
    top_k: int | None = None,
    groups: int | Sequence[int] | None = None,
    min_experts_per_layer: int | None = None,
) -> int:
    """Check a uniform per-layer budget against top-k, the floor and routing groups (one-line errors).

    Returns the number actually removed per layer: with group-limited routing it is rounded down to a
    multiple of ``n_group`` so that every group loses the same number.
    """
    num_groups, topk_group = _group_settings(groups)
    if num_groups > 1:
        if num_experts % num_groups:
            raise SelectionError(f"{num_experts} experts cannot form {num_groups} equal routing groups")
        if count % num_groups:
            rounded = count - count % num_groups
            logger.warning(
                "group-limited routing (n_group=%d): removing %d experts per layer instead of %d so that every "
                "group loses the same number (%d)",
                num_groups, rounded, count, rounded // num_groups,
            )
            count = rounded
    kept = num_experts - count
    if top_k is not None and kept < top_k:
        raise SelectionError(
            f"pruning {count} of {num_experts} experts leaves {kept} per layer, fewer than the model's top-k of "
            f"{top_k} experts per token; prune at most {num_experts - top_k}"
        )
    if min_experts_per_layer is not None and kept < min_experts_per_layer:
        raise SelectionError(
            f"pruning {count} of {num_experts} experts leaves {kept} per layer, fewer than "
            f"min_experts_per_layer={min_experts_per_layer}"
        )
    if groups is not None:
        per_group = (num_experts - count) // num_groups
        if per_group < 2:
            raise SelectionError(
                f"group-limited routing needs at least 2 experts per group; pruning {count} of {num_experts} "
                f"experts in {num_groups} groups leaves {per_group}"
            )
        if topk_group is not None and top_k is not None and topk_group * per_group < top_k:
            raise SelectionError(
                f"after pruning, the {topk_group} routed groups hold {topk_group * per_group} experts, fewer than "
                f"top-k={top_k}"
            )
    return count


def select_experts(
    metrics: dict[int, LayerMetrics],
    config: PruneConfig,
    *,
    top_k: int | None = None,
    groups: int | Sequence[int] | None = None,
) -> dict[int, torch.Tensor]:
    """The experts to keep in every layer: ``{layer: sorted int64 indices}``. See the module docstring.

    ``config`` holds the budget, method, seed, floor and super-expert settings; ``top_k`` and
    ``groups`` are the model's routing (:func:`reap_fast.prune.model_routing`).
    """
    layers = sorted_layers(metrics)
    if not layers:
        raise SelectionError("the observation has no layers")
    num_experts = num_experts_of(metrics)
    count = experts_to_prune(num_experts, config, top_k, groups)
    num_groups, topk_group = _group_settings(groups)
    scores = layer_scores(metrics, config.method, config.seed)

    protected = None
    if config.preserve_super_experts or config.preserve_outliers:
        protected = super_expert_mask(metrics, include_last_layers=config.preserve_outliers)
        logger.info("preserving %d super experts", int(protected.sum()))

    floor = max(top_k or 1, config.min_experts_per_layer or 0, 2 if groups is not None else 1)
    count = uniform_prune_count(num_experts, count, top_k, groups, config.min_experts_per_layer)
    kept = num_experts - count
    if protected is not None:
        scores = scores.masked_fill(protected, float("inf"))
        too_many = protected.sum(dim=1) > kept
        if bool(too_many.any()):
            logger.warning(
                "layers %s have more super experts than the %d experts kept; the lowest-scoring ones are kept by index",
                [layers[i] for i in too_many.nonzero().flatten().tolist()], kept,
            )
    keep = _uniform_mask(scores, count, max(num_groups, 1))
    return _keep_dict(layers, keep)


def removed_experts(keep: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The complement of ``keep`` in ``range(num_experts)``, sorted."""
    mask = torch.ones(num_experts, dtype=torch.bool)
    mask[keep.long()] = False
    return mask.nonzero().flatten()
