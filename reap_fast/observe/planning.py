"""The observation's memory plan: in memory or streamed, decided before any weight is read.

:func:`plan_observation` applies :mod:`reap_fast.models.memory_plan` to resolved settings and says in one log
line which path was chosen and why; an explicit choice that cannot fit is refused there.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ..config import ObserveConfig
from ..memory import MemoryBudget, free_memory
from ..models import UnsupportedModelError
from ..models.loading import DTYPES
from ..models.memory_plan import BatchShape, checkpoint_sizes, choose_path, observation_peaks

logger = logging.getLogger(__name__)


def stream_refusal(model_config) -> str | None:
    """Why layer streaming cannot read this family's checkpoints (None: it can)."""
    from .streaming import streaming_supported

    try:
        streaming_supported(model_config)
    except UnsupportedModelError as exc:
        return str(exc)
    return None


def plan_observation(
    model_path: str | os.PathLike, model_config, settings: ObserveConfig, budget: MemoryBudget | None = None
) -> ObserveConfig:
    """``settings`` (resolved: device, dtype) with ``layerwise`` decided by the memory plan (True or False).

    ``budget`` replaces the measured free memory (tests). Raises :class:`MemoryPlanError` when the requested
    path cannot fit, and the family's streaming refusal for ``layerwise=True`` on a family that cannot stream.
    """
    refusal = stream_refusal(model_config)
    if settings.layerwise is True and refusal is not None:
        raise UnsupportedModelError(refusal)
    dtype = DTYPES[settings.dtype]
    sizes = checkpoint_sizes(model_path, dtype)
    if sizes is None:
        layerwise = settings.layerwise is True
        logger.info("memory plan: %s is not a local safetensors checkpoint, its size is unknown: %s", model_path,
                    "streaming as asked" if layerwise else "loading it in memory")
        return dataclasses.replace(settings, layerwise=layerwise)
    element = dtype.itemsize
    shape = BatchShape(settings.batch_size, settings.model_max_length)
    peaks = observation_peaks(sizes, model_config, shape, settings.device, element)
    plan = choose_path(peaks, settings.layerwise, budget if budget is not None else free_memory(settings.device), refusal)
    logger.info("memory plan: %s", plan.reason)
    return dataclasses.replace(settings, layerwise=plan.layerwise)
