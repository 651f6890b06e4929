"""Data-parallel observation (torchrun): process group set-up, rank queries, the all-reduce of statistics.

Under ``torchrun --nproc-per-node N -m reap_fast observe ...`` (WORLD_SIZE, RANK, LOCAL_RANK set) each
process initialises the process group (NCCL on CUDA, Gloo on CPU), takes the calibration shard
``rank, rank + N, ...``, observes it (in memory or layer streaming) and then all-reduces every layer's
accumulators: counts (int64) and float64 sums with SUM, ``max_activations`` with MAX, so every rank
holds the totals. Only rank 0 writes the observation file (``observe_checkpoint``'s ``output``; the CLI
prints its table on rank 0 only). ``ObserveConfig(distributed=False)`` ignores torchrun's variables and
observes the whole calibration set in the calling process.
Counts are exact; float64 sums differ from a single-process run only by the summation order (relative
differences around 1e-15; ``max_activations`` is exact).

A model slightly bigger than one GPU can also be observed in a single process with accelerate's
offload: ``from_pretrained(..., device_map="auto")`` puts as many layers as fit on the GPU and keeps
the rest in CPU RAM, copying their weights to the GPU at every forward. Each offloaded layer then
costs a PCIe transfer of its weights per batch (about 1.2 GB per Qwen3-30B-A3B layer, ~50 ms at
25 GB/s), which usually dominates the compute; layer streaming (``--layerwise``) moves each layer once
per run instead of once per batch, and is the faster path for observation.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os

import torch
import torch.distributed as dist

from ..metrics import MAX_COMBINED_KEYS, LayerAccumulator

logger = logging.getLogger(__name__)

def is_distributed() -> bool:
    """Whether a torch.distributed process group is running."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running group, (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: str) -> tuple[int, int, str]:
    """Start the process group when launched by torchrun; return (rank, world size, this rank's device).

    ``device`` is the resolved device ('cpu', 'cuda' or 'cuda:N'); under torchrun a plain 'cuda' becomes
    ``cuda:LOCAL_RANK``. Without torchrun (WORLD_SIZE unset or 1) nothing is started.
    """
    if not is_distributed() and env_world_size() <= 1:
        return 0, 1, device
    on_cuda = device.startswith("cuda")
    if on_cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    if not is_distributed():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        backend = "nccl" if on_cuda else "gloo"
        kwargs = {"device_id": torch.device(device)} if on_cuda else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2), **kwargs)
        atexit.register(_destroy)
        logger.info("process group: %s, rank %d of %d on %s", backend, dist.get_rank(), dist.get_world_size(), device)
    rank, world = rank_and_world()
    return rank, world, device


def all_reduce_accumulators(accumulators: dict[int, LayerAccumulator]) -> None:
    """Sum (counts, sums) and max (``max_activations``) every accumulator over all ranks, in place.

    All ranks must hold the same layers (they observe the same model). Tensors are reduced on the
    accumulators' device: NCCL needs CUDA tensors, Gloo CPU tensors (CPU copies are made for Gloo).
    """
    if not is_distributed():
        return
    cpu_backend = dist.get_backend() == "gloo"
    for index in sorted(accumulators):
        for key, value in accumulators[index].state_tensors().items():
            op = dist.ReduceOp.MAX if key in MAX_COMBINED_KEYS else dist.ReduceOp.SUM
            work = value.cpu() if cpu_backend and value.device.type != "cpu" else value
            if work.dim() == 0:
                flat = work.reshape(1).clone()
                dist.all_reduce(flat, op=op)
                value.copy_(flat.reshape(()).to(value.device))
            else:
                dist.all_reduce(work, op=op)
                if work is not value:
                    value.copy_(work)


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()
