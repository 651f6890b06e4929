"""Settings of the evaluation stage: held-out perplexity (:class:`EvalConfig`) and lm-eval tasks
(:class:`HarnessSettings`, its ``harness`` part; also what ``reap-fast eval`` runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .checks import ConfigError, shown
from .declare import setting, validate
from .observe import DTYPE_CHOICES


class HarnessError(ConfigError):
    """lm-eval missing, settings or a task it cannot run, or a failed evaluation (one-line message)."""


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (at least one task)."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    parsed = [name.strip() for entry in names for name in str(entry).split(",") if name.strip()]
    if not parsed:
        raise HarnessError("no lm-eval task given")
    return parsed


@dataclass(frozen=True)
class HarnessSettings:
    """What lm-eval is asked to do; the same for every model of one comparison.

    ``tasks`` is a list or lm-eval's comma-separated spelling. ``batch_size`` is an integer or lm-eval's
    ``auto`` / ``auto:N``; ``limit`` below 1 is a fraction of each task's examples, as in lm-eval.
    ``seed`` None keeps lm-eval's default seeds (0 for Python's ``random``, 1234 for numpy, torch and the
    few-shot sampler); an integer sets all four, as upstream REAP's evaluation does. ``device`` and
    ``dtype`` are reap-fast's names (``auto`` = CUDA when present; the checkpoint's dtype).
    """

    tasks: list[str]
    include_path: str | None = setting(None, "folder of extra lm-eval task YAML files (lm-eval's --include_path)",
                                       cli=("--include-path", "--include_path"), run="--eval-include-path")
    limit: float | None = setting(None, "examples per task (below 1: a fraction), as lm-eval's --limit",
                                  cli="--limit", run="--eval-limit", low=0, open_low=True)
    num_fewshot: int | None = setting(None, "few-shot examples (default: each task's own)",
                                      cli=("--num-fewshot", "--num_fewshot"), run="--eval-num-fewshot", integer=True,
                                      low=0)
    batch_size: str = setting("1", "lm-eval batch size: an integer, auto or auto:N",
                              cli=("--batch-size", "--batch_size"), run="--eval-batch-size", parse=str)
    seed: int | None = setting(None, "all of lm-eval's seeds (default: lm-eval's own)", cli="--seed", run=(),
                               integer=True)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", cli="--device", volatile=True)
    dtype: str = setting("auto", "dtype the models are loaded in (auto: each checkpoint's own)", cli="--dtype",
                         choices=DTYPE_CHOICES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", parse_tasks(self.tasks))
        object.__setattr__(self, "batch_size", str(self.batch_size))
        validate(self, HarnessError)
        batch, owner = self.batch_size, "HarnessSettings"
        if not (batch.isdigit() and int(batch) > 0) and not batch.startswith("auto"):
            raise HarnessError(f"{{0}} must be a positive integer, auto or auto:N, got {shown(batch)}", "batch_size",
                               owner=owner)
        if self.include_path is not None and not Path(self.include_path).exists():
            raise HarnessError(f"{{0}} {shown(self.include_path)} does not exist", "include_path", owner=owner)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the numbers (the device does not)."""
        settings = asdict(self)
        settings.pop("device")
        return settings


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation after pruning (and quantizing): what ``reap-fast run --eval*`` computes.

    ``dataset`` is a held-out text spec (as ``--dataset``; None: no perplexity): ``samples`` sequences of
    ``max_length`` tokens, scored ``batch_size`` rows at a time. ``harness``: lm-eval tasks on every model
    (None: none).
    """

    dataset: str | None = setting(None, "held-out text spec for --eval (implies --eval)", run="--eval-dataset")
    samples: int = setting(16, "held-out documents drawn from --eval-dataset (each cut to --eval-max-length tokens)",
                           run="--eval-samples", integer=True, low=1)
    max_length: int = setting(512, "tokens per held-out sequence", run="--eval-max-length", integer=True, low=2)
    batch_size: int = setting(8, "sequences scored at once", integer=True, low=1)
    harness: HarnessSettings | None = setting(None, "lm-eval tasks on every model (checked by its own stage)",
                                              volatile=True)

    def __post_init__(self) -> None:
        validate(self)
        if self.harness is not None and not isinstance(self.harness, HarnessSettings):
            raise ConfigError(f"harness must be HarnessSettings or None, got {type(self.harness).__name__}")
