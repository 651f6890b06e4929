"""Which engine observes a model: 'auto' takes the Triton engine only where it can observe every MoE layer.

The decision reads the model's experts modules (their layout flags, activation and parameter dtypes), so a
model on the meta device (a skeleton built from the config) gives the same answer as the loaded one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import EngineUnavailableError
from ..models import find_moe_layers

logger = logging.getLogger(__name__)


def _experts_obstacle(experts: nn.Module, experts_layout, supported: tuple[torch.dtype, ...]) -> str | None:
    """Why the Triton engine cannot run ``experts`` (None: it can)."""
    try:
        experts_layout(experts)
    except EngineUnavailableError as exc:
        return str(exc)
    dtypes = {p.dtype for p in experts.parameters()}
    if len(dtypes) > 1:
        return f"{type(experts).__name__}: mixed parameter dtypes {', '.join(sorted(map(str, dtypes)))}"
    if not dtypes <= set(supported):
        return f"{type(experts).__name__}: dtype {dtypes.pop()} is not supported (fp16, bf16, fp32)"
    return None


def triton_obstacle(model: nn.Module) -> str | None:
    """Why the Triton engine cannot observe ``model`` (None: every MoE layer's experts are supported)."""
    try:
        from reap_kernels.validate import SUPPORTED_DTYPES

        from .triton_engine import experts_layout
    except ImportError as exc:
        return f"the triton engine needs triton and the reap_kernels package: {exc}"
    for layer in find_moe_layers(model):
        reason = _experts_obstacle(layer.experts, experts_layout, SUPPORTED_DTYPES)
        if reason is not None:
            return f"layer {layer.layer_index}: {reason}"
    return None


def engine_needs_model(engine: str, device: str) -> bool:
    """Whether choosing the engine for ``engine`` on ``device`` reads the model (Triton is a candidate)."""
    return engine == "triton" or (engine == "auto" and device.startswith("cuda"))


def choose_engine(engine: str, device: str, model: nn.Module | None) -> str:
    """The engine that observes ``model`` on ``device`` for the requested ``engine``.

    'auto': Triton on CUDA when :func:`triton_obstacle` finds none, else the reference engine (logged once
    with the reason); ``model`` may be None where the answer does not need it. 'triton' on a model it cannot observe raises :class:`EngineUnavailableError`.
    """
    if not engine_needs_model(engine, device):
        return "reference"
    reason = triton_obstacle(model)
    if reason is None:
        return "triton"
    if engine == "triton":
        raise EngineUnavailableError(f"--engine triton cannot observe this model: {reason}")
    logger.info("--engine auto: observing with the reference engine (%s)", reason)
    return "reference"
