"""Reading one decoder layer's tensors from a safetensors checkpoint, per-expert tensors fused.

Only the keys under the layer's prefix are read (``safe_open``; the index json says which shard holds a
key); per-expert tensors are stacked into the fused ``gate_up_proj`` (E, 2I, H) / ``down_proj``
(E, H, I) layout exactly as transformers' weight conversion does at load time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ...models import StreamingLayout
from .errors import StreamingError


class CheckpointTensors:
    """The tensor names of a safetensors checkpoint (single file or sharded with an index) and their reads."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                self.files = {key: single for key in handle.keys()}
        else:
            raise StreamingError(
                f"{self.folder} has no model.safetensors or model.safetensors.index.json: layer streaming reads "
                "local safetensors checkpoints only"
            )

    def names_under(self, prefix: str) -> set[str]:
        """Checkpoint keys starting with ``prefix``, with the prefix removed."""
        return {key[len(prefix):] for key in self.files if key.startswith(prefix)}

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` on the CPU, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        tensors = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in names:
                    tensors[key] = handle.get_tensor(key)
        return tensors


def _persistent_names(module: nn.Module) -> list[str]:
    """Parameter and persistent-buffer names of ``module`` (what a checkpoint holds), in order."""
    return list(module.state_dict(keep_vars=True).keys())


def _expert_sources(
    name: str, num_experts: int, available: set[str], layout: StreamingLayout
) -> tuple[str, list[list[str]]] | None:
    """How transformers builds a fused experts tensor from per-expert checkpoint tensors.

    By the family's ``layout.fused_experts``, e.g. ``experts.gate_up_proj`` (E, 2I, H) = concat over
    dim 1 of stack(gate_proj) and stack(up_proj); ``experts.down_proj`` (E, H, I) = stack(down_proj).
    Returns (kind, [source key lists]) or None.
    """
    for fused, parts in layout.fused_experts:
        if name.endswith(f"experts.{fused}"):
            base = name[: -len(fused)]
            sources = [[f"{base}{e}.{part}.weight" for e in range(num_experts)] for part in parts]
            if all(key in available for group in sources for key in group):
                return fused, sources
    return None


def _renamed(name: str, renames: tuple[tuple[str, str], ...], available: set[str]) -> str | None:
    """The checkpoint key of module tensor ``name`` under one of the family's renames, if present."""
    for module_suffix, checkpoint_suffix in renames:
        if name.endswith(module_suffix):
            candidate = name[: len(name) - len(module_suffix)] + checkpoint_suffix
            if candidate in available:
                return candidate
    return None


def layer_tensors(
    reader: CheckpointTensors, prefix: str, module: nn.Module, layout: StreamingLayout = StreamingLayout()
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (keys under ``prefix``), fused experts stacked, shapes checked.

    ``layout`` is the family's (its adapter's ``streaming``): renamed tensors and the per-expert tensors
    each fused experts tensor is built from. Every tensor under ``prefix`` must be used and every parameter
    found, so a checkpoint layout that needs other conversions (transposed or quantised experts) stops
    with a clear error.
    """
    available = reader.names_under(prefix)
    shapes = {name: tuple(value.shape) for name, value in module.state_dict(keep_vars=True).items()}
    plan: dict[str, tuple[str, list[list[str]]]] = {}
    for name in _persistent_names(module):
        source = name if name in available else _renamed(name, layout.renames, available)
        if source is not None:
            plan[name] = ("copy", [[source]])
            continue
        sources = _expert_sources(name, shapes[name][0], available, layout) if len(shapes[name]) == 3 else None
        if sources is None:
            raise StreamingError(
                f"layer streaming cannot find {prefix}{name} in the checkpoint (nor per-expert tensors to fuse); "
                "this checkpoint layout is not supported, load the model in memory instead (without --layerwise)"
            )
        plan[name] = sources
    used = {key for _, groups in plan.values() for group in groups for key in group}
    unused = sorted(available - used)
    if unused:
        raise StreamingError(
            "layer streaming does not know what to do with checkpoint tensors "
            f"{', '.join(prefix + k for k in unused[:4])}"
            f"{' ...' if len(unused) > 4 else ''}; load the model in memory instead (without --layerwise)"
        )
    raw = reader.load([prefix + key for key in sorted(used)])
    tensors = {}
    for name, (kind, groups) in plan.items():
        if kind == "copy":
            tensor = raw.pop(prefix + groups[0][0])
        else:
            stacked = [torch.stack([raw.pop(prefix + key) for key in group]) for group in groups]
            tensor = stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)
        if tuple(tensor.shape) != shapes[name]:
            raise StreamingError(
                f"checkpoint tensor {prefix}{name} has shape {tuple(tensor.shape)}, the model expects {shapes[name]}"
            )
        tensors[name] = tensor
    return tensors
