"""Layer streaming: observe a model bigger than the accelerator, one decoder layer at a time.

The model is built as a skeleton without weights (parameters on the ``meta`` device; non-persistent
buffers such as the rotary ``inv_freq`` are computed on the host as usual). Then:

1. the input embeddings are loaded, every calibration sequence is embedded into the *hidden-states
   buffer* (N, L, H), and the embedding matrix is freed;
2. for each decoder layer ``i``: only that layer's tensors are read from the checkpoint's safetensors
   shards (``safe_open``; the index json says which shard holds a key), per-expert tensors are stacked
   into the fused ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I) layout exactly as the
   transformers weight conversion does at load time, the layer is put into the model, all calibration
   batches run through it with the :class:`Observer`'s probes active (the same statistics code as an
   in-memory run), each batch's output overwrites its input rows in the buffer (the next layer's
   input), and the layer's weights are freed. The final norm and the LM head are never loaded: the
   statistics end at the last MoE block.

Exactness: every batch goes through the *model's own forward* (``model.model(inputs_embeds=...,
attention_mask=...)``) with all decoder layers but the current one replaced by pass-through modules
and the final norm by an identity. The causal + padding mask (and, for hybrid models, the per-layer
mask choice), position ids and rotary embeddings are therefore built by transformers' own code, as in
a full forward; layer ``i`` sees the same inputs, the same mask and the same position embeddings as
in an in-memory run, and the statistics agree to float rounding (tests: rtol 1e-5 in fp32).

Where the hidden-states buffer lives is chosen from free memory (logged, and injectable for tests
through :class:`MemoryBudget`): on the accelerator when it fits next to one layer and one batch's
activations, else in pinned host memory, else in a memory-mapped file on disk (CPU runs: host memory,
else disk).

Peak memory (copied into the README)::

    accelerator ≈ max(W_embed, W_layer) + A_batch + S_hidden   (S_hidden only when the buffer is on it)
    host        ≈ 2 x W_layer (tensors read + stacked experts, transient) + S_hidden (pinned / host tier)

    W_layer  = weights of the largest decoder layer      = (3·E·H·I + attention + router) · b
    W_embed  = V · H · b (only while embedding, before layer 0)
    S_hidden = N · L · H · b (all calibration sequences' hidden states, updated in place)
    A_batch  ≈ B · L · ((6 + 3k) · H + 2 · n_heads · d_head) · b + B · L · E · 4
               (+ B · n_heads · L² · b when the attention implementation materialises scores)

with b bytes per element, N sequences of L tokens, batch size B, E experts of intermediate size I,
top-k k, hidden size H, vocabulary V. It does not grow with the number of layers. Qwen3-30B-A3B in
bf16, 231 x 2048 tokens: W_layer ≈ 1.25 GB, W_embed ≈ 0.62 GB, S_hidden ≈ 1.94 GB, so about 4 GB
of accelerator memory plus activations, instead of 61 GB for the whole model.

Supported families: those in ``STREAMING_FAMILIES`` (checked exact against the in-memory forward);
others are refused with a clear message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import ReapFastError
from ..metrics import LayerAccumulator
from ..models import UnsupportedModelError, get_adapter
from .checkpointing import ObservationCheckpointer, accumulator_states, restore_accumulators
from .progress import TokenRate
from .session import Observer

logger = logging.getLogger(__name__)

# Families whose streamed statistics are tested equal to the in-memory forward (tests/test_streaming.py).
# Mixtral is not: its checkpoints name the MoE block ``block_sparse_moe`` and the experts w1/w2/w3.
STREAMING_FAMILIES = (
    "qwen3_moe", "qwen3_5_moe", "qwen3_next", "deepseek_v3", "glm4_moe", "olmoe", "gpt_oss",
    "llama4", "ernie4_5_moe", "deepseek_v2",
)

GiB = 1024**3
_EXPERT_KEY = re.compile(r"^(?P<base>.*experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")


class StreamingError(ReapFastError, ValueError):
    """The checkpoint cannot be streamed layer by layer (layout, format or family)."""


# --- memory budget and the hidden-states buffer ---------------------------------------------------


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


# --- reading one layer's tensors -------------------------------------------------------------------


class CheckpointTensors:
    """The tensor names of a safetensors checkpoint (single file or sharded with an index) and their reads."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                self.files = {key: single for key in handle.keys()}
        else:
            raise StreamingError(
                f"{self.folder} has no model.safetensors or model.safetensors.index.json: layer streaming reads "
                "local safetensors checkpoints only"
            )

    def names_under(self, prefix: str) -> set[str]:
        """Checkpoint keys starting with ``prefix``, with the prefix removed."""
        return {key[len(prefix):] for key in self.files if key.startswith(prefix)}

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``keys`` on the CPU, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        tensors = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in names:
                    tensors[key] = handle.get_tensor(key)
        return tensors


def _persistent_names(module: nn.Module) -> list[str]:
    """Parameter and persistent-buffer names of ``module`` (what a checkpoint holds), in order."""
    return list(module.state_dict(keep_vars=True).keys())


def _expert_sources(name: str, num_experts: int, available: set[str]) -> tuple[str, list[list[str]]] | None:
    """How transformers builds a fused experts tensor from per-expert checkpoint tensors.

    ``experts.gate_up_proj`` (E, 2I, H) = concat over dim 1 of stack(gate_proj) and stack(up_proj);
    ``experts.down_proj`` (E, H, I) = stack(down_proj). Returns (kind, [source key lists]) or None.
    """
    for fused, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
        if name.endswith(f"experts.{fused}"):
            base = name[: -len(fused)]
            sources = [[f"{base}{e}.{part}.weight" for e in range(num_experts)] for part in parts]
            if all(key in available for group in sources for key in group):
                return fused, sources
    return None


def _renamed(name: str, renames: tuple[tuple[str, str], ...], available: set[str]) -> str | None:
    """The checkpoint key of module tensor ``name`` under one of the family's renames, if present."""
    for module_suffix, checkpoint_suffix in renames:
        if name.endswith(module_suffix):
            candidate = name[: len(name) - len(module_suffix)] + checkpoint_suffix
            if candidate in available:
                return candidate
    return None


def layer_tensors(
    reader: CheckpointTensors, prefix: str, module: nn.Module, renames: tuple[tuple[str, str], ...] = ()
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (keys under ``prefix``), fused experts stacked, shapes checked.

    ``renames`` are the family's (module name suffix, checkpoint name suffix) pairs (the adapter's
    ``checkpoint_renames``). Every tensor under ``prefix`` must be used and every parameter found, so a
    checkpoint layout that needs other conversions (transposed or quantised experts) stops with a clear error.
    """
    available = reader.names_under(prefix)
    shapes = {name: tuple(value.shape) for name, value in module.state_dict(keep_vars=True).items()}
    plan: dict[str, tuple[str, list[list[str]]]] = {}
    for name in _persistent_names(module):
        source = name if name in available else _renamed(name, renames, available)
        if source is not None:
            plan[name] = ("copy", [[source]])
            continue
        sources = _expert_sources(name, shapes[name][0], available) if len(shapes[name]) == 3 else None
        if sources is None:
            raise StreamingError(
                f"layer streaming cannot find {prefix}{name} in the checkpoint (nor per-expert tensors to fuse); "
                "this checkpoint layout is not supported, load the model in memory instead (without --layerwise)"
            )
        plan[name] = sources
    used = {key for _, groups in plan.values() for group in groups for key in group}
    unused = sorted(available - used)
    if unused:
        raise StreamingError(
            "layer streaming does not know what to do with checkpoint tensors "
            f"{', '.join(prefix + k for k in unused[:4])}"
            f"{' ...' if len(unused) > 4 else ''}; load the model in memory instead (without --layerwise)"
        )
    raw = reader.load([prefix + key for key in sorted(used)])
    tensors = {}
    for name, (kind, groups) in plan.items():
        if kind == "copy":
            tensor = raw.pop(prefix + groups[0][0])
        else:
            stacked = [torch.stack([raw.pop(prefix + key) for key in group]) for group in groups]
            tensor = stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)
        if tuple(tensor.shape) != shapes[name]:
            raise StreamingError(
                f"checkpoint tensor {prefix}{name} has shape {tuple(tensor.shape)}, the model expects {shapes[name]}"
            )
        tensors[name] = tensor
    return tensors


# --- putting weights into the skeleton and taking them out -----------------------------------------


@dataclass
class StreamingReport:
    """What a streaming run used: the buffer tier and the resident weight bytes (peak over the run)."""

    tier: str = ""
    hidden_bytes: int = 0
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    layer_bytes: list[int] = field(default_factory=list)  # weights of each decoder layer
    embed_bytes: int = 0
    live_weight_bytes: int = 0
    peak_weight_bytes: int = 0  # largest sum of materialised weights at any time
    load_seconds: float = 0.0  # reading, stacking and placing layer weights
    compute_seconds: float = 0.0  # the batches through the layers
    embed_seconds: float = 0.0  # the embedding pass

    def add(self, nbytes: int) -> None:
        self.live_weight_bytes += nbytes
        self.peak_weight_bytes = max(self.peak_weight_bytes, self.live_weight_bytes)

    def remove(self, nbytes: int) -> None:
        self.live_weight_bytes -= nbytes


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> int:
    """Put ``tensors`` into ``module``'s meta parameters/buffers on ``device``; return the bytes placed.

    Floating tensors take the skeleton's dtype (as ``from_pretrained(dtype=...)`` casts them).
    Non-persistent buffers (computed at construction) are moved to ``device``.
    """
    placed = 0
    for name, tensor in tensors.items():
        owner, leaf = _owner(module, name)
        current = owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
        dtype = current.dtype if tensor.is_floating_point() else tensor.dtype
        value = tensor.to(device=device, dtype=dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
        placed += value.numel() * value.element_size()
    for submodule in module.modules():
        for leaf, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                submodule._buffers[leaf] = buffer.to(device)
    return placed


def release(module: nn.Module) -> None:
    """Free ``module``'s weights (they go back to the meta device)."""
    module.to("meta")


class _PassThrough(nn.Module):
    """Stands in for a decoder layer that is not loaded: returns its input hidden states."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        for attribute in ("layer_idx", "layer_type", "attention_type", "is_sliding"):
            if attribute in layer.__dict__:
                setattr(self, attribute, layer.__dict__[attribute])

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class StreamingObserver(Observer):
    """An :class:`Observer` over a meta-device skeleton: accumulators live on the compute device."""

    def __init__(self, model: nn.Module, engine: str, renormalize: bool, device: torch.device) -> None:
        super().__init__(model, engine=engine, renormalize=renormalize)
        self._device = torch.device(device)
        self.accumulators = {
            layer.layer_index: LayerAccumulator(layer.num_experts, self._device) for layer in self.layers
        }

    @contextmanager
    def counting(self, stats_mask: torch.Tensor) -> Iterator[None]:
        """The statistics mask of the forward call inside the block."""
        self._token_mask = stats_mask.reshape(-1).to(self._device, torch.bool)
        try:
            yield
        finally:
            self._token_mask = None


# --- the skeleton ---------------------------------------------------------------------------------


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM for ``config`` with parameters on the meta device (buffers computed on the host)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """(base model that runs the layers, its layer list, the layers' name prefix, e.g. 'model.layers')."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = int(text_config.num_hidden_layers)
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) == count:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return parent, module, name
    raise StreamingError(f"cannot find the decoder layer list of {model.__class__.__name__}")


def _parameter_name(model: nn.Module, tensor: torch.Tensor) -> str:
    for name, value in model.named_parameters():
        if value is tensor:
            return name
    raise StreamingError("cannot find the embedding matrix among the model's parameters")


def _activation_bytes(text_config, batch: int, length: int, element: int) -> int:
    """The A_batch estimate of the module docstring."""
    hidden = int(text_config.hidden_size)
    heads = int(getattr(text_config, "num_attention_heads", 1))
    head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
    top_k = int(getattr(text_config, "num_experts_per_tok", 1) or 1)
    experts = int(getattr(text_config, "num_experts", None) or getattr(text_config, "n_routed_experts", None) or 1)
    tokens = batch * length
    return tokens * ((6 + 3 * top_k) * hidden + 2 * heads * head_dim) * element + tokens * experts * 4


def streaming_supported(config) -> None:
    """Raise a clear error when ``config``'s family is not one streaming is checked exact on."""
    family = get_adapter(config).family
    if getattr(config, "model_type", None) == "llama4":
        raise UnsupportedModelError(
            "layer streaming (--layerwise) reads text-only Llama-4 checkpoints (model_type llama4_text); this multimodal "
            "llama4 checkpoint keeps its text layers under another prefix: observe it without --layerwise"
        )
    if family not in STREAMING_FAMILIES:
        raise UnsupportedModelError(
            f"layer streaming (--layerwise) supports {', '.join(STREAMING_FAMILIES)}; {family} is not checked exact "
            "against the in-memory forward yet: observe it without --layerwise (device_map offload works for models "
            "slightly bigger than one GPU)"
        )


@torch.no_grad()
def observe_streaming(
    model_path: str | os.PathLike,
    calibration,
    batch_size: int,
    engine: str,
    renormalize: bool,
    device: torch.device | str,
    dtype: torch.dtype,
    progress: bool = True,
    checkpointer: ObservationCheckpointer | None = None,
    resume_state: dict[str, Any] | None = None,
    memory_budget: MemoryBudget | None = None,
    scratch_dir: str | os.PathLike | None = None,
    report: StreamingReport | None = None,
) -> dict[int, LayerAccumulator]:
    """Observe ``calibration`` with the checkpoint at ``model_path`` streamed layer by layer.

    Returns the accumulators {layer index: LayerAccumulator} on ``device``. ``memory_budget``
    replaces the measured free memory (tests); ``report`` receives the tier and weight bytes.
    """
    device = torch.device(device)
    report = report if report is not None else StreamingReport()
    config = AutoConfig.from_pretrained(model_path)
    streaming_supported(config)
    renames = get_adapter(config).checkpoint_renames
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    reader = CheckpointTensors(model_path)
    model = build_skeleton(config, dtype)
    base, layers, layers_name = decoder_layers(model)
    real_layers = list(layers)
    element = torch.empty((), dtype=dtype).element_size()
    report.layer_bytes = [sum(p.numel() for p in layer.parameters()) * element for layer in real_layers]

    count, length = calibration.input_ids.shape
    hidden = int(text_config.hidden_size)
    store_bytes = count * length * hidden * element
    budget = memory_budget if memory_budget is not None else free_memory(device)
    reserve = 2 * max(report.layer_bytes) + _activation_bytes(text_config, batch_size, length, element) + GiB // 2
    tier = choose_hidden_tier(store_bytes, device, budget, reserve)
    report.tier, report.hidden_bytes, report.budget = tier, store_bytes, budget
    logger.info(
        "layer streaming: hidden states of %d x %d tokens = %.3f GiB -> %s (free: device %s, host %s; reserve %.2f GiB "
        "for one layer of %.2f GiB and one batch)",
        count, length, store_bytes / GiB, tier,
        "n/a" if budget.device_free is None else f"{budget.device_free / GiB:.1f} GiB",
        "n/a" if budget.host_free is None else f"{budget.host_free / GiB:.1f} GiB",
        reserve / GiB, max(report.layer_bytes) / GiB,
    )

    # Parts of the base model other than the layers, the embeddings and the final norm (rare).
    embedding = model.get_input_embeddings()
    embed_name = _parameter_name(model, embedding.weight)
    norm = getattr(base, "norm", None)
    skip = {id(p) for p in embedding.parameters()} | {id(p) for p in (norm.parameters() if norm is not None else [])}
    skip |= {id(p) for layer in real_layers for p in layer.parameters()}
    extras = [name for name, p in base.named_parameters() if id(p) not in skip]
    if extras:
        raise StreamingError(f"layer streaming does not handle the extra parameters {extras[:4]}")
    for module in base.modules():  # rotary embeddings and other host-computed buffers
        for leaf, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[leaf] = buffer.to(device)

    observer = StreamingObserver(model, engine, renormalize, device)
    num_batches = -(-count // batch_size)
    start_layer, start_batch = 0, 0
    store = HiddenStore((count, length, hidden), dtype, tier, device, scratch_dir)
    saved_norm = norm
    try:
        with observer:
            if norm is not None:
                base.norm = nn.Identity()
            for index, layer in enumerate(real_layers):
                layers[index] = _PassThrough(layer)
            if resume_state is not None:
                restore_accumulators(observer.accumulators, resume_state["accumulators"])
                start_layer, start_batch = int(resume_state["layer"]), int(resume_state["batches_done"])
                if start_layer < len(real_layers):
                    store.restore(checkpointer.hidden_path(resume_state), resume_state["hidden"])
            elif count:
                began = time.perf_counter()
                _embed_into(store, model, embedding, embed_name, reader, calibration, batch_size, device, report)
                _synchronize(device)
                report.embed_seconds += time.perf_counter() - began

            def state(layer: int, done: int) -> dict[str, Any]:
                if done == num_batches:
                    layer, done = layer + 1, 0
                return {
                    "mode": "layerwise",
                    "layer": layer,
                    "layers_done": list(range(layer)),
                    "batches_done": done,
                    "accumulators": accumulator_states(observer.accumulators),
                }

            total = len(real_layers) * num_batches
            with tqdm(total=total, initial=start_layer * num_batches + start_batch, unit="batch",
                      desc="stream", disable=not progress) as bar:
                for index in range(start_layer, len(real_layers)):
                    layer = real_layers[index]
                    prefix = f"{layers_name}.{index}."
                    began = time.perf_counter()
                    placed = materialize(layer, layer_tensors(reader, prefix, layer, renames), device)
                    _synchronize(device)
                    report.load_seconds += time.perf_counter() - began
                    report.add(placed)
                    layers[index] = layer
                    bar.set_description(f"stream layer {index + 1}/{len(real_layers)}")
                    rate = TokenRate()
                    first = start_batch if index == start_layer else 0
                    for batch in range(first, num_batches):
                        begin, end = batch * batch_size, min(count, (batch + 1) * batch_size)
                        attention = calibration.attention_mask[begin:end].to(device)
                        with observer.counting(calibration.stats_mask[begin:end]):
                            output = base(inputs_embeds=store.read(begin, end), attention_mask=attention,
                                          use_cache=False).last_hidden_state
                        store.write(begin, end, output)
                        del output
                        rate.advance(bar, int(calibration.attention_mask[begin:end].sum()),
                                     batch=f"{batch + 1}/{num_batches}")
                        if checkpointer is not None:
                            checkpointer.after_batch(lambda: state(index, batch + 1), store.snapshot)
                    _synchronize(device)
                    report.compute_seconds += rate.elapsed()
                    layers[index] = _PassThrough(layer)
                    report.remove(placed)
                    release(layer)
    finally:
        if saved_norm is not None:
            base.norm = saved_norm
        for index, layer in enumerate(real_layers):
            layers[index] = layer
        store.close()
    return observer.accumulators


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _embed_into(store, model, embedding, embed_name, reader, calibration, batch_size, device, report) -> None:
    """Embed every calibration sequence into ``store`` with the checkpoint's embedding matrix, then free it."""
    owner_name, _, _ = embed_name.rpartition(".")
    tensors = reader.load([embed_name])
    placed = materialize(embedding, {"weight": tensors.pop(embed_name)}, device)
    report.embed_bytes = placed
    report.add(placed)
    for begin in range(0, store.shape[0], batch_size):
        end = min(store.shape[0], begin + batch_size)
        store.write(begin, end, embedding(calibration.input_ids[begin:end].to(device)))
    release(embedding)
    report.remove(placed)
    logger.debug("embedded %d sequences with %s", store.shape[0], owner_name)
