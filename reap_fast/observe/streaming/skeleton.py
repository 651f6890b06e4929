"""The model without weights: built on the meta device, its decoder layers found, unloaded layers stood in for.

Also which families streaming accepts (:func:`streaming_supported`: those whose adapter entry has a
``streaming`` layout) and the observer whose accumulators live on the compute device while the
skeleton's parameters are on ``meta``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ...models import StreamingLayout, UnsupportedModelError, get_adapter, streaming_families
from ...models.weights import build_skeleton, decoder_layers
from ..session import Observer
from .errors import StreamingError

# Families whose streamed statistics are tested equal to the in-memory forward (tests/test_streaming.py):
# those with a ``streaming`` layout in their adapter entry (reap_fast/models/families.py).
STREAMING_FAMILIES = streaming_families()

__all__ = ["STREAMING_FAMILIES", "PassThrough", "StreamingObserver", "build_skeleton", "decoder_layers",
           "parameter_name", "streaming_supported"]


def parameter_name(model: nn.Module, tensor: torch.Tensor) -> str:
    """The dotted name under which ``model`` holds the parameter ``tensor``."""
    for name, value in model.named_parameters():
        if value is tensor:
            return name
    raise StreamingError("cannot find the embedding matrix among the model's parameters")


def streaming_supported(config) -> StreamingLayout:
    """The family's streaming layout, or a clear error when streaming is not checked exact on ``config``."""
    adapter = get_adapter(config)
    layout = adapter.streaming
    if layout is None:
        raise UnsupportedModelError(
            f"layer streaming (--layerwise) supports {', '.join(STREAMING_FAMILIES)}; {adapter.family} is not checked "
            "exact against the in-memory forward yet: observe it without --layerwise (device_map offload works for "
            "models slightly bigger than one GPU)"
        )
    model_type = getattr(config, "model_type", None)
    if layout.model_types and model_type not in layout.model_types:
        raise UnsupportedModelError(
            f"layer streaming (--layerwise) reads {adapter.family} checkpoints of model_type "
            f"{' or '.join(layout.model_types)} only; {layout.refusal or f'not {model_type}'}: observe it without "
            "--layerwise"
        )
    return layout


class PassThrough(nn.Module):
    """Stands in for a decoder layer that is not loaded: returns its input hidden states."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        for attribute in ("layer_idx", "layer_type", "attention_type", "is_sliding"):
            if attribute in layer.__dict__:
                setattr(self, attribute, layer.__dict__[attribute])

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class StreamingObserver(Observer):
    """An :class:`Observer` over a meta-device skeleton: accumulators live on the compute device."""

    def __init__(
        self, model: nn.Module, engine: str, renormalize: bool, device: torch.device, merging: bool = False
    ) -> None:
        super().__init__(model, engine=engine, renormalize=renormalize, merging=merging)
        self._device = torch.device(device)
        self.accumulators = {layer.layer_index: self.new_accumulator(layer, self._device) for layer in self.layers}

    @contextmanager
    def counting(self, stats_mask: torch.Tensor) -> Iterator[None]:
        """The statistics mask of the forward call inside the block."""
        self._token_mask = stats_mask.reshape(-1).to(self._device, torch.bool)
        try:
            yield
        finally:
            self._token_mask = None
