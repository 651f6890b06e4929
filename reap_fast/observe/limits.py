"""What a sequence length may ask of the model and of the machine, checked before any data is read.

``--model-max-length`` above the model's ``max_position_embeddings`` is refused (positions the model was
never trained on give statistics of another behaviour) unless ``allow_longer_than_model``, which warns.
The memory one forward pass of ``batch_size`` sequences needs at the least (the hidden states a decoder
layer keeps, the attention's scores, the logits) must fit the memory free where the model runs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import ConfigError, ObserveConfig
from ..models import get_adapter

logger = logging.getLogger(__name__)

GiB = 1024**3


def forward_bytes(text_config: Any, batch_size: int, length: int, dtype: str) -> int:
    """A lower bound on the activation memory of one forward pass (bytes): a few hidden-state copies,
    one layer's attention scores for a head (memory-efficient kernels) and the float32 logits."""
    element = torch.finfo(getattr(torch, dtype)).bits // 8 if dtype in ("bfloat16", "float16", "float32") else 4
    hidden = int(getattr(text_config, "hidden_size", 0) or 0)
    vocab = int(getattr(text_config, "vocab_size", 0) or 0)
    tokens = batch_size * length
    return tokens * (4 * hidden * element + 4 * vocab) + batch_size * length * min(length, 4096) * 4


def free_bytes(device: str) -> int | None:
    """Free memory where the forward runs: the GPU's, or the host's available memory."""
    from .streaming.memory import free_memory

    budget = free_memory(device)
    return budget.device_free if device.startswith("cuda") else budget.host_free


def check_sequence_length(model_config: Any, settings: ObserveConfig) -> None:
    """Refuse a length the model or the machine cannot take (one line, before the calibration set is built).

    ``settings`` are the process's resolved ones (device and dtype named).
    """
    text_config = get_adapter(model_config).text_config(model_config)
    length = settings.model_max_length
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions and length > int(positions):
        if not settings.allow_longer_than_model:
            raise ConfigError(
                f"--model-max-length {length} is above the model's {positions} positions (max_position_embeddings); "
                f"use at most {positions}, or pass --allow-longer-than-model to observe positions it was not trained on"
            )
        logger.warning("--model-max-length %d is above the model's %d positions: statistics of untrained positions",
                       length, positions)
    if settings.layerwise:
        return  # streaming plans its own memory tiers, batch by batch
    needed, free = forward_bytes(text_config, settings.batch_size, length, settings.dtype), free_bytes(settings.device)
    if free is not None and needed > free:
        raise ConfigError(
            f"--model-max-length {length} with --batch-size {settings.batch_size} needs at least "
            f"{needed / GiB:,.1f} GiB for one forward pass, {free / GiB:,.1f} GiB is free on {settings.device}; "
            "lower them"
        )
