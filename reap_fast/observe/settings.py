"""What one process observes with: an :class:`~reap_fast.config.ObserveConfig` with its 'auto' values resolved."""

from __future__ import annotations

import dataclasses

import torch

from ..config import ObserveConfig
from ..devices import resolve_device
from ..models.loading import resolve_dtype
from ..models.weights import build_skeleton
from .engine_choice import choose_engine, engine_needs_model


def resolve_engine(engine: str, device: str, model_config, dtype: torch.dtype) -> str:
    """'auto' -> the Triton engine on GPU where it can observe this model, else the reference engine.

    An explicit 'triton' the model's experts cannot take raises ``EngineUnavailableError`` (before any
    weight is read: the decision reads a skeleton of the model built from ``model_config`` in ``dtype``).
    """
    skeleton = build_skeleton(model_config, dtype) if engine_needs_model(engine, device) else None
    return choose_engine(engine, device, skeleton)


def process_settings(config: ObserveConfig, model_config) -> ObserveConfig:
    """``config`` with device (one present here), dtype (the checkpoint's for 'auto') and engine resolved.

    Idempotent: resolved settings resolve to themselves.
    """
    device = resolve_device(config.device)
    torch_dtype = resolve_dtype(config.dtype, model_config)
    engine = resolve_engine(config.engine, device, model_config, torch_dtype)
    return dataclasses.replace(config, device=device, dtype=str(torch_dtype).removeprefix("torch."), engine=engine)
