"""The observation stage's settings: what ``observe_checkpoint`` runs with, each default and check once.

The calibration spec itself (a path or ``name[subset](split):N`` list) is an argument of the stage, not a
setting; ``samples_per_category`` and ``model_max_length`` are checked where the set is built
(:func:`reap_fast.data.build_calibration_set`), before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, DEFAULT_SEED
from .declare import parse_bool, setting, validate

DEFAULT_MODEL_MAX_LENGTH = 2048  # tokens per packed sequence; upstream ObserverArgs.model_max_length
ENGINE_CHOICES = ("auto", "reference", "triton")  # auto: triton on a GPU where it takes the model, else reference
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")  # auto: the checkpoint's own dtype
# No model reap-fast supports reads sequences this long; a longer --model-max-length is a typo, refused
# before the calibration set is built (the memory of a length is checked against the model: observe/limits).
MAX_MODEL_MAX_LENGTH = 1 << 20
LAYERWISE_CHOICES = ("auto", True, False)  # auto: stream when the model in memory does not fit (the memory plan)
RENORMALIZE_ALWAYS = "always"  # renormalise g over the top-k for every family (the caller decided)


@dataclass(frozen=True)
class ObserveConfig:
    """Settings of one observation run (``reap-fast observe``, the observe stage of ``run`` and of the drop-in).

    * ``renormalize``: True renormalises g over the top-k only where the model itself does; False never;
      ``"always"`` for every family (upstream's layerwise rule).
    * ``layerwise``: True streams one decoder layer at a time from the safetensors shards instead of loading
      the whole model; False loads it; ``"auto"`` asks the memory plan (:mod:`reap_fast.models.memory_plan`):
      in memory when that fits with a margin, else streamed. A choice that cannot fit is refused before loading.
    * ``distributed``: under ``torchrun`` (WORLD_SIZE > 1) join the process group, observe this rank's
      shard and all-reduce the statistics; False observes everything in this process.
    * ``checkpoint_dir``: partial statistics are saved there every ``checkpoint_every`` seconds and on
      SIGINT/SIGTERM (None: no checkpoints); ``resume`` continues from that folder's checkpoint.
    """

    samples_per_category: int | None = setting(
        None, "samples per category without :N (default: 1024, upstream's)", cli="--samples-per-category",
        upstream="batches_per_category", integer=True, low=1)
    model_max_length: int = setting(
        DEFAULT_MODEL_MAX_LENGTH, "tokens per packed sequence (at most the model's max_position_embeddings)",
        cli="--model-max-length", upstream="model_max_length", integer=True, low=1, high=MAX_MODEL_MAX_LENGTH)
    batch_size: int = setting(1, "sequences per forward pass", cli="--batch-size", upstream="batch_size",
                              integer=True, low=1)
    seed: int = setting(DEFAULT_SEED, "seed of the calibration sampling", cli="--seed", upstream="seed", integer=True)
    engine: str = setting(
        "auto", "observation engine (auto: triton on a GPU where it takes every MoE layer, else reference)",
        cli="--engine", dropin="engine", choices=ENGINE_CHOICES, volatile=True)
    renormalize: bool | str = setting(
        True, "renormalise the router weights over the top-k where the model itself does",
        cli="--renormalize-router-weights", choices=(True, False, RENORMALIZE_ALWAYS), parse=parse_bool,
        metavar="{true,false}")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", cli="--device", dropin="device", volatile=True)
    dtype: str = setting("auto", "dtype the model is loaded in (auto: the checkpoint's own)", cli="--dtype",
                         dropin="dtype", choices=DTYPE_CHOICES)
    layerwise: bool | str = setting(
        "auto", "stream one decoder layer at a time from disk (--no-layerwise: load the whole model, refused before "
        "loading when it cannot fit; default: by the memory plan)", cli="--layerwise", negatable=True,
        choices=LAYERWISE_CHOICES, volatile=True)
    distributed: bool = setting(True, "under torchrun, observe this rank's shard and all-reduce", volatile=True)
    merging_statistics: bool = setting(
        False, "also record upstream's five merging statistics (all experts on every counted token)",
        cli="--merging-statistics")
    checkpoint_dir: str | None = setting(None, "partial statistics (default: OUTPUT.partial)",
                                         cli="--checkpoint-dir", run=(), volatile=True)
    checkpoint_every: float = setting(300.0, "seconds between checkpoints", cli="--checkpoint-every",
                                      dropin="checkpoint_every", low=0, volatile=True)
    resume: bool = setting(False, "continue an interrupted observation", cli="--resume", run=(), volatile=True)
    progress: bool = setting(True, "progress bars", volatile=True)
    allow_longer_than_model: bool = setting(
        False, "accept a --model-max-length above the model's max_position_embeddings (a warning)",
        cli="--allow-longer-than-model", volatile=True)

    def __post_init__(self) -> None:
        validate(self)
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("{0} needs the folder of the interrupted run's checkpoint ({1})", "resume",
                              "checkpoint_dir", owner="ObserveConfig")
