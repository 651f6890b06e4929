"""The one error of layer streaming."""

from __future__ import annotations

from ...errors import ReapFastError


class StreamingError(ReapFastError, ValueError):
    """The checkpoint cannot be streamed layer by layer (layout, format or family)."""
