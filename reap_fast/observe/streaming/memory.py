"""Where the hidden states of all calibration sequences live between layers: free memory, tier, buffer.

The buffer goes on the accelerator when it fits next to one layer and one batch's activations, else in
pinned host memory, else in a memory-mapped file on disk (CPU runs: host memory, else disk). The free
memory the choice sees is measured (:func:`free_memory`) or injected (:class:`MemoryBudget`, tests).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...models import get_adapter
from .errors import StreamingError

GiB = 1024**3


@dataclass
class MemoryBudget:
    """Free memory in bytes, as the tier choice sees it (None: unknown / not present)."""

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
    """The current free accelerator memory (CUDA) and available host memory."""
    device = torch.device(device)
    device_free = None
    if device.type == "cuda":
        device_free = int(torch.cuda.mem_get_info(device)[0])
    return MemoryBudget(device_free=device_free, host_free=host_available_bytes())


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


def activation_bytes(config, batch: int, length: int, element: int) -> int:
    """A_batch: the activation bytes of one batch of ``batch`` x ``length`` tokens through one layer (see the package docstring).

    The expert count and top-k are read under the keys the family's adapter entry names.
    """
    adapter = get_adapter(config)
    text_config = adapter.text_config(config)
    hidden = int(text_config.hidden_size)
    heads = int(getattr(text_config, "num_attention_heads", 1))
    head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
    top_k = int(getattr(text_config, adapter.top_k_key, 1) or 1)
    experts = int(getattr(text_config, adapter.num_experts_key, 1) or 1)
    tokens = batch * length
    return tokens * ((6 + 3 * top_k) * hidden + 2 * heads * head_dim) * element + tokens * experts * 4


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
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            for start in range(0, self.shape[0], rows_per_chunk):
                chunk = self.buffer[start : start + rows_per_chunk].detach().to("cpu").contiguous()
                handle.write(chunk.view(torch.uint8).numpy().tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
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
