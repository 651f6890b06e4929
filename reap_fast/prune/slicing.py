"""Remove experts from a loaded model in place.

For every MoE layer the kept experts' rows are gathered from every per-expert tensor of the experts
module (``gate_up_proj``, ``down_proj`` and, for gpt-oss, ``gate_up_proj_bias``/``down_proj_bias``:
all of its direct parameters and buffers indexed by expert on dim 0) and from the router tensors the
family adapter names (``weight``, and ``bias`` or ``e_score_correction_bias``; ERNIE's
``moe_statics.e_score_correction_bias`` of shape (1, E) on its last dimension). The modules' expert
counts (``num_experts`` and friends) and the config's count key are set to the new count; the top-k
(config and modules) is clamped to it. Shared experts and their gates are left untouched.

Per-layer counts must be equal: the stock transformers classes of every supported family build all
layers from one config count, so a checkpoint with uneven layers could not be loaded again; uneven keep
sets are refused.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from ..errors import ReapFastError
from ..models import MoELayer, find_moe_layers, get_adapter, text_config
from ..models.base import expert_dim, router_tensor

logger = logging.getLogger(__name__)

_COUNT_ATTRIBUTES = ("num_experts", "n_routed_experts", "num_local_experts")
_TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok")
ORIGINAL_COUNTS_ATTRIBUTE = "reap_fast_original_num_experts"


class UnevenPruningError(ReapFastError, ValueError):
    """Layers would keep different numbers of experts, which the model family cannot express."""


class KeepIndexError(ReapFastError, ValueError):
    """Keep indices that do not fit the model (layers, range, duplicates, fewer than top-k)."""


def _check_keep(layers: list[MoELayer], keep: Mapping[int, torch.Tensor], top_k: int | None) -> dict[int, torch.Tensor]:
    model_layers = [layer.layer_index for layer in layers]
    given = sorted(int(layer) for layer in keep)
    if given != model_layers:
        raise KeepIndexError(f"keep indices are given for layers {given}, but the model's MoE layers are {model_layers}")
    checked = {}
    for layer in layers:
        indices = torch.as_tensor(keep[layer.layer_index]).long().flatten().cpu()
        count = layer.num_experts
        if indices.numel() == 0:
            raise KeepIndexError(f"layer {layer.layer_index}: no expert kept")
        if int(indices.min()) < 0 or int(indices.max()) >= count:
            raise KeepIndexError(f"layer {layer.layer_index}: keep indices must lie in [0, {count}), got {indices.tolist()}")
        if torch.unique(indices).numel() != indices.numel():
            raise KeepIndexError(f"layer {layer.layer_index}: repeated keep indices {indices.tolist()}")
        if top_k is not None and indices.numel() < top_k:
            raise KeepIndexError(
                f"layer {layer.layer_index}: keeping {indices.numel()} of {count} experts is fewer than the model's "
                f"top-k of {top_k} experts per token"
            )
        checked[layer.layer_index] = torch.sort(indices).values
    return checked


def _gather(owner: nn.Module, leaf: str, index: torch.Tensor, dim: int, skeleton: bool = False) -> None:
    """Replace ``owner.<leaf>`` (parameter or buffer) by its entries ``index`` along ``dim``.

    Meta tensors are refused (offloaded weights) unless the whole model is a ``skeleton`` (shapes only,
    :func:`reap_fast.models.loading.load_skeleton`), where only the shapes change.
    """
    tensor = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
    if tensor.device.type == "meta" and not skeleton:
        raise ValueError(
            f"{owner.__class__.__name__}.{leaf} is on the meta device (offloaded weights); load the model without "
            "disk offload to prune it"
        )
    new = tensor.detach().index_select(dim, index.to(tensor.device)).contiguous()
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=tensor.requires_grad)
    else:
        owner._buffers[leaf] = new


def _slice_tensors(module: nn.Module, index: torch.Tensor, old_count: int, skeleton: bool = False) -> list[str]:
    """Gather rows ``index`` on dim 0 of the module's direct parameters/buffers that have ``old_count`` rows."""
    candidates = list(module._parameters.items()) + list(module._buffers.items())
    sliced = [
        name for name, tensor in candidates if tensor is not None and tensor.dim() > 0 and tensor.shape[0] == old_count
    ]
    for name in sliced:
        _gather(module, name, index, 0, skeleton)
    return sliced


def _slice_router_tensor(router: nn.Module, name: str, index: torch.Tensor, old_count: int, skeleton: bool) -> None:
    """Gather the kept experts of the router tensor ``name`` (dotted for submodules) on its expert dimension."""
    owner_path, _, leaf = name.rpartition(".")
    owner = router.get_submodule(owner_path) if owner_path else router
    _gather(owner, leaf, index, expert_dim(router_tensor(router, name), old_count), skeleton)


def _set_counts(module: nn.Module, old_count: int, new_count: int, top_k: int | None) -> None:
    for name in _COUNT_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int) and getattr(module, name) == old_count:
            setattr(module, name, new_count)
    if isinstance(module, nn.Linear):
        module.out_features = new_count
    for name in _TOP_K_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > new_count:
            setattr(module, name, new_count)


def prune_model(model: nn.Module, keep: Mapping[int, torch.Tensor]) -> nn.Module:
    """Keep only the experts ``keep[layer]`` of every MoE layer of ``model`` (in place); returns the model.

    The original expert counts are remembered in ``model.reap_fast_original_num_experts`` (used by
    :func:`reap_fast.prune.save_pruned` to list the removed experts).
    """
    adapter = get_adapter(model.config)
    text = text_config(model.config)
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(f"no MoE layers with fused experts found in {model.__class__.__name__}")
    top_k = getattr(text, adapter.top_k_key, None)
    checked = _check_keep(layers, keep, top_k)
    counts = {layer: int(indices.numel()) for layer, indices in checked.items()}
    if len(set(counts.values())) > 1:
        raise UnevenPruningError(
            f"layers would keep different numbers of experts ({counts}); the {adapter.family} config holds one expert "
            f"count for all layers ({adapter.num_experts_key}), so such a checkpoint could not be loaded again"
        )
    original = dict(getattr(model, ORIGINAL_COUNTS_ATTRIBUTE, None) or {})
    skeleton = all(param.device.type == "meta" for param in model.parameters())
    with torch.no_grad():
        for layer in layers:
            index = checked[layer.layer_index]
            old_count = layer.num_experts
            new_count = int(index.numel())
            original.setdefault(layer.layer_index, old_count)
            sliced = _slice_tensors(layer.experts, index, old_count, skeleton=skeleton)
            if "down_proj" not in sliced or "gate_up_proj" not in sliced:
                raise ValueError(f"layer {layer.layer_index}: experts module lacks gate_up_proj/down_proj to slice")
            for name in adapter.router_tensors:
                if router_tensor(layer.router, name) is not None:
                    _slice_router_tensor(layer.router, name, index, old_count, skeleton)
            for module in (layer.block, layer.experts, layer.router):
                _set_counts(module, old_count, new_count, top_k)
    new_count = max(counts.values())
    for key in adapter.count_keys:
        setattr(text, key, new_count)
    if top_k is not None and top_k > min(counts.values()):
        setattr(text, adapter.top_k_key, min(counts.values()))
    setattr(model, ORIGINAL_COUNTS_ATTRIBUTE, original)
    logger.info("pruned %s to %s experts per layer", adapter.family, sorted(set(counts.values())))
    return model


def expert_counts(model: nn.Module) -> dict[int, int]:
    """The number of experts of every MoE layer of ``model``."""
    return {layer.layer_index: layer.num_experts for layer in find_moe_layers(model)}
