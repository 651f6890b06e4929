"""Observation: REAP statistics computed inside the MoE forward (reference or Triton engine)."""

from .engines import ENGINE_NAMES, EngineUnavailableError, get_engine, register_engine
from .runner import load_model, observe_checkpoint, run_observation
from .session import Observer

__all__ = [
    "ENGINE_NAMES",
    "EngineUnavailableError",
    "Observer",
    "get_engine",
    "load_model",
    "observe_checkpoint",
    "register_engine",
    "run_observation",
]
