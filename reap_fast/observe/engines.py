"""Observation engines and their registration as transformers experts implementations.

Every engine is a free function with one signature (as transformers' ExpertsInterface backends)::

    engine(experts, hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k),
           gates (T, k) fp32 | None, token_mask (T,) bool | None, accumulator: LayerAccumulator | None)
        -> (output (T, H), BatchStats | None)

Statistics are produced when ``gates`` is given: returned, or added into ``accumulator`` when one is
given (then None is returned in their place). Each engine is registered in transformers'
``ExpertsInterface`` under ``reap_fast_<engine>``; a model switched to that implementation observes
through its own forward whenever its experts modules carry a probe (see ``session.py``), and runs as
a plain routed MoE forward otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.integrations.moe import ExpertsInterface

from ..config.observe import ENGINE_CHOICES
from ..errors import EngineUnavailableError
from ..metrics import BatchStats
from .reference import reference_experts_forward

Engine = Callable[..., tuple[torch.Tensor, BatchStats | None]]

ENGINE_NAMES = tuple(name for name in ENGINE_CHOICES if name != "auto")  # ("reference", "triton")


def _triton_engine() -> Engine:
    try:
        from .triton_engine import triton_experts_forward
    except ImportError as exc:
        raise EngineUnavailableError(f"the triton engine is not available: {exc}") from None
    return triton_experts_forward


def get_engine(name: str) -> Engine:
    """The engine function for ``name`` ('reference' or 'triton')."""
    if name == "reference":
        return reference_experts_forward
    if name == "triton":
        return _triton_engine()
    raise EngineUnavailableError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")


def implementation_name(engine: str) -> str:
    """The ExpertsInterface key under which ``engine`` is registered."""
    return f"reap_fast_{engine}"


def _experts_function(engine: Engine) -> Callable[..., torch.Tensor]:
    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        probe = getattr(self, "_reap_probe", None)
        if probe is not None:
            return probe.observe(engine, self, hidden_states, top_k_index, top_k_weights)
        output, _ = engine(self, hidden_states, top_k_index, top_k_weights)
        return output

    return experts_forward


def register_engine(name: str) -> str:
    """Register ``name`` in transformers' ExpertsInterface (idempotent); return its key."""
    key = implementation_name(name)
    if key not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(key, _experts_function(get_engine(name)))
    return key
