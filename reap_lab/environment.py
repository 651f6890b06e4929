"""What a numeric result was computed on: processor, its relevant instruction sets, threads, library versions.

Float results of training differ between processors (different vector kernels round differently, and
the differences grow over training steps), so studies store this record beside their numbers.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Instruction-set flags that change which float kernels oneDNN / MKL / torch pick.
RELEVANT_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
LIBRARIES = ("torch", "transformers", "numpy", "auto-round", "triton")


def cpu_record(cpuinfo: str | None = None) -> dict[str, Any]:
    """Processor model name and the relevant flags from ``/proc/cpuinfo`` (``cpuinfo``: its text, for tests)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model_name": model, "flags": [f for f in RELEVANT_CPU_FLAGS if f in flags]}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_record() -> dict[str, Any]:
    """Processor, threads and versions of the running process."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {
        "cpu": cpu_record(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": capability,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in LIBRARIES},
        "torch_build": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def describe(record: dict[str, Any]) -> str:
    """One line for reports: processor, flags, threads, versions."""
    cpu = record.get("cpu", {})
    flags = ", ".join(cpu.get("flags", [])) or "none of " + "/".join(RELEVANT_CPU_FLAGS[:3])
    versions = record.get("versions", {})
    libs = ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers") if versions.get(name))
    return (f"{cpu.get('model_name', record.get('machine', '?'))} ({flags}; torch CPU capability "
            f"{record.get('torch_cpu_capability') or '?'}), {record.get('torch_threads')} torch thread(s), "
            f"{record.get('cpu_count')} cores, {libs}, Python {record.get('python')}")
