"""Data-parallel observation helpers (torchrun): rank queries and the all-reduce of statistics."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0
