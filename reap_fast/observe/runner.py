"""Observation from a checkpoint, the one entry point: :func:`observe_checkpoint`.

It checks every input before any weight is read, builds the calibration set, loads the model
(:mod:`reap_fast.models.loading`) or streams it layer by layer (:mod:`reap_fast.observe.streaming`),
runs the :class:`~reap_fast.observe.session.Observer` over the batches, and, as its
:class:`~reap_fast.config.ObserveConfig` asks, shards the work over torchrun's processes
(:mod:`reap_fast.observe.distributed`) and checkpoints / resumes it (:mod:`reap_fast.observe.checkpointing`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..config import ConfigError, ObserveConfig
from ..data import CalibrationSet, build_calibration_set
from ..identity import attach_identity, model_identity
from ..metrics import LayerMetrics, save_metrics
from ..models.loading import load_config, load_model
from ..outputs import claim_output
from ..preflight import check_model_folder
from .checkpointing import ObservationCheckpointer, accumulator_states, restore_accumulators, run_fingerprint
from .distributed import all_reduce_accumulators, init_distributed, is_main_process
from .limits import check_sequence_length
from .planning import plan_observation
from .progress import TokenRate
from .session import Observer
from .settings import process_settings

logger = logging.getLogger(__name__)


def observe_checkpoint(
    model_path: str,
    dataset: str | CalibrationSet,
    output: str | os.PathLike | None = None,
    config: ObserveConfig | None = None,
) -> dict[int, LayerMetrics]:
    """Observe the checkpoint at ``model_path``; return its REAP statistics {layer: {upstream keys}}.

    ``config`` (default: :class:`ObserveConfig`'s defaults) says how
    (see :class:`~reap_fast.config.ObserveConfig`): batch size, engine, device, dtype,
    ``layerwise`` streaming (default 'auto': the memory plan decides), torchrun sharding (``distributed``),
    ``checkpoint_dir`` / ``resume``.

    * ``dataset``: a calibration spec (built with reap-fast's defaults) or an already built
      :class:`~reap_fast.data.CalibrationSet` (``samples_per_category`` and ``seed`` then only label the run).
    * ``output``: the observation file (upstream's format, with the model's identity), written atomically
      by rank 0 only; every rank returns the totals.
    * With ``checkpoint_dir``, a resumed run gives the numbers of an uninterrupted one; the folder is removed
      after success. With several processes each rank uses ``checkpoint_dir/rank<r>-of-<n>``.
    """
    config = ObserveConfig() if config is None else config
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise ConfigError(f"output must be a file path or None, got {output!r} (settings go in the ObserveConfig)")
    model_config = load_config(model_path)
    check_model_folder(model_path, need_tokenizer=True)
    if config.checkpoint_dir is not None:  # before any work: it is removed after success, so it must be ours
        claim_output(config.checkpoint_dir, "checkpoint dir", {"model folder": model_path, "observation file": output})
    settings = process_settings(config, model_config)
    check_sequence_length(model_config, settings)
    rank, world = 0, 1
    if config.distributed:
        rank, world, device = init_distributed(settings.device)
        settings = dataclasses.replace(settings, device=device)
    settings = plan_observation(model_path, model_config, settings)  # in memory or streamed, before any weight
    calibration, label = _calibration_set(model_path, dataset, settings)
    if world > 1:
        calibration = calibration.shard(rank, world, settings.batch_size)  # whole batches, as a single process
        logger.info("rank %d of %d observes %d sequences", rank, world, len(calibration))

    checkpointer, resume_state = None, None
    if settings.checkpoint_dir is not None:
        checkpointer, resume_state = _checkpointer(model_path, label, settings, calibration, rank, world)
    with checkpointer if checkpointer is not None else nullcontext():
        if settings.layerwise:
            from .streaming import observe_streaming

            accumulators = observe_streaming(
                model_path, calibration, settings, checkpointer=checkpointer, resume_state=resume_state,
                scratch_dir=None if checkpointer is None else checkpointer.directory,
            )
        else:
            model, _ = load_model(model_path, device=settings.device, dtype=settings.dtype, config=model_config)
            accumulators = _observe_loaded(model, calibration, settings, checkpointer, resume_state)
    all_reduce_accumulators(accumulators)
    metrics = {index: acc.to_upstream() for index, acc in sorted(accumulators.items())}
    if output is not None and is_main_process():
        save_metrics(attach_identity(metrics, model_identity(model_config, model_path)), output)
    if checkpointer is not None:  # only once the observation is saved: a failed save can still --resume
        checkpointer.clear()
    return metrics


def _checkpointer(model_path: str, label: str, settings: ObserveConfig, calibration, rank: int, world: int):
    """(this process's checkpointer, the state to resume from or None); refuses another run's checkpoint."""
    directory = Path(settings.checkpoint_dir)
    if world > 1:
        directory = directory / f"rank{rank}-of-{world}"
    fingerprint = run_fingerprint(model_path, label, settings, calibration, rank, world)
    checkpointer = ObservationCheckpointer(directory, fingerprint, settings.checkpoint_every)
    return checkpointer, checkpointer.start(settings.resume)


def _calibration_set(model_path: str, dataset: str | CalibrationSet, settings: ObserveConfig):
    """(the calibration set, the dataset label a checkpoint records)."""
    if isinstance(dataset, CalibrationSet):
        return dataset, "<calibration set>"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calibration = build_calibration_set(
        dataset, tokenizer, samples_per_category=settings.samples_per_category,
        model_max_length=settings.model_max_length, seed=settings.seed,
    )
    return calibration, dataset


@torch.no_grad()
def _observe_loaded(
    model,
    calibration: CalibrationSet,
    settings: ObserveConfig,
    checkpointer: ObservationCheckpointer | None = None,
    resume_state: dict | None = None,
) -> dict:
    """Observe ``calibration`` with an in-memory ``model``; return the accumulators {layer: LayerAccumulator}.

    ``settings`` are resolved (:func:`~reap_fast.observe.settings.process_settings`). With a checkpointer,
    the statistics are checkpointed at batch boundaries; ``resume_state`` (from
    :meth:`ObservationCheckpointer.start`) restores them and skips the batches already done.
    """
    batch_size, engine = settings.batch_size, settings.engine
    total = -(-len(calibration) // batch_size)
    logger.info(
        "observing %d sequences of %d tokens (%d counted) with the %s engine",
        len(calibration), calibration.seq_len, calibration.num_stat_tokens(), engine,
    )
    with Observer(model, engine=engine, renormalize=settings.renormalize,
                  merging=settings.merging_statistics) as observer:
        start = 0
        if resume_state is not None:
            restore_accumulators(observer.accumulators, resume_state["accumulators"])
            start = int(resume_state["batches_done"])
        rate = TokenRate()
        bar = tqdm(total=total, initial=start, desc=f"observe ({engine})", unit="batch", disable=not settings.progress)
        with bar:
            # a checkpoint taken after the last batch (the save of the observation then failed) resumes at the end
            first = min(start * batch_size, len(calibration))
            for index, batch in enumerate(calibration.batches(batch_size, start=first), start=start):
                observer.forward(batch.input_ids, batch.attention_mask, batch.stats_mask)
                rate.advance(bar, int(batch.attention_mask.sum()))
                if checkpointer is not None:
                    done = index + 1
                    checkpointer.after_batch(
                        lambda: {"mode": "in_memory", "batches_done": done,
                                 "accumulators": accumulator_states(observer.accumulators)}
                    )
        return observer.accumulators
