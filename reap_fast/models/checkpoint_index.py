"""What a safetensors checkpoint holds, read from its file headers only: every tensor's file, dtype, shape
and byte range. Plans (memory, disk) and the fast reader start from here; no weight is read.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ReapFastError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype names -> torch dtypes (the ones checkpoints use)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MAX_HEADER = 100 << 20


class CheckpointIndexError(ReapFastError, ValueError):
    """A folder without safetensors weights, or a header that cannot be read."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: its file, dtype, shape and absolute byte range in that file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, from its header."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointIndexError(f"weight file {path} is shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise CheckpointIndexError(f"weight file {path} has a {length}-byte header: corrupt")
        header = json.loads(handle.read(length))
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointIndexError(f"{path}: tensor {name} has dtype {info['dtype']}, which reap-fast does not read")
        begin, end = (int(value) for value in info["data_offsets"])
        entries[name] = TensorEntry(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end)
    return entries


def safetensors_files(folder: str | os.PathLike) -> list[Path] | None:
    """The shard files of a local safetensors checkpoint in index order (None: not one)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    return None


def checkpoint_entries(folder: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors checkpoint in ``folder`` (headers only)."""
    files = safetensors_files(folder)
    if files is None:
        raise CheckpointIndexError(
            f"{folder} has no model.safetensors or model.safetensors.index.json (local safetensors checkpoints only)"
        )
    entries: dict[str, TensorEntry] = {}
    for path in files:
        entries.update(read_header(path))
    return entries


def layer_of(name: str) -> int | None:
    """The decoder layer number in a tensor name (``...layers.<n>.``), else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None
