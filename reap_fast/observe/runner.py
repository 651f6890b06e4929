"""Observation from a checkpoint: load the model (or stream it layer by layer), build calibration batches,
run the Observer; optionally data-parallel under torchrun and resumable from checkpoints.

Models slightly bigger than one GPU: ``load_model(..., device=...)`` passes ``device_map`` to
``from_pretrained``; ``device_map="auto"`` (accelerate offload) keeps the layers that do not fit in CPU
RAM and copies their weights to the GPU at every forward, i.e. once per batch per offloaded layer
(about 1.2 GB per Qwen3-30B-A3B layer over PCIe), which is far slower than ``--layerwise`` streaming,
which copies every layer once per run. Streaming is the recommended path.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..data import CalibrationSet
from ..devices import resolve_device
from ..errors import ReapFastError, UsageError, one_line
from ..metrics import LayerMetrics
from ..models import get_adapter
from ..preflight import check_model_folder, is_path_like
from .session import Observer

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def resolve_engine(engine: str, device: str) -> str:
    """'auto' -> the Triton engine on GPU, the reference engine on CPU."""
    if engine == "auto":
        return "triton" if device.startswith("cuda") else "reference"
    return engine


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


def load_model(path: str, device: str = "auto", dtype: str = "auto"):
    """Load a supported MoE checkpoint and its tokenizer for observation; returns (model, tokenizer)."""
    config = load_config(path)
    check_model_folder(path, need_tokenizer=True)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config)
    # "cuda" with several GPUs visible: accelerate spreads the layers over all of them (as upstream's
    # device_map="auto"); "cuda:N" pins the model to one GPU.
    device_map = "auto" if device == "cuda" and torch.cuda.device_count() > 1 else device
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def load_skeleton(path: str, dtype: str = "auto"):
    """The checkpoint's model with every weight on the meta device (no weight read) and its tokenizer.

    Enough to select and slice experts when the pruned folder is written from the source's own files
    (:mod:`reap_fast.prune.checkpoint`): module structure, expert counts and shapes, nothing else.
    """
    config = load_config(path)
    check_model_folder(path, need_tokenizer=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, config))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def observe_checkpoint(
    model_path: str,
    dataset: str | CalibrationSet,
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
    """Load a checkpoint and observe it; every input is checked before any weight is read.

    * ``layerwise``: stream one decoder layer at a time from the safetensors shards
      (:mod:`reap_fast.observe.streaming`; peak memory about one layer + one batch + the hidden states);
      otherwise the whole model is loaded with ``from_pretrained``.
    * Under ``torchrun`` (WORLD_SIZE > 1) each rank observes its shard of the calibration set and the
      statistics are all-reduced, so every rank returns the totals (:mod:`reap_fast.observe.distributed`).
    * ``checkpoint_dir``: partial statistics are saved there every ``checkpoint_every`` seconds and on
      SIGINT/SIGTERM; ``resume`` continues from it (same settings required) and gives the numbers of an
      uninterrupted run; the folder is removed after success (:mod:`reap_fast.observe.checkpointing`).
      With several processes each rank uses ``checkpoint_dir/rank<r>-of-<n>``.
    * ``dataset``: a calibration spec (built with reap-fast's defaults) or an already built
      :class:`~reap_fast.data.CalibrationSet` (``samples_per_category`` and ``seed`` then only label the run).
    """
    from ..data import build_calibration_set
    from .checkpointing import ObservationCheckpointer, run_fingerprint
    from .distributed import all_reduce_accumulators, init_distributed

    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if checkpoint_dir is None and resume:
        raise UsageError("--resume needs the folder of the interrupted run's checkpoint (--checkpoint-dir)")
    config = load_config(model_path)
    check_model_folder(model_path, need_tokenizer=True)
    if layerwise:
        from .streaming import streaming_supported

        streaming_supported(config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config)
    rank, world, device = init_distributed(device)
    engine_name = resolve_engine(engine, device)
    if isinstance(dataset, CalibrationSet):
        calibration, dataset = dataset, "<calibration set>"
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        calibration = build_calibration_set(
            dataset, tokenizer, samples_per_category=samples_per_category, model_max_length=model_max_length, seed=seed
        )
    if world > 1:
        calibration = calibration.shard(rank, world)
        logger.info("rank %d of %d observes %d sequences", rank, world, len(calibration))

    checkpointer, resume_state = None, None
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir) / f"rank{rank}-of-{world}" if world > 1 else Path(checkpoint_dir)
        fingerprint = run_fingerprint(
            model_path, dataset, samples_per_category, model_max_length, batch_size, seed, engine_name, renormalize,
            str(torch_dtype), layerwise, rank, world, calibration,
        )
        checkpointer = ObservationCheckpointer(directory, fingerprint, checkpoint_every)
        resume_state = checkpointer.start(resume)

    with checkpointer if checkpointer is not None else nullcontext():
        if layerwise:
            from .streaming import observe_streaming

            accumulators = observe_streaming(
                model_path, calibration, batch_size, engine_name, renormalize, device, torch_dtype, progress,
                checkpointer=checkpointer, resume_state=resume_state,
                scratch_dir=None if checkpointer is None else checkpointer.directory,
            )
        else:
            model, _ = load_model(model_path, device=device, dtype=dtype)
            accumulators = observe_batches(
                model, calibration, batch_size, engine_name, renormalize, progress, checkpointer, resume_state
            )
    all_reduce_accumulators(accumulators)
    if checkpointer is not None:
        checkpointer.clear()
    return {index: acc.to_upstream() for index, acc in sorted(accumulators.items())}


@torch.no_grad()
def observe_batches(
    model,
    calibration,
    batch_size: int,
    engine: str,
    renormalize: bool,
    progress: bool = True,
    checkpointer=None,
    resume_state: dict | None = None,
) -> dict:
    """Observe ``calibration`` with an in-memory ``model``; return the accumulators {layer: LayerAccumulator}.

    With a checkpointer, the statistics are checkpointed at batch boundaries; ``resume_state`` (from
    :meth:`ObservationCheckpointer.start`) restores them and skips the batches already done.
    """
    from .checkpointing import accumulator_states, restore_accumulators

    device = str(model.get_input_embeddings().weight.device)
    engine = resolve_engine(engine, device)
    total = -(-len(calibration) // batch_size)
    logger.info(
        "observing %d sequences of %d tokens (%d counted) with the %s engine",
        len(calibration), calibration.seq_len, calibration.num_stat_tokens(), engine,
    )
    with Observer(model, engine=engine, renormalize=renormalize) as observer:
        start = 0
        if resume_state is not None:
            restore_accumulators(observer.accumulators, resume_state["accumulators"])
            start = int(resume_state["batches_done"])
        began, tokens = time.perf_counter(), 0
        with tqdm(total=total, initial=start, desc=f"observe ({engine})", unit="batch", disable=not progress) as bar:
            for index, batch in enumerate(calibration.batches(batch_size, start=start * batch_size), start=start):
                observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
                tokens += int(batch.attention_mask.sum())
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - began, 1e-9):,.0f}")
                bar.update(1)
                if checkpointer is not None:
                    done = index + 1
                    checkpointer.after_batch(
                        lambda: {"mode": "in_memory", "batches_done": done,
                                 "accumulators": accumulator_states(observer.accumulators)}
                    )
        return observer.accumulators


def observe_calibration(model, calibration, batch_size: int, engine: str, renormalize: bool, progress: bool = True):
    """Observe a built calibration set with ``model``; returns the metrics in upstream's format."""
    accumulators = observe_batches(model, calibration, batch_size, engine, renormalize, progress)
    return {index: acc.to_upstream() for index, acc in sorted(accumulators.items())}


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
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    calibration = build_calibration_set(
        dataset, tokenizer, samples_per_category=samples_per_category, model_max_length=model_max_length, seed=seed
    )
    return observe_calibration(model, calibration, batch_size, engine, renormalize, progress)
