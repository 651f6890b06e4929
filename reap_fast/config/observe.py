"""The observation stage's settings: what ``observe_checkpoint`` runs with, each default and check once.

The calibration spec itself (a path or ``name[subset](split):N`` list) is an argument of the stage, not a
setting; ``samples_per_category`` and ``model_max_length`` are checked where the set is built
(:func:`reap_fast.data.build_calibration_set`), before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import ConfigError, DEFAULT_SEED, check_choice, check_range

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
    """Settings of one observation run.

    * ``renormalize``: True renormalises g over the top-k only where the model itself does; False never;
      ``"always"`` for every family (upstream's layerwise rule).
    * ``layerwise``: True streams one decoder layer at a time from the safetensors shards instead of loading
      the whole model; False loads it; ``"auto"`` asks the memory plan (:mod:`reap_fast.models.memory_plan`):
      in memory when that fits with a margin, else streamed. A choice that cannot fit is refused before loading.
    * ``distributed``: under ``torchrun`` (WORLD_SIZE > 1) join the process group, observe this rank's
      shard and all-reduce the statistics; False observes everything in this process.
    * ``merging_statistics``: also record upstream's five merging statistics (every expert on every counted
      token; pruning does not need them).
    * ``checkpoint_dir``: partial statistics are saved there every ``checkpoint_every`` seconds and on
      SIGINT/SIGTERM (None: no checkpoints); ``resume`` continues from that folder's checkpoint.
    """

    samples_per_category: int | None = None
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
    batch_size: int = 1
    seed: int = DEFAULT_SEED
    engine: str = "auto"
    renormalize: bool | str = True
    device: str = "auto"
    dtype: str = "auto"
    layerwise: bool | str = "auto"
    distributed: bool = True
    merging_statistics: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: float = 300.0
    resume: bool = False
    progress: bool = True
    allow_longer_than_model: bool = False  # a model_max_length above the model's max_position_embeddings


    def __post_init__(self) -> None:  # each setting named as the user knows it, with its command-line flag
        check_range("batch size (--batch-size)", self.batch_size, 1)
        check_choice("engine (--engine)", self.engine, ENGINE_CHOICES)
        check_choice("dtype (--dtype)", self.dtype, DTYPE_CHOICES)
        check_choice("renormalize", self.renormalize, (True, False, RENORMALIZE_ALWAYS))
        check_choice("layerwise (--layerwise / --no-layerwise)", self.layerwise, LAYERWISE_CHOICES)
        check_range("checkpoint interval in seconds (--checkpoint-every)", self.checkpoint_every, 0)
        check_range("tokens per sequence (--model-max-length)", self.model_max_length, 1, MAX_MODEL_MAX_LENGTH)
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("--resume needs the folder of the interrupted run's checkpoint (--checkpoint-dir)")
