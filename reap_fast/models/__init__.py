"""Model-family adapters: where the MoE blocks are and how each family routes."""

from .base import KernelLayout, MoEAdapter, MoELayer, StreamingLayout, UnsupportedModelError, find_moe_layers, text_config
from .families import (
    ADAPTERS,
    adapter_for_model_types,
    get_adapter,
    kernel_layout,
    streaming_families,
    supported_model_types,
)

__all__ = [
    "ADAPTERS",
    "KernelLayout",
    "MoEAdapter",
    "MoELayer",
    "StreamingLayout",
    "UnsupportedModelError",
    "adapter_for_model_types",
    "find_moe_layers",
    "get_adapter",
    "kernel_layout",
    "streaming_families",
    "supported_model_types",
    "text_config",
]
