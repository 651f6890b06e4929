"""Observation engines and their registration as transformers experts implementations.

Every engine is a free function with one signature (as transformers' ExpertsInterface backends)::

    engine(experts, hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k),
           gates (T, k) fp32 | None, token_mask (T,) bool | None, accumulator: LayerAccumulator | None)
        -> (output (T, H), BatchStats | None)

Statistics are produced when ``gates`` is given: returned, or added into ``accumulator`` when one is
given (then None is returned in their place). :data:`ENGINES` is the registry, name -> function; each
engine is registered with transformers' public ``ExpertsInterface.register`` under ``reap_fast_<engine>``;
a model switched to that implementation observes through its own forward whenever its experts modules
carry a probe (see ``session.py``), and runs as a plain routed MoE forward otherwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from ..errors import EngineUnavailableError
from ..metrics import BatchStats
from .reference import reference_experts_forward
from .triton_engine import triton_experts_forward

Engine = Callable[..., tuple[torch.Tensor, BatchStats | None]]

ENGINES: dict[str, Engine] = {"reference": reference_experts_forward, "triton": triton_experts_forward}
ENGINE_NAMES = tuple(ENGINES)


def get_engine(name: str) -> Engine:
    """The engine function registered as ``name``."""
    engine = ENGINES.get(name)
    if engine is None:
        raise EngineUnavailableError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")
    return engine


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
    """Register ``name`` in transformers' experts interface (public API, idempotent); return its key."""
    key = implementation_name(name)
    if key not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(key, _experts_function(get_engine(name)))
    return key
