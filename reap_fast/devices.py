"""Device names as the command line takes them: auto | cpu | cuda | cuda:N."""

from __future__ import annotations

import re

import torch

from .errors import ReapFastError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ReapFastError, ValueError):
    """A device that is malformed or not present on this machine."""


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; a CUDA device must exist."""
    if not _DEVICE.match(device):
        raise DeviceError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} requested but no CUDA device is available")
    return device
