"""Reading a safetensors checkpoint straight into a model's own layout, without transformers' conversion pass.

:class:`CheckpointTensors` reads tensors by their byte ranges (file headers only, no ``safe_open``): into a
given buffer (``os.preadv``, one copy from the page cache), into a new tensor, or as a zero-copy view of a
private memory map. :func:`layer_tensors` builds one module's tensors from them by the family's
:class:`StreamingLayout`: tensors copied under their own name or a renamed one, and fused experts tensors
(``gate_up_proj`` (E, 2I, H) = [stack(gate_proj); stack(up_proj)] on dim 1, ``down_proj`` = stack(down_proj))
written expert by expert straight into their final buffer, exactly as transformers' load-time conversion
stacks them. Layer streaming reads one decoder layer at a time with it; the in-memory loader
(:mod:`reap_fast.models.fast_load`) reads every layer.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ReapFastError
from .base import StreamingLayout, text_config
from .checkpoint_index import CheckpointIndexError, TensorEntry, checkpoint_entries

_CHUNK = 256 << 20  # bytes per read call (the kernel returns at most ~2 GiB per call)
# Reads in flight: copying from the page cache into new pages is bound by the cores (measured on 2 cores:
# 1 thread 0.9-1.1 GB/s, 2 threads 1.7 GB/s, 3 threads 1.6 GB/s).
READ_THREADS = max(2, min(8, os.cpu_count() or 2))
_ALIGN = 64


class CheckpointLayoutError(ReapFastError, ValueError):
    """The checkpoint's tensors do not fit the model (names, shapes, or a layout the reader cannot convert)."""


class CheckpointTensors:
    """The tensors of a local safetensors checkpoint (single file or sharded with an index) and their reads."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        try:
            self.entries: dict[str, TensorEntry] = checkpoint_entries(self.folder)
        except CheckpointIndexError as exc:
            raise CheckpointLayoutError(f"{exc}: layer streaming and the fast loader read those only") from None
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.bytes_read = 0

    @property
    def files(self) -> dict[str, Path]:
        """{checkpoint key: its shard file}."""
        return {key: entry.file for key, entry in self.entries.items()}

    def names_under(self, prefix: str) -> set[str]:
        """Checkpoint keys starting with ``prefix``, with the prefix removed."""
        return {key[len(prefix):] for key in self.entries if key.startswith(prefix)}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read tensor ``key`` into the contiguous CPU tensor ``out`` (same dtype and element count)."""
        entry = self.entries[key]
        if out.dtype != entry.dtype or out.numel() != entry.numel or not out.is_contiguous():
            raise CheckpointLayoutError(
                f"{key}: cannot read {entry.dtype} {entry.shape} into {out.dtype} {tuple(out.shape)}"
            )
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if entry.nbytes else memoryview(b"")
        fd, done = self._fd(entry.file), 0
        while done < entry.nbytes:
            count = os.preadv(fd, [view[done : done + _CHUNK]], entry.start + done)
            if count <= 0:
                raise CheckpointLayoutError(f"{entry.file} ended while reading {key}: truncated")
            done += count
        self.bytes_read += entry.nbytes

    def read_many(self, jobs: list[tuple[str, torch.Tensor]]) -> None:
        """:meth:`read_into` for every (key, buffer) pair, on ``READ_THREADS`` threads (the kernel's copy and
        the first touch of new pages run on several cores; ``os.preadv`` releases the GIL)."""
        if len(jobs) < 2:
            for key, out in jobs:
                self.read_into(key, out)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="reap-fast-read")
        for future in [self._pool.submit(self.read_into, key, out) for key, out in jobs]:
            future.result()

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in a new CPU tensor."""
        entry = self.entries[key]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(key, out)
        return out

    def mapped(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as a zero-copy view of a private (copy-on-write) map of its file: the page cache's pages."""
        entry = self.entries[key]
        if entry.file not in self._maps:
            self._maps[entry.file] = mmap.mmap(self._fd(entry.file), 0, access=mmap.ACCESS_COPY)
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._maps[entry.file], dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
        self.bytes_read += entry.nbytes
        return flat.view(entry.dtype).view(entry.shape)

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` in new CPU tensors."""
        return {key: self.read(key) for key in keys}

    def close(self) -> None:
        """Close the files (views from :meth:`mapped` keep their map alive)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._maps.clear()


def _checkpoint_name(name: str, layout: StreamingLayout) -> str:
    """The module tensor name as the checkpoint spells the module path (``layout.prefixes``)."""
    for module_prefix, checkpoint_prefix in layout.prefixes:
        if name.startswith(module_prefix):
            return checkpoint_prefix + name[len(module_prefix):]
    return name


def _renamed(name: str, renames: tuple[tuple[str, str], ...], available: set[str]) -> str | None:
    """The checkpoint key of module tensor ``name`` under one of the family's renames, if present."""
    for module_suffix, checkpoint_suffix in renames:
        if name.endswith(module_suffix):
            candidate = name[: len(name) - len(module_suffix)] + checkpoint_suffix
            if candidate in available:
                return candidate
    return None


def _expert_sources(name: str, num_experts: int, available: set[str], layout: StreamingLayout) -> list[list[str]] | None:
    """The per-expert checkpoint keys a fused experts tensor is built from, one list per part (None: not one)."""
    for fused, parts in layout.fused_experts:
        if name.endswith(f"experts.{fused}"):
            base = name[: -len(fused)]
            sources = [[f"{base}{e}.{part}.weight" for e in range(num_experts)] for part in parts]
            if all(key in available for group in sources for key in group):
                return sources
    return None


def tensor_plan(
    reader: CheckpointTensors, prefix: str, shapes: dict[str, tuple[int, ...]], layout: StreamingLayout
) -> dict[str, list[list[str]]]:
    """{module tensor name: source keys (under ``prefix``)}: one key to copy, or per-part expert key lists to fuse.

    Every tensor under ``prefix`` must be used and every module tensor found.
    """
    available = reader.names_under(prefix)
    plan: dict[str, list[list[str]]] = {}
    for name, shape in shapes.items():
        spelled = _checkpoint_name(name, layout)
        source = next((c for c in (name, spelled) if c in available), None) or _renamed(spelled, layout.renames, available)
        if source is not None:
            plan[name] = [[source]]
            continue
        sources = _expert_sources(spelled, shape[0], available, layout) if len(shape) == 3 else None
        if sources is None:
            raise CheckpointLayoutError(
                f"cannot find {prefix}{name} in the checkpoint (nor per-expert tensors to fuse): this checkpoint "
                "layout is not supported by layer streaming or the fast loader"
            )
        plan[name] = sources
    unused = sorted(available - {key for groups in plan.values() for group in groups for key in group})
    if unused:
        raise CheckpointLayoutError(
            f"no use for checkpoint tensors {', '.join(prefix + k for k in unused[:4])}{' ...' if len(unused) > 4 else ''}"
        )
    return plan


Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class Arena:
    """Reused memory for one layer's tensors: its pages are touched once, so later reads run at copy speed.

    :meth:`reset` before each layer (grows when a layer needs more), :meth:`take` per tensor. Tensors taken
    before a reset must no longer be in use (layer streaming keeps two arenas: the computing and the next layer).
    """

    def __init__(self, pinned: bool = False) -> None:
        self.pinned = pinned
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.used = 0

    def reset(self, nbytes: int) -> None:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.used = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _numel(shape) * dtype.itemsize
        if self.used + nbytes > self.buffer.numel():
            raise CheckpointLayoutError("arena too small for the layer's tensors (reset with their size first)")
        tensor = self.buffer[self.used : self.used + nbytes].view(dtype).view(shape)
        self.used += -(-nbytes // _ALIGN) * _ALIGN
        return tensor


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _fused_jobs(reader: CheckpointTensors, keys: list[list[str]], out: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(key, destination) reads that build a fused experts tensor: expert e's parts at out[e, rows of part]."""
    rows = [reader.entries[group[0]].shape[0] for group in keys]
    expected = (len(keys[0]), sum(rows), *reader.entries[keys[0][0]].shape[1:])
    if expected != tuple(out.shape):
        raise CheckpointLayoutError(f"per-expert tensors {keys[0][0]} ... do not stack to the model's {tuple(out.shape)}")
    jobs, offset = [], 0
    for group, count in zip(keys, rows):
        jobs += [(key, out[expert, offset : offset + count]) for expert, key in enumerate(group)]
        offset += count
    return jobs


def layer_tensors(
    reader: CheckpointTensors, prefix: str, module: nn.Module, layout: StreamingLayout = StreamingLayout(),
    mapped: bool = False, arena: Arena | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (keys under ``prefix``), fused experts built, shapes checked.

    ``layout`` is the family's (its adapter's ``streaming``). ``mapped``: tensors copied as they are stored are
    zero-copy views of the file's map (the in-memory loader). ``arena``: the memory read into (layer streaming;
    reset here to the layer's size); else new tensors.
    """
    shapes = {name: tuple(value.shape) for name, value in module.state_dict(keep_vars=True).items()}
    plan = tensor_plan(reader, prefix, shapes, layout)
    dtypes = {name: reader.entries[prefix + groups[0][0]].dtype for name, groups in plan.items()}
    if arena is not None:
        arena.reset(sum(-(-_numel(shapes[n]) * dtypes[n].itemsize // _ALIGN) * _ALIGN for n in plan))
    allocate: Allocate = arena.take if arena is not None else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    tensors, jobs = {}, []
    for name, groups in plan.items():
        if len(groups) == 1 and len(groups[0]) == 1:
            key = prefix + groups[0][0]
            if tuple(reader.entries[key].shape) != shapes[name]:
                raise CheckpointLayoutError(
                    f"checkpoint tensor {key} has shape {tuple(reader.entries[key].shape)}, "
                    f"the model expects {shapes[name]}"
                )
            if mapped:
                tensors[name] = reader.mapped(key)
                continue
            tensors[name] = allocate(shapes[name], dtypes[name])
            jobs.append((key, tensors[name]))
        else:
            tensors[name] = allocate(shapes[name], dtypes[name])
            jobs += _fused_jobs(reader, [[prefix + key for key in group] for group in groups], tensors[name])
    reader.read_many(jobs)
    return tensors


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM for ``config`` with parameters on the meta device (buffers computed on the host)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """(base model that runs the layers, its layer list, the layers' name prefix, e.g. 'model.layers')."""
    count = int(text_config(model.config).num_hidden_layers)
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) == count:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return parent, module, name
    raise CheckpointLayoutError(f"cannot find the decoder layer list of {model.__class__.__name__}")
