"""Putting a layer's weights into the meta-device skeleton and taking them out again, with the byte count."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .memory import MemoryBudget


@dataclass
class StreamingReport:
    """What a streaming run used: the buffer tier and the resident weight bytes (peak over the run)."""

    tier: str = ""
    hidden_bytes: int = 0
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    layer_bytes: list[int] = field(default_factory=list)  # weights of each decoder layer
    embed_bytes: int = 0
    live_weight_bytes: int = 0
    peak_weight_bytes: int = 0  # largest sum of materialised weights at any time
    load_seconds: float = 0.0  # reading, stacking and placing layer weights
    compute_seconds: float = 0.0  # the batches through the layers
    embed_seconds: float = 0.0  # the embedding pass

    def add(self, nbytes: int) -> None:
        self.live_weight_bytes += nbytes
        self.peak_weight_bytes = max(self.peak_weight_bytes, self.live_weight_bytes)

    def remove(self, nbytes: int) -> None:
        self.live_weight_bytes -= nbytes


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> int:
    """Put ``tensors`` into ``module``'s meta parameters/buffers on ``device``; return the bytes placed.

    Floating tensors take the skeleton's dtype (as ``from_pretrained(dtype=...)`` casts them).
    Non-persistent buffers (computed at construction) are moved to ``device``.
    """
    placed = 0
    for name, tensor in tensors.items():
        owner, leaf = _owner(module, name)
        current = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
        dtype = current.dtype if tensor.is_floating_point() else tensor.dtype
        value = tensor.to(device=device, dtype=dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
        placed += value.numel() * value.element_size()
    for submodule in module.modules():
        for leaf, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                submodule._buffers[leaf] = buffer.to(device)
    return placed


def release(module: nn.Module) -> None:
    """Free ``module``'s weights (they go back to the meta device)."""
    module.to("meta")
