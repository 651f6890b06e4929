"""What one process observes with: an :class:`~reap_fast.config.ObserveConfig` with its 'auto' values resolved."""

from __future__ import annotations

import dataclasses

from ..config import ObserveConfig
from ..devices import resolve_device
from ..models.loading import resolve_dtype


def resolve_engine(engine: str, device: str) -> str:
    """'auto' -> the Triton engine on GPU, the reference engine on CPU."""
    if engine == "auto":
        return "triton" if device.startswith("cuda") else "reference"
    return engine


def process_settings(config: ObserveConfig, model_config) -> ObserveConfig:
    """``config`` with device (one present here), dtype (the checkpoint's for 'auto') and engine resolved.

    Idempotent: resolved settings resolve to themselves.
    """
    device = resolve_device(config.device)
    dtype = str(resolve_dtype(config.dtype, model_config)).removeprefix("torch.")
    return dataclasses.replace(config, device=device, dtype=dtype, engine=resolve_engine(config.engine, device))
