"""The one error of layer streaming."""

from __future__ import annotations

from ...models.weights import CheckpointLayoutError


class StreamingError(CheckpointLayoutError):
    """The checkpoint cannot be streamed layer by layer (layout, format or family)."""
