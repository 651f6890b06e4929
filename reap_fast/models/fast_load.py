"""Loading a whole model at disk speed: the safetensors shards read straight into the model's own (fused)
layout by :mod:`reap_fast.models.weights`, without transformers' load-time conversion pass.

The model is built on the meta device; every decoder layer's tensors come from :func:`layer_tensors` (fused
experts written expert by expert into their final buffer), the others (embeddings, final norm, LM head) are
copied by name; tied weights are tied again. Tensors stored in the model's dtype are zero-copy views of a
private map of the shard (the page cache's pages, nothing copied); others are read and converted as
``from_pretrained(dtype=...)`` converts them. The result equals transformers' own load tensor for tensor
(tests/test_fast_load.py). :func:`load_weights` returns None where it does not apply (no safetensors, a
family without a streaming layout, a quantized checkpoint); the caller then uses ``from_pretrained``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint_index import safetensors_files
from .families import get_adapter
from .weights import CheckpointLayoutError, CheckpointTensors, build_skeleton, decoder_layers, layer_tensors, tensor_plan

logger = logging.getLogger(__name__)


def _place(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put ``tensors`` into ``module``'s meta parameters / buffers on ``device``, in each one's own dtype."""
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        current = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
        value = tensor.to(device=device, dtype=current.dtype if tensor.is_floating_point() else tensor.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)
        else:
            owner._buffers[leaf] = value


def _outside_layers(model: nn.Module, layers_name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the model's persistent tensors outside the decoder layers, tied duplicates left out."""
    seen: set[int] = set()
    shapes = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name.startswith(layers_name + "."):
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        shapes[name] = tuple(value.shape)
    return shapes


def _read_model(model: nn.Module, reader: CheckpointTensors, layout, device: torch.device) -> None:
    """Fill every persistent tensor of the meta-device ``model`` from ``reader``, layer by layer onto ``device``
    (on a GPU the host holds one layer at a time)."""
    model.tie_weights()  # tied tensors are one parameter: read once
    _, layers, layers_name = decoder_layers(model)
    for index, layer in enumerate(layers):
        _place(layer, layer_tensors(reader, f"{layers_name}.{index}.", layer, layout, mapped=True), device)
    shapes = _outside_layers(model, layers_name)
    remaining = {key for key in reader.entries if not key.startswith(layers_name + ".")}
    plan = tensor_plan(_Subset(remaining), "", shapes, layout)
    _place(model, {name: reader.mapped(groups[0][0]) for name, groups in plan.items()}, device)
    for module in model.modules():  # buffers computed at construction (rotary frequencies)
        for leaf, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                module._buffers[leaf] = buffer.to(device)
    model.tie_weights()  # placing replaced the tied parameter: tie its users to the new one


class _Subset:
    """The reader restricted to some keys (``tensor_plan`` checks that each of them is used)."""

    def __init__(self, keys: set[str]) -> None:
        self._keys = keys

    def names_under(self, prefix: str) -> set[str]:
        return {key[len(prefix):] for key in self._keys if key.startswith(prefix)}


def load_weights(path: str | os.PathLike, config, dtype: torch.dtype, device: str = "cpu") -> nn.Module | None:
    """The model of the local safetensors checkpoint ``path`` on ``device`` in ``dtype``, or None where the fast
    path does not apply (the caller falls back to ``from_pretrained``)."""
    folder = Path(str(path)).expanduser()
    layout = get_adapter(config).streaming
    if layout is None or getattr(config, "quantization_config", None) or safetensors_files(folder) is None:
        return None
    if layout.model_types and getattr(config, "model_type", None) not in layout.model_types:
        return None
    reader = CheckpointTensors(folder)
    try:
        model = build_skeleton(config, dtype)
        _read_model(model, reader, layout, torch.device(device))
    except CheckpointLayoutError as exc:
        logger.info("fast loader: %s; loading with from_pretrained", exc)
        return None
    finally:
        reader.close()
    leftover = [name for name, value in model.named_parameters() if value.device.type == "meta"]
    if leftover:
        logger.info("fast loader: %s not in the checkpoint; loading with from_pretrained", leftover[:3])
        return None
    _load_generation_config(model, folder)
    return model.eval()


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """The checkpoint's generation config, as ``from_pretrained`` attaches it."""
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
