"""Hiding the weight reads of layer streaming: the next decoder layer's tensors are read (and, on a GPU,
copied to it) on a background thread while the current layer computes.

At most two layers are in flight: the one computing and the next one. Each has its own reused
:class:`~reap_fast.models.weights.Arena` (pinned on a GPU run, so the host-to-device copy is asynchronous),
so host memory holds 2·W_layer of weights whatever the depth; the next read starts only after the layer
before the current one was released, which frees its arena for it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ...models import StreamingLayout
from ...models.weights import Arena, CheckpointTensors, layer_tensors


class LayerPrefetcher:
    """Reads decoder layer ``i`` of ``layers`` (named ``{layers_name}.{i}.``) ahead of its use."""

    def __init__(self, reader: CheckpointTensors, layers: list[nn.Module], layers_name: str,
                 layout: StreamingLayout, device: torch.device) -> None:
        self.reader, self.layers, self.layers_name, self.layout = reader, layers, layers_name, layout
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.arenas = (Arena(pinned=cuda), Arena(pinned=cuda))
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="reap-fast-prefetch")
        self.pending: dict[int, Future] = {}

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        layer = self.layers[index]
        tensors = layer_tensors(self.reader, f"{self.layers_name}.{index}.", layer, self.layout,
                                arena=self.arenas[index % 2])
        targets = {name: value.dtype for name, value in layer.state_dict(keep_vars=True).items()}
        if self.stream is None:
            return {name: _cast(tensor, targets[name]) for name, tensor in tensors.items()}
        with torch.cuda.stream(self.stream):
            placed = {name: _cast(tensor.to(self.device, non_blocking=True), targets[name])
                      for name, tensor in tensors.items()}
        self.stream.synchronize()
        return placed

    def request(self, index: int) -> None:
        """Start reading layer ``index`` (nothing past the last layer, nothing twice)."""
        if index < len(self.layers) and index not in self.pending:
            self.pending[index] = self.pool.submit(self._load, index)

    def take(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors (in the model's dtypes, on the device), waiting for its read if needed."""
        self.request(index)
        return self.pending.pop(index).result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the skeleton's dtype, as ``from_pretrained(dtype=...)`` casts them."""
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor
