"""Observation from a checkpoint: load the model, build calibration batches, run the Observer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..metrics import LayerMetrics
from ..models import get_adapter
from .session import Observer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(ValueError):
    """The checkpoint cannot be loaded (missing folder, no config, unsupported family)."""


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_engine(engine: str, device: str) -> str:
    """'auto' -> the Triton engine on GPU, the reference engine on CPU."""
    if engine == "auto":
        return "triton" if device.startswith("cuda") else "reference"
    return engine


def load_config(path: str):
    """The checkpoint's config, after checking the folder and the model family (no weights loaded)."""
    local = Path(path)
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        if not local.is_dir():
            raise ModelLoadError(f"model folder not found: {path}")
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {path}: {str(exc).splitlines()[0]}") from None
    get_adapter(config)  # unsupported families stop here, before any weight is read
    return config


def load_model(path: str, device: str = "auto", dtype: str = "auto"):
    """Load a supported MoE checkpoint and its tokenizer for observation; returns (model, tokenizer)."""
    load_config(path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def observe_checkpoint(
    model_path: str,
    dataset: str,
    samples_per_category: int | None,
    model_max_length: int = 2048,
    batch_size: int = 1,
    seed: int = 42,
    engine: str = "auto",
    renormalize: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
    layerwise: bool = False,
    resume: bool = False,
    checkpoint_dir: str | None = None,
    checkpoint_every: float = 300.0,
) -> dict[int, LayerMetrics]:
    """Load a checkpoint and observe it; every input is checked before any weight is read."""
    from ..data import build_calibration_set

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    load_config(model_path)
    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration = build_calibration_set(
        dataset, tokenizer, samples_per_category=samples_per_category, model_max_length=model_max_length, seed=seed
    )
    model, _ = load_model(model_path, device=device, dtype=dtype)
    return observe_calibration(model, calibration, batch_size, engine, renormalize, progress)


def observe_calibration(model, calibration, batch_size: int, engine: str, renormalize: bool, progress: bool = True):
    """Observe a built calibration set with ``model``."""
    device = str(model.get_input_embeddings().weight.device)
    engine = resolve_engine(engine, device)
    logger.info(
        "observing %d sequences of %d tokens (%d counted) with the %s engine",
        len(calibration), calibration.input_ids.shape[1], calibration.num_stat_tokens(), engine,
    )
    total = -(-len(calibration) // batch_size)
    with Observer(model, engine=engine, renormalize=renormalize) as observer:
        return observer.run(calibration.batches(batch_size), total=total, progress=progress)


def run_observation(
    model,
    tokenizer,
    dataset: str,
    samples_per_category: int | None,
    model_max_length: int = 2048,
    batch_size: int = 1,
    seed: int = 42,
    engine: str = "auto",
    renormalize: bool = True,
    progress: bool = True,
) -> dict[int, LayerMetrics]:
    """Observe REAP statistics of ``model`` on the calibration spec ``dataset``."""
    from ..data import build_calibration_set

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    calibration = build_calibration_set(
        dataset, tokenizer, samples_per_category=samples_per_category, model_max_length=model_max_length, seed=seed
    )
    return observe_calibration(model, calibration, batch_size, engine, renormalize, progress)
