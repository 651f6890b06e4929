"""Where the hidden states of all calibration sequences live between layers: free memory, tier, buffer.

The buffer goes on the accelerator when it fits next to one layer and one batch's activations, else in
pinned host memory, else in a memory-mapped file on disk (CPU runs: host memory, else disk). The free
memory the choice sees is measured (:func:`free_memory`) or injected (:class:`MemoryBudget`, tests).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ...fileio import atomic_write
from ...memory import GiB, MemoryBudget, free_memory, host_available_bytes
from ...models.memory_plan import activation_bytes
from .errors import StreamingError

__all__ = ["GiB", "MemoryBudget", "HiddenStore", "activation_bytes", "choose_hidden_tier", "free_memory",
           "host_available_bytes"]


def choose_hidden_tier(nbytes: int, device: torch.device | str, budget: MemoryBudget, reserve: int) -> str:
    """Where a hidden-states buffer of ``nbytes`` goes: 'device', 'pinned', 'memory' or 'disk'.

    CUDA: on the GPU when ``nbytes + reserve`` (one layer, one batch, margin) fits its free memory,
    else pinned host memory when it fits in 80 % of the available host memory, else disk.
    CPU: host memory when ``nbytes + reserve`` fits the available memory, else disk.
    """
    if torch.device(device).type == "cuda":
        if budget.device_free is not None and nbytes + reserve <= budget.device_free:
            return "device"
        if budget.host_free is not None and nbytes <= 0.8 * budget.host_free:
            return "pinned"
        return "disk"
    if budget.host_free is None or nbytes + reserve <= budget.host_free:
        return "memory"
    return "disk"


def _dtype_from_name(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


class HiddenStore:
    """The (N, L, H) hidden states of all calibration sequences between layers, on one tier."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, tier: str, device: torch.device,
                 scratch_dir: str | os.PathLike | None = None) -> None:
        self.shape, self.dtype, self.tier, self.device = tuple(shape), dtype, tier, torch.device(device)
        self.numel = math.prod(self.shape)
        self.nbytes = self.numel * torch.empty((), dtype=dtype).element_size()
        self.path: Path | None = None
        if tier == "device":
            self.buffer = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif tier == "memory":
            self.buffer = torch.empty(self.shape, dtype=dtype)
        elif tier == "pinned":
            self.buffer = torch.empty(self.shape, dtype=dtype, pin_memory=True)
        elif tier == "disk":
            folder = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="reap-fast-hidden-", suffix=".bin", dir=folder)
            os.ftruncate(fd, max(self.nbytes, 1))
            os.close(fd)
            self.path = Path(name)
            self.buffer = torch.from_file(name, shared=True, size=self.numel, dtype=dtype).view(self.shape)
        else:
            raise ValueError(f"unknown hidden-states tier {tier!r}")

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.buffer[start:stop].to(self.device, non_blocking=self.tier == "pinned")

    def write(self, start: int, stop: int, value: torch.Tensor) -> None:
        self.buffer[start:stop].copy_(value)

    def snapshot(self, path: Path, rows_per_chunk: int = 16) -> dict[str, Any]:
        """Write the buffer to ``path`` as raw bytes (chunked: bounded extra memory); return its description."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

        def write(handle: BinaryIO) -> None:
            for start in range(0, self.shape[0], rows_per_chunk):
                chunk = self.buffer[start : start + rows_per_chunk].detach().to("cpu").contiguous()
                handle.write(chunk.view(torch.uint8).numpy().tobytes())

        atomic_write(path, write)
        return {"shape": list(self.shape), "dtype": str(self.dtype)}

    def restore(self, path: Path, description: dict[str, Any], rows_per_chunk: int = 16) -> None:
        """Load a snapshot written by :meth:`snapshot` (same shape and dtype)."""
        if tuple(description["shape"]) != self.shape or _dtype_from_name(description["dtype"]) != self.dtype:
            raise StreamingError(
                f"hidden-states snapshot {path} has shape {description['shape']} {description['dtype']}, "
                f"this run needs {list(self.shape)} {self.dtype}"
            )
        source = torch.from_file(str(path), shared=False, size=self.numel, dtype=self.dtype).view(self.shape)
        for start in range(0, self.shape[0], rows_per_chunk):
            self.buffer[start : start + rows_per_chunk].copy_(source[start : start + rows_per_chunk])
        del source

    def close(self) -> None:
        self.buffer = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
