"""REAP expert pruning: select the experts to keep from an observation, slice the model, save it.

Public API::

    config = PruneConfig(method="reap", compression_ratio=0.5)                      # reap_fast.config.PruneConfig
    keep = select_experts(metrics, config, top_k=8)                                 # {layer: kept indices}
    prune_model(model, keep)                                                        # in place
    save_pruned(model, tokenizer, "out/", keep, {"method": "reap"})                 # atomic
    prune_checkpoint("model/", "observations.pt", "out/", config)                   # all of the above

Drop-in command lines: ``python -m reap_fast.prune`` and ``python -m reap_fast.layerwise_prune`` accept
upstream REAP's flags (see :mod:`reap_fast.upstream`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config.prune import METHOD_CHOICES, PruneConfig
from ..errors import ReapFastError
from ..identity import check_identity
from ..metrics import LayerMetrics, load_metrics
from ..models import get_adapter, text_config
from ..models.disk_estimate import written_bytes
from ..outputs import OutputLock, clean_leftovers
from ..preflight import check_model_folder, check_output_location, weights_bytes
from .checkpoint import SourceLayoutError, source_checkpoint
from .save import OutputExistsError, holds_model, prepare_output_dir, save_pruned
from .scores import DEFAULT_METHOD, UnknownMethodError, layer_scores, super_expert_mask
from .select import SelectionError, experts_to_prune, removal_order, removed_experts, select_experts, uniform_prune_count
from .slicing import KeepIndexError, UnevenPruningError, expert_counts, prune_model

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHOD",
    "METHOD_CHOICES",
    "KeepIndexError",
    "MetricsMismatchError",
    "OutputExistsError",
    "PruneConfig",
    "SelectionError",
    "UnevenPruningError",
    "UnknownMethodError",
    "check_metrics_match",
    "check_prune_budget",
    "experts_to_prune",
    "expert_counts",
    "holds_model",
    "layer_scores",
    "model_routing",
    "prune_checkpoint",
    "prune_model",
    "pruned_size",
    "removal_order",
    "removed_experts",
    "save_pruned",
    "select_experts",
    "uniform_prune_count",
    "super_expert_mask",
]


class MetricsMismatchError(ReapFastError, ValueError):
    """The observation file was recorded on another model (layer set or expert count differ)."""


def check_metrics_match(model, metrics: dict[int, LayerMetrics], source: str = "observation") -> None:
    """Raise :class:`MetricsMismatchError` unless ``metrics`` has the model's MoE layers and expert counts."""
    model_counts = expert_counts(model)
    metric_counts = {layer: int(metrics[layer]["expert_frequency"].shape[0]) for layer in sorted(metrics)}
    if sorted(model_counts) != sorted(metric_counts):
        raise MetricsMismatchError(
            f"{source}: metrics file of another model: it has MoE layers {sorted(metric_counts)}, the model has "
            f"{sorted(model_counts)}"
        )
    differing = {layer: (metric_counts[layer], count) for layer, count in model_counts.items() if metric_counts[layer] != count}
    if differing:
        detail = ", ".join(f"layer {layer}: {m} in the file vs {c} in the model" for layer, (m, c) in differing.items())
        raise MetricsMismatchError(f"{source}: metrics file of another model: expert counts differ ({detail})")


def model_routing(model_or_config) -> dict[str, Any]:
    """Top-k and group-limited routing of a model or config: ``{"top_k": k, "groups": (n_group, topk_group) | None}``."""
    full_config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(full_config)
    config = text_config(full_config)
    top_k = getattr(config, adapter.top_k_key, None)
    groups = None
    if adapter.group_keys is not None:
        n_group, topk_group = (getattr(config, key, None) for key in adapter.group_keys)
        if n_group is not None:
            groups = (int(n_group), int(topk_group) if topk_group is not None else int(n_group))
    return {"top_k": int(top_k) if top_k is not None else None, "groups": groups}


def check_prune_budget(config, pruning: PruneConfig | None = None) -> int:
    """Check a pruning budget against a model config before any calibration work; returns experts removed per layer.

    ``pruning`` (default: :class:`PruneConfig`'s, a ratio of 0.5) holds the budget. Catches a ratio that
    leaves fewer experts than the top-k (or than a routing group needs) while it costs nothing, instead of
    after a long observation.
    """
    pruning = PruneConfig() if pruning is None else pruning
    adapter = get_adapter(config)
    num_experts = int(getattr(text_config(config), adapter.num_experts_key))
    routing = model_routing(config)
    count = experts_to_prune(num_experts, pruning, routing["top_k"], routing["groups"])
    return uniform_prune_count(num_experts, count, routing["top_k"], routing["groups"], pruning.min_experts_per_layer)


def pruned_size(model_path: str | os.PathLike, model_config, removed: int,
                quantization: tuple[int, int] | None = None) -> int:
    """Bytes the pruned folder takes (``removed`` experts per layer), or its W{bits}A16 form with ``quantization``
    (bits, group size): estimated from the source's headers (:mod:`reap_fast.models.disk_estimate`), else from
    its weight files (a pruned model is at most as large; 4 bits of 16 about half)."""
    adapter = get_adapter(model_config)
    experts = int(getattr(text_config(model_config), adapter.num_experts_key))
    estimate = written_bytes(model_path, pruning=(experts, experts - removed), quantization=quantization)
    if estimate is None:
        return weights_bytes(model_path) // (1 if quantization is None else 2)
    return estimate


def check_prune_memory(model_path: str | os.PathLike, model_config, config: PruneConfig, from_source: bool) -> None:
    """Refuse, in one line before loading, a pruning whose peak memory cannot fit (see ``models.memory_plan``)."""
    from ..devices import resolve_device
    from ..memory import free_memory
    from ..models.loading import resolve_dtype
    from ..models.memory_plan import check_fits, prune_peak

    device = "cpu" if from_source else resolve_device(config.device)
    peak = prune_peak(model_path, resolve_dtype(config.dtype, model_config), from_source, device)
    check_fits(peak, free_memory(device), "pruning " + ("from the source's shards" if from_source else "the loaded model"))


def prune_checkpoint(
    model_path: str | os.PathLike,
    metrics_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: PruneConfig | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Load a checkpoint and an observation file, select, slice and save the pruned model; returns the folder.

    ``config`` (default: :class:`PruneConfig`'s) says how; without a budget the ratio is 0.5 (upstream's
    default). ``metadata`` is added to the settings recorded in ``pruned_experts.json``/``reap_args.yaml``.
    """
    from ..models.loading import load_config, load_model, load_skeleton

    config = PruneConfig() if config is None else config
    with OutputLock(output_dir):
        clean_leftovers(output_dir)
        # everything is checked before the model is loaded
        prepare_output_dir(output_dir, config.overwrite, {"model folder": model_path, "observation file": metrics_path})
        model_config = load_config(str(model_path))
        removed = check_prune_budget(model_config, config)
        metrics = load_metrics(metrics_path)
        check_model_folder(model_path, need_tokenizer=True)
        check_output_location(output_dir, pruned_size(model_path, model_config, removed))
        check_identity(metrics, model_config, model_path, str(metrics_path))
        # a safetensors source is rewritten from its own files: the weights are never loaded
        from_source = source_checkpoint(model_path) is not None
        check_prune_memory(model_path, model_config, config, from_source)
        if from_source:
            model, tokenizer = load_skeleton(str(model_path), dtype=config.dtype, config=model_config)
        else:
            model, tokenizer = load_model(str(model_path), device=config.device, dtype=config.dtype, config=model_config)
        check_metrics_match(model, metrics, str(metrics_path))
        routing = model_routing(model)
        keep = select_experts(metrics, config, top_k=routing["top_k"], groups=routing["groups"])
        prune_model(model, keep)
        info = {
            "method": config.method,
            "compression_ratio": config.compression_ratio,
            "n_experts_to_prune": config.n_experts_to_prune,
            "seed": config.seed,
            "preserve_super_experts": config.preserve_super_experts,
            "preserve_outliers": config.preserve_outliers,
            "dtype": config.dtype,  # "auto": the source's own; else the saved weights are cast to it
            "source_model": str(model_path),
            "observation_file": str(metrics_path),
            **(metadata or {}),
        }
        try:
            return save_pruned(model, tokenizer, output_dir, keep, info, overwrite=config.overwrite)
        except SourceLayoutError as exc:
            if not from_source:
                raise
            logger.warning("%s; loading the weights to save with save_pretrained", exc)
            # the config again from disk: the skeleton shares model_config, and prune_model edited it
            model, tokenizer = load_model(str(model_path), device=config.device, dtype=config.dtype)
            prune_model(model, keep)
            return save_pruned(model, tokenizer, output_dir, keep, info, overwrite=config.overwrite)
