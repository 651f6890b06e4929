"""Reading one decoder layer's tensors from a safetensors checkpoint, per-expert tensors fused: the reader of
:mod:`reap_fast.models.weights` (shared with the in-memory fast loader), under the names streaming uses."""

from __future__ import annotations

from ...models.weights import CheckpointTensors, layer_tensors

__all__ = ["CheckpointTensors", "layer_tensors"]
