"""Free memory as reap-fast's plans see it: available host memory and free accelerator memory.

Measured (:func:`free_memory`) or injected (:class:`MemoryBudget`, for tests and what-if plans).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

GiB = 1024**3


@dataclass(frozen=True)
class MemoryBudget:
    """Free memory in bytes (None: unknown / not present)."""

    device_free: int | None = None
    host_free: int | None = None


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else physical pages, else None."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_memory(device: torch.device | str) -> MemoryBudget:
    """The current free accelerator memory and available host memory.

    ``cuda`` (no index) counts every visible GPU, as the in-memory path spreads a model over all of them.
    """
    device = torch.device(device)
    device_free = None
    if device.type == "cuda":
        indices = [device.index] if device.index is not None else range(torch.cuda.device_count())
        device_free = sum(int(torch.cuda.mem_get_info(index)[0]) for index in indices)
    return MemoryBudget(device_free=device_free, host_free=host_available_bytes())
