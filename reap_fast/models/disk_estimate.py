"""How many bytes a stage really writes, estimated from the source's safetensors headers (no weight read).

Pruned model: every tensor of the source, except that the expert tensors of MoE layers (per-expert tensors,
fused ``experts.*`` tensors and router tensors indexed by expert on dim 0) keep ``kept / E`` of their bytes;
plus the side files (tokenizer, configs). W{bits}A16 model: each quantized weight (a matrix of a decoder layer,
routers excluded, as AutoRound quantizes them) becomes ``numel·bits/8`` of packed codes plus, per group of
``group_size`` inputs, a 16-bit scale and a packed ``bits``-bit zero point; every other tensor keeps its bytes.
``HEADER_BYTES`` per written tensor and ``ESTIMATE_MARGIN`` are added on top (headers, index, alignment):
an estimate, not a 2x over-estimate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint_index import CheckpointIndexError, TensorEntry, checkpoint_entries, layer_of

ESTIMATE_MARGIN = 0.02
HEADER_BYTES = 160  # safetensors header bytes per written tensor (name, dtype, shape, offsets)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_PER_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")
_ROUTER = re.compile(r"(?:^|\.)(?:gate|router|moe_statics)\.[^.]*(?:\.[^.]+)?$")


def _moe_tensor(name: str) -> bool:
    return "shared_expert" not in name and (".experts." in name or bool(_ROUTER.search(name)))


def kept_numel(name: str, entry: TensorEntry, num_experts: int | None, kept: int | None) -> int:
    """Elements of one source tensor that a pruning to ``kept`` of ``num_experts`` experts writes (None: no pruning)."""
    if num_experts is None or kept is None or layer_of(name) is None or not _moe_tensor(name):
        return entry.numel
    per_expert = _PER_EXPERT.search(name)
    if per_expert is not None:
        return entry.numel if int(per_expert.group(1)) < kept else 0
    if entry.shape and entry.shape[0] == num_experts:
        return entry.numel * kept // num_experts
    return entry.numel


def _quantized(name: str, entry: TensorEntry, group_size: int) -> bool:
    """Whether AutoRound quantizes the tensor: a matrix inside a decoder layer whose input size the group divides."""
    if layer_of(name) is None or len(entry.shape) < 2 or not entry.dtype.is_floating_point:
        return False
    if re.search(r"(?:\.mlp\.gate|\.router|shared_expert_gate)\.weight$", name) or "norm" in name:
        return False
    return group_size == -1 or entry.shape[-1] % group_size == 0


def side_files_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the folder's top-level non-weight files (tokenizer, configs), copied by every stage."""
    return sum(path.stat().st_size for path in Path(folder).iterdir()
               if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES))


def written_bytes(folder: str | os.PathLike, pruning: tuple[int, int] | None = None,
                  quantization: tuple[int, int] | None = None) -> int | None:
    """Estimated bytes of the model written from the safetensors checkpoint ``folder`` (None: not one).

    ``pruning``: (experts per layer, experts kept); ``quantization``: (bits, group size). With both, the
    quantized form of the pruned model.
    """
    try:
        entries = checkpoint_entries(folder)
    except CheckpointIndexError:
        return None
    experts, kept = pruning if pruning is not None else (None, None)
    total = 0
    for name, entry in entries.items():
        numel = kept_numel(name, entry, experts, kept)
        if quantization is not None and _quantized(name, entry, quantization[1]):
            bits, group = quantization
            groups = numel // (entry.shape[-1] if group == -1 else group)
            total += numel * bits // 8 + groups * (2 + bits / 8) + 3 * HEADER_BYTES  # codes, scales, zeros
        elif numel:
            total += numel * entry.dtype.itemsize + HEADER_BYTES
    return int(total * (1 + ESTIMATE_MARGIN)) + side_files_bytes(folder)
