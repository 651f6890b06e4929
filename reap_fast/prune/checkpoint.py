"""Write a pruned model in its source checkpoint's own layout, straight from the source's safetensors.

A pruned folder must load wherever its source loads (transformers 4.55 as pinned by upstream REAP and
vLLM 0.10, and transformers 5.x), so nothing is re-serialised by the transformers version that happens
to be installed:

* ``config.json`` is the source's JSON with only the expert counts edited: the keys the family's
  adapter entry names, under any spelling transformers' config classes of the family alias them to
  (Qwen3-MoE's ``num_experts`` is written ``num_local_experts`` by transformers 5): count keys set to
  the new count, list keys set entry by entry as upstream does, a top-k above the new count clamped;
  nested configs too. Every other key, and the key spelling (``torch_dtype``, ``rope_scaling``), stays
  as the source wrote it.
* tokenizer files, ``generation_config.json``, chat templates and any remote-code ``*.py`` are copied
  byte for byte.
* weights keep the source's tensor names, dtypes (unless a dtype is asked for: ``prune --dtype``) and shard
  files: per-expert tensors
  (``...experts.<e>.gate_proj.weight``) of removed experts are dropped and the kept ones renumbered
  0..n-1; fused expert tensors (``...experts.gate_up_proj``, expert on dim 0) and router tensors
  (``gate``/``router`` weight on dim 0, biases and ``e_score_correction_bias`` on their last dim) are
  gathered at the kept experts. Everything else is copied bit for bit. A source with an index gets an
  index with the same shard names.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CONFIG_MAPPING

from ..models import ADAPTERS, MoEAdapter, UnsupportedModelError, adapter_for_model_types

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# the config keys the adapter entries name for the expert count
COUNT_KEYS = tuple(dict.fromkeys(key for adapter in ADAPTERS for key in adapter.count_keys))
# files of the source that are not copied: weights in other formats and the model card of the source
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_NOT_COPIED_NAMES = frozenset({"config.json", INDEX_NAME, "README.md", "pruned_experts.json", "reap_args.yaml"})

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<expert>\d+)\.(?P<tail>.+)$")
_FUSED_EXPERTS = re.compile(r"(?:^|\.)experts\.[^.]+$")


def _router_pattern() -> re.Pattern[str]:
    """Router tensors indexed by expert, from the adapter entries: each family's ``router_tensors`` under its
    ``gate``/``router`` module, and the checkpoint spellings its streaming layout renames them to."""
    tails = {name for adapter in ADAPTERS for name in adapter.router_tensors}
    renamed = {
        on_disk
        for adapter in ADAPTERS
        if adapter.streaming is not None
        for module_name, on_disk in adapter.streaming.renames
        if any(module_name.endswith(tail) for tail in tails)
    }
    under_router = "|".join(map(re.escape, sorted(tails)))
    alternatives = [rf"(?:^|\.)(?:gate|router)\.(?:{under_router})$"]
    alternatives += [rf"(?:^|\.){re.escape(name)}$" for name in sorted(renamed)]
    return re.compile("|".join(alternatives))


_ROUTER = _router_pattern()


class SourceLayoutError(ValueError):
    """The source checkpoint's tensors do not match the pruned model (a layout this writer cannot edit)."""


def source_checkpoint(path: str | Path | None) -> Path | None:
    """The local folder holding ``config.json`` and safetensors weights at ``path``, else None."""
    if not path:
        return None
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None
    if (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file():
        return folder
    return None


def pruned_config(source: Mapping[str, Any], original_count: int, new_count: int) -> dict[str, Any]:
    """The source ``config.json`` dict with its family's expert-count keys set to ``new_count`` (nested configs too)."""
    config = json.loads(json.dumps(source))  # deep copy that keeps key order
    keys = _ConfigKeys.of(_config_adapter(config))
    edited = _edit_counts(config, keys, original_count, new_count)
    if not edited:
        raise SourceLayoutError(
            f"config.json names no expert count equal to {original_count} (looked for {', '.join(keys.counts)})"
        )
    return config


@dataclass(frozen=True)
class _ConfigKeys:
    """The ``config.json`` keys of one family that a pruned config edits, in every spelling."""

    counts: tuple[str, ...]
    top_k: tuple[str, ...]
    lists: tuple[str, ...]

    @classmethod
    def of(cls, adapter: MoEAdapter) -> "_ConfigKeys":
        return cls(_spellings(adapter, adapter.count_keys), _spellings(adapter, adapter.top_k_keys),
                   _spellings(adapter, adapter.expert_list_keys))


def _spellings(adapter: MoEAdapter, keys: tuple[str, ...]) -> tuple[str, ...]:
    """``keys`` and the names the family's transformers config classes alias them to (``attribute_map``)."""
    names = list(keys)
    for model_type in adapter.model_types:
        attribute_map = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) if model_type in CONFIG_MAPPING else {}
        names += [target for alias, target in attribute_map.items() if alias in keys]
        names += [alias for alias, target in attribute_map.items() if target in keys]
    return tuple(dict.fromkeys(names))


def _config_adapter(config: Mapping[str, Any]) -> MoEAdapter:
    """The family of a ``config.json`` dict: its ``model_type``, else a nested config's (multimodal wrappers)."""
    nested = [value.get("model_type") for value in config.values() if isinstance(value, dict)]
    try:
        return adapter_for_model_types([config.get("model_type"), *nested])
    except UnsupportedModelError as exc:
        raise SourceLayoutError(f"config.json: {exc}") from None


def _edit_counts(config: dict[str, Any], keys: _ConfigKeys, original_count: int, new_count: int) -> int:
    edited = 0
    for key in keys.counts:
        if config.get(key) == original_count:
            config[key] = new_count
            edited += 1
    if edited:
        for key in keys.lists:
            if isinstance(config.get(key), list):
                config[key] = [new_count] * len(config[key])
        for key in keys.top_k:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > new_count:
                config[key] = new_count
    for value in config.values():
        if isinstance(value, dict):
            edited += _edit_counts(value, keys, original_count, new_count)
    return edited


@dataclass(frozen=True)
class PrunePlan:
    """The kept experts of every MoE layer (sorted) and the experts per layer before pruning."""

    keep: Mapping[int, list[int]]
    original_count: int
    dtype: str | None = None  # "bfloat16", "float16", "float32": floating weights cast to it; None keeps the source's

    @property
    def new_count(self) -> int:
        return len(next(iter(self.keep.values())))


def _router_dim(name: str, shape: torch.Size, count: int) -> int | None:
    """Dimension of a router tensor indexed by expert (weights: dim 0; biases: the last dim)."""
    if not shape:
        return None
    dim = 0 if name.endswith(".weight") else len(shape) - 1
    return dim if shape[dim] == count else None


def _pruned_tensor(name: str, read, plan: PrunePlan) -> tuple[str, torch.Tensor] | None:
    """(new name, tensor) for one source tensor, or None when it belongs to a removed expert."""
    layer_match = _LAYER.search(name)
    layer = int(layer_match.group(1)) if layer_match else None
    if layer not in plan.keep:
        return name, read()
    kept = plan.keep[layer]
    per_expert = _PER_EXPERT.match(name)
    if per_expert is not None:
        expert = int(per_expert.group("expert"))
        if expert not in kept:
            return None
        return f"{per_expert.group('head')}.{kept.index(expert)}.{per_expert.group('tail')}", read()
    tensor = read()
    index = torch.tensor(kept, dtype=torch.long)
    if _FUSED_EXPERTS.search(name) and "shared_expert" not in name and tensor.dim() and tensor.shape[0] == plan.original_count:
        return name, tensor.index_select(0, index).contiguous()
    if _ROUTER.search(name) and "shared_expert" not in name:
        dim = _router_dim(name, tensor.shape, plan.original_count)
        if dim is not None:
            return name, tensor.index_select(dim, index).contiguous()
    return name, tensor


def _shards(source: Path) -> tuple[list[str], dict[str, Any]]:
    """The source's shard file names in order, and its index metadata (empty for a single file)."""
    if (source / INDEX_NAME).is_file():
        index = json.loads((source / INDEX_NAME).read_text(encoding="utf-8"))
        names = list(dict.fromkeys(index["weight_map"].values()))
        return names, dict(index.get("metadata") or {})
    return [SINGLE_NAME], {}


def write_pruned_weights(source: Path, target: Path, plan: PrunePlan) -> int:
    """Write the pruned shards (and index) of ``source`` into ``target``; returns the number of weights kept."""
    shard_names, index_metadata = _shards(source)
    weight_map: dict[str, str] = {}
    total_bytes, total_numel = 0, 0
    for shard in shard_names:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(source / shard), framework="pt") as handle:
            shard_metadata = handle.metadata()
            for name in handle.keys():
                result = _pruned_tensor(name, lambda name=name: handle.get_tensor(name), plan)
                if result is None:
                    continue
                new_name, tensor = result
                if plan.dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(getattr(torch, plan.dtype))
                tensors[new_name] = tensor
        if not tensors:
            continue
        save_file(tensors, str(target / shard), metadata=shard_metadata)
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total_bytes += tensor.numel() * tensor.element_size()
            total_numel += tensor.numel()
    if (source / INDEX_NAME).is_file():
        index = {"metadata": {**index_metadata, "total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (target / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total_numel


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy the source's top-level non-weight files (tokenizer, generation config, code) unchanged."""
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in _NOT_COPIED_NAMES:
            continue
        if path.name.endswith(_NOT_COPIED_SUFFIXES):
            continue
        shutil.copy2(path, target / path.name)
        copied.append(path.name)
    return copied


def write_source_layout(source: Path, target: Path, plan: PrunePlan) -> int:
    """Write config, side files and pruned weights of ``source`` into the existing folder ``target``.

    Returns the number of weight elements written (the caller checks it against the pruned model).
    """
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    edited = pruned_config(config, plan.original_count, plan.new_count)
    if plan.dtype is not None:  # the dtype the weights are written in, under the spellings the source uses
        for key in ("torch_dtype", "dtype"):
            if key in edited or key == "torch_dtype":
                edited[key] = plan.dtype
    copy_side_files(source, target)
    (target / "config.json").write_text(json.dumps(edited, indent=2) + "\n", encoding="utf-8")
    return write_pruned_weights(source, target, plan)
