"""Model-family adapters: where the MoE blocks are and how each family routes."""

from .base import MoEAdapter, MoELayer, UnsupportedModelError, find_moe_layers
from .families import ADAPTERS, get_adapter, supported_model_types

__all__ = [
    "ADAPTERS",
    "MoEAdapter",
    "MoELayer",
    "UnsupportedModelError",
    "find_moe_layers",
    "get_adapter",
    "supported_model_types",
]
