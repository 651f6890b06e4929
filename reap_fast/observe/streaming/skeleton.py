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
from transformers import AutoModelForCausalLM

from ...models import StreamingLayout, UnsupportedModelError, get_adapter, streaming_families
from ..session import Observer
from .errors import StreamingError

# Families whose streamed statistics are tested equal to the in-memory forward (tests/test_streaming.py):
# those with a ``streaming`` layout in their adapter entry (reap_fast/models/families.py).
STREAMING_FAMILIES = streaming_families()


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM for ``config`` with parameters on the meta device (buffers computed on the host)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """(base model that runs the layers, its layer list, the layers' name prefix, e.g. 'model.layers')."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = int(text_config.num_hidden_layers)
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) == count:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return parent, module, name
    raise StreamingError(f"cannot find the decoder layer list of {model.__class__.__name__}")


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
