"""What a sequence length may ask of the model, checked before any data is read.

``--model-max-length`` above the model's ``max_position_embeddings`` is refused (positions the model was
never trained on give statistics of another behaviour) unless ``allow_longer_than_model``, which warns.
The memory a length implies (one batch's activations) is bounded by the memory plan
(:mod:`reap_fast.models.memory_plan`, applied by :func:`reap_fast.observe.planning.plan_observation`), and
an absurd length by :data:`reap_fast.config.observe.MAX_MODEL_MAX_LENGTH` in the config.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import ConfigError, ObserveConfig
from ..models import text_config

logger = logging.getLogger(__name__)


def check_sequence_length(model_config: Any, settings: ObserveConfig) -> None:
    """Refuse a length above the model's positions (one line, before the calibration set is built)."""
    length = settings.model_max_length
    positions = getattr(text_config(model_config), "max_position_embeddings", None)
    if not positions or length <= int(positions):
        return
    if not settings.allow_longer_than_model:
        raise ConfigError(
            f"--model-max-length {length} is above the model's {positions} positions (max_position_embeddings); "
            f"use at most {positions}, or pass --allow-longer-than-model to observe positions it was not trained on"
        )
    logger.warning("--model-max-length %d is above the model's %d positions: statistics of untrained positions",
                   length, positions)
