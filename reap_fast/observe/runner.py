"""Observation from a checkpoint: load the model (:mod:`reap_fast.models.loading`, or stream it layer by
layer), build calibration batches, run the Observer; optionally data-parallel under torchrun and resumable
from checkpoints.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..data import CalibrationSet
from ..devices import resolve_device
from ..errors import UsageError
from ..metrics import LayerMetrics
from ..models.loading import (  # noqa: F401  (DTYPES, ModelLoadError, checkpoint_dtype, load_skeleton: re-exported)
    DTYPES,
    ModelLoadError,
    checkpoint_dtype,
    load_config,
    load_model,
    load_skeleton,
    resolve_dtype,
)
from ..preflight import check_model_folder
from .progress import TokenRate
from .session import Observer

logger = logging.getLogger(__name__)


def resolve_engine(engine: str, device: str) -> str:
    """'auto' -> the Triton engine on GPU, the reference engine on CPU."""
    if engine == "auto":
        return "triton" if device.startswith("cuda") else "reference"
    return engine


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
        rate = TokenRate()
        with tqdm(total=total, initial=start, desc=f"observe ({engine})", unit="batch", disable=not progress) as bar:
            for index, batch in enumerate(calibration.batches(batch_size, start=start * batch_size), start=start):
                observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
                rate.advance(bar, int(batch.attention_mask.sum()))
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
