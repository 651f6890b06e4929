"""Model loading: a checkpoint's config, weights, meta-device skeleton and dtype, checked before any
weight is read. Every stage (observe, prune, quantize, evaluate, the drop-in) loads models from here.

Models slightly bigger than one GPU: ``load_model(..., device=...)`` passes ``device_map`` to
``from_pretrained``; ``device_map="auto"`` (accelerate offload) keeps the layers that do not fit in CPU
RAM and copies their weights to the GPU at every forward, i.e. once per batch per offloaded layer
(about 1.2 GB per Qwen3-30B-A3B layer over PCIe), which is far slower than ``--layerwise`` streaming,
which copies every layer once per run. Streaming is the recommended path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config.observe import DTYPE_CHOICES
from ..devices import resolve_device
from ..errors import ReapFastError, one_line
from ..preflight import check_model_folder, is_path_like
from .families import get_adapter
from .fast_load import load_weights

DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}  # name -> torch dtype


class ModelLoadError(ReapFastError, ValueError):
    """The checkpoint cannot be loaded (missing folder, no config, unsupported family)."""


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's config names (``dtype`` / ``torch_dtype``), float32 when it names none."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, torch.dtype) and value in DTYPES.values():
            return value
        if isinstance(value, str) and value.replace("torch.", "") in DTYPES:
            return DTYPES[value.replace("torch.", "")]
    return torch.float32


def resolve_dtype(dtype: str, config=None) -> torch.dtype:
    """'auto' -> the checkpoint's own dtype; else the named dtype.

    A bf16 checkpoint is observed and pruned in bf16 on every device, as upstream loads it
    (``torch_dtype="auto"``): no whole-model conversion, and the pruned folder keeps the dtype.
    """
    if dtype == "auto":
        return checkpoint_dtype(config) if config is not None else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(path: str):
    """The checkpoint's config, after checking the folder and the model family (no weights loaded)."""
    path = str(path)
    local = Path(path).expanduser()
    if is_path_like(path):
        if not local.is_dir():
            raise ModelLoadError(f"model folder not found: {path}")
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
        path = str(local)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {path}: {one_line(exc)}") from None
    get_adapter(config)  # unsupported families stop here, before any weight is read
    return config


def load_model(path: str, device: str = "auto", dtype: str = "auto", *, config=None):
    """Load a supported MoE checkpoint and its tokenizer for observation; returns (model, tokenizer).

    A local safetensors checkpoint on one device is read by the fast loader (:mod:`reap_fast.models.fast_load`:
    straight into the fused layout, mmap-backed where the dtype matches); anything else by ``from_pretrained``.
    ``config``: the checkpoint's :func:`load_config`, when the caller has it already.
    """
    config = load_config(path) if config is None else config
    check_model_folder(path, need_tokenizer=True)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config)
    # "cuda" with several GPUs visible: accelerate spreads the layers over all of them (as upstream's
    # device_map="auto"); "cuda:N" pins the model to one GPU.
    device_map = "auto" if device == "cuda" and torch.cuda.device_count() > 1 else device
    model = None
    if device_map == device and is_path_like(path):  # one device, a local folder: read at disk speed
        model = load_weights(path, config, torch_dtype, device)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def load_skeleton(path: str, dtype: str = "auto", *, config=None):
    """The checkpoint's model with every weight on the meta device (no weight read) and its tokenizer.

    Enough to select and slice experts when the pruned folder is written from the source's own files
    (:mod:`reap_fast.prune.checkpoint`): module structure, expert counts and shapes, nothing else.
    ``config``: the checkpoint's :func:`load_config`, when the caller has it already.
    """
    config = load_config(path) if config is None else config
    check_model_folder(path, need_tokenizer=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, config))
    return model.eval(), AutoTokenizer.from_pretrained(path)
