"""Settings of the evaluation stage: held-out perplexity (:class:`EvalConfig`) and lm-eval tasks
(:class:`HarnessSettings`, its ``harness`` part; also what ``reap-fast eval`` runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .checks import ConfigError, check_range


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
    include_path: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: str = "1"
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", parse_tasks(self.tasks))
        object.__setattr__(self, "batch_size", str(self.batch_size))
        check_range("--limit", self.limit, 0, open_low=True, error=HarnessError)
        check_range("--num-fewshot", self.num_fewshot, 0, error=HarnessError)
        batch = self.batch_size
        if not (batch.isdigit() and int(batch) > 0) and not batch.startswith("auto"):
            raise HarnessError(f"--batch-size must be a positive integer, auto or auto:N, got {batch!r}")
        if self.include_path is not None and not Path(self.include_path).exists():
            raise HarnessError(f"--include-path {self.include_path} does not exist")

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

    dataset: str | None = None
    samples: int = 16
    max_length: int = 512
    batch_size: int = 8
    harness: HarnessSettings | None = None

    def __post_init__(self) -> None:
        check_range("--eval-samples", self.samples, 1)
        check_range("--eval-max-length", self.max_length, 2)
        check_range("batch_size", self.batch_size, 1)
        if self.harness is not None and not isinstance(self.harness, HarnessSettings):
            raise ConfigError(f"harness must be HarnessSettings or None, got {type(self.harness).__name__}")
