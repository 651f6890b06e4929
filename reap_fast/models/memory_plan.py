"""Memory plans made before any weight is read: the peak host and accelerator memory of a stage, from the
checkpoint's safetensors headers, the batch shape and the device, against the memory that is free.

Observation (the formula the plan computes; b bytes per element of the compute dtype)::

    in memory, CPU:   host   = R + W_model + A_batch
    in memory, GPU:   device = W_model + A_batch                 host = R + W_layer (each layer passes the host)
    streamed,  CPU:   host   = R + max(W_embed, 2·W_layer) + A_batch       (+ S_hidden when kept in memory)
    streamed,  GPU:   device = max(W_embed, 2·W_layer) + A_batch           host = R + 2·W_layer
                      (+ S_hidden on the device or in pinned host memory when it fits there, else on disk)

    W_model  = every tensor of the checkpoint at b bytes per element     W_layer = the largest decoder layer
    W_embed  = the largest tensor outside the decoder layers (the embedding matrix)
    A_batch  = B·L·((6 + 3k)·H + 2·n_heads·d_head)·b + B·L·E·4          (one batch through one layer)
    S_hidden = N·L·H·b                                                   (hidden states of all N sequences)
    R        = RUNTIME_BYTES (Python, torch, transformers, tokenizer, calibration set)

Streaming holds two layers: the one computing and the next one being read (prefetch). A path *fits* when
its peak is at most (1 - HEADROOM) of the free memory; ``auto`` loads in memory when that fits and streams
otherwise; an explicit choice that cannot fit is refused in one line. The streamed peak's S_hidden is left
out of the fit: its tier falls back to a memory-mapped file.

Pruning from the source's own safetensors holds one shard's kept tensors: host = R + S_shard; pruning a
checkpoint that must be loaded, and AutoRound quantization (the whole model on the host): host = R + W_model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ReapFastError
from ..memory import GiB, MemoryBudget
from .checkpoint_index import CheckpointIndexError, TensorEntry, checkpoint_entries, layer_of
from .base import text_config
from .families import get_adapter

RUNTIME_BYTES = GiB  # measured 0.6-0.9 GiB on the CPU before any weight is read
HEADROOM = 0.10  # fraction of the free memory a plan leaves unused


class MemoryPlanError(ReapFastError, RuntimeError):
    """The requested path cannot fit in the free memory (refused before anything is loaded)."""


def activation_bytes(config, batch: int, length: int, element: int) -> int:
    """A_batch: the activation bytes of one batch of ``batch`` x ``length`` tokens through one layer.

    The expert count and top-k are read under the keys the family's adapter entry names.
    """
    adapter = get_adapter(config)
    text = text_config(config)
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    top_k = int(getattr(text, adapter.top_k_key, 1) or 1)
    experts = int(getattr(text, adapter.num_experts_key, 1) or 1)
    tokens = batch * length
    return tokens * ((6 + 3 * top_k) * hidden + 2 * heads * head_dim) * element + tokens * experts * 4


@dataclass(frozen=True)
class CheckpointSizes:
    """Weight bytes of a checkpoint at the compute dtype: all of it, its largest layer, embedding and shard."""

    model: int
    layer: int
    embed: int
    shard: int

    @classmethod
    def of(cls, entries: dict[str, TensorEntry], dtype: torch.dtype | None = None) -> "CheckpointSizes":
        """Sizes from the header entries; floating tensors counted at ``dtype`` (None: as stored)."""
        layers: dict[int, int] = {}
        shards: dict[Path, int] = {}
        embed = total = 0
        for name, entry in entries.items():
            nbytes = entry.nbytes
            if dtype is not None and entry.dtype.is_floating_point:
                nbytes = entry.numel * torch.empty((), dtype=dtype).element_size()
            total += nbytes
            shards[entry.file] = shards.get(entry.file, 0) + entry.nbytes
            layer = layer_of(name)
            if layer is None:
                embed = max(embed, nbytes)
            else:
                layers[layer] = layers.get(layer, 0) + nbytes
        return cls(total, max(layers.values(), default=0), embed, max(shards.values(), default=0))


def checkpoint_sizes(model_path: str | os.PathLike, dtype: torch.dtype | None = None) -> CheckpointSizes | None:
    """:class:`CheckpointSizes` of a local safetensors checkpoint, None for anything else (hub names, .bin)."""
    folder = Path(str(model_path)).expanduser()
    if not folder.is_dir():
        return None
    try:
        return CheckpointSizes.of(checkpoint_entries(folder), dtype)
    except CheckpointIndexError:
        return None


@dataclass(frozen=True)
class Peak:
    """Predicted peak memory of one path, in bytes (device 0 on CPU runs)."""

    host: int
    device: int = 0


@dataclass(frozen=True)
class BatchShape:
    """Calibration batches: ``batch`` sequences of ``length`` tokens, ``sequences`` in all (None: not known yet)."""

    batch: int
    length: int
    sequences: int | None = None


def observation_peaks(sizes: CheckpointSizes, config, shape: BatchShape, device: str, element: int) -> dict[str, Peak]:
    """{"in memory": Peak, "streamed": Peak} by the formula of the module docstring."""
    activations = activation_bytes(config, shape.batch, shape.length, element)
    streamed_weights = max(sizes.embed, 2 * sizes.layer)
    if torch.device(device).type == "cuda":
        return {
            "in memory": Peak(RUNTIME_BYTES + sizes.layer, sizes.model + activations),
            "streamed": Peak(RUNTIME_BYTES + 2 * sizes.layer, streamed_weights + activations),
        }
    return {
        "in memory": Peak(RUNTIME_BYTES + sizes.model + activations),
        "streamed": Peak(RUNTIME_BYTES + streamed_weights + activations),
    }


def fits(peak: Peak, budget: MemoryBudget, headroom: float = HEADROOM) -> bool:
    """Whether ``peak`` fits the free memory with ``headroom`` left (unknown free memory: it fits)."""
    for need, free in ((peak.host, budget.host_free), (peak.device, budget.device_free)):
        if need and free is not None and need > (1 - headroom) * free:
            return False
    return True


def describe(peak: Peak, budget: MemoryBudget) -> str:
    """'about 31.2 GiB of host memory (22.0 GiB available)', with the device part on GPU runs."""
    parts = [f"about {peak.host / GiB:.1f} GiB of host memory ({_free(budget.host_free)} available)"]
    if peak.device:
        parts.append(f"{peak.device / GiB:.1f} GiB of accelerator memory ({_free(budget.device_free)} free)")
    return " and ".join(parts)


def _free(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GiB:.1f} GiB"


@dataclass(frozen=True)
class ObservationPlan:
    """The path chosen for an observation and why (one log line)."""

    layerwise: bool
    reason: str
    peaks: dict[str, Peak]


def choose_path(
    peaks: dict[str, Peak], requested: bool | str, budget: MemoryBudget, stream_refusal: str | None = None
) -> ObservationPlan:
    """In memory or streamed, for ``requested`` True / False / 'auto'; :class:`MemoryPlanError` when it cannot fit.

    ``stream_refusal`` is why this checkpoint cannot stream (None: it can); with 'auto' and a model that does
    not fit in memory, that reason is the refusal.
    """
    memory, streamed = peaks["in memory"], peaks["streamed"]
    in_memory = f"the model in memory needs {describe(memory, budget)}"
    layered = f"streamed one layer at a time it needs {describe(streamed, budget)}"
    if requested is False:
        if not fits(memory, budget):
            raise MemoryPlanError(
                f"refusing to load the whole model (--no-layerwise): {in_memory}; "
                + ("drop --no-layerwise to stream it" if stream_refusal is None else stream_refusal)
            )
        return ObservationPlan(False, f"in memory as asked: {in_memory}", peaks)
    if requested == "auto" and (fits(memory, budget) or stream_refusal is not None):
        if not fits(memory, budget):
            raise MemoryPlanError(f"{in_memory}, and layer streaming cannot read it: {stream_refusal}")
        return ObservationPlan(False, f"in memory: {in_memory}", peaks)
    if not fits(streamed, budget, headroom=0.0):
        raise MemoryPlanError(f"not enough memory even for layer streaming: {layered}; free memory or lower "
                             "--batch-size or --model-max-length")
    why = "as asked" if requested is True else f"{in_memory}, more than fits"
    return ObservationPlan(True, f"layer streaming ({why}): {layered}", peaks)


def whole_model_peak(model_path: str | os.PathLike, dtype: torch.dtype | None, device: str = "cpu") -> Peak | None:
    """Peak of a stage that holds the whole model (pruning a loaded model, AutoRound): R + W_model (None: sizes
    unknown). On a GPU the weights sit on the device."""
    sizes = checkpoint_sizes(model_path, dtype)
    if sizes is None:
        return None
    if torch.device(device).type == "cuda":
        return Peak(RUNTIME_BYTES + sizes.layer, sizes.model)
    return Peak(RUNTIME_BYTES + sizes.model)


def prune_peak(model_path: str | os.PathLike, dtype: torch.dtype | None, from_source: bool, device: str) -> Peak | None:
    """Peak of pruning: R + S_shard when written from the source's shards, else the whole model's (None: unknown)."""
    if not from_source:
        return whole_model_peak(model_path, dtype, device)
    sizes = checkpoint_sizes(model_path)
    return None if sizes is None else Peak(RUNTIME_BYTES + sizes.shard)


def check_fits(peak: Peak | None, budget: MemoryBudget, what: str) -> None:
    """Refuse ``what`` in one line when ``peak`` cannot fit the free memory (no headroom: refuse only the sure)."""
    if peak is not None and not fits(peak, budget, headroom=0.0):
        raise MemoryPlanError(f"{what} needs {describe(peak, budget)}: not enough memory")
