"""Observation: REAP statistics computed inside the MoE forward (reference or Triton engine).

One entry point, :func:`observe_checkpoint` (model path, calibration spec, output file, ObserveConfig:
in memory or layer streaming, torchrun sharding, checkpoints and resume); :class:`Observer` is the
session that attaches an engine to a loaded model for one batch at a time.
"""

from ..config import ObserveConfig
from .engines import ENGINE_NAMES, EngineUnavailableError, get_engine, register_engine
from ..models.loading import load_model  # the model an Observer attaches to (README's Python API)
from .runner import observe_checkpoint
from .session import Observer

__all__ = [
    "ENGINE_NAMES",
    "EngineUnavailableError",
    "ObserveConfig",
    "Observer",
    "get_engine",
    "load_model",
    "observe_checkpoint",
    "register_engine",
]
