"""lm-evaluation-harness tasks on the original, pruned and W4A16 models, and the table comparing them.

``lm-eval`` (``pip install 'reap-fast[eval]'``) is called through its Python API,
``lm_eval.simple_evaluate(model="hf", model_args={"pretrained": folder, ...})``: the same Hugging Face
backend, task definitions, few-shot sampling and seeds as ``lm_eval --model hf --model_args
pretrained=folder``, so a number here is the number lm-eval users know. Every model is evaluated in its
own child process (``python -m reap_fast.harness``): loading an auto-round W4A16 checkpoint patches
transformers' MoE classes for the whole process, and a child keeps each model's memory separate.

Results of one model (``evaluate_model``) keep lm-eval's own keys, e.g.
``{"results": {"arc_easy": {"acc,none": 0.71, "acc_stderr,none": 0.01, ...}}, "n-shot": ..., ...}``;
:func:`comparison_rows` turns several models' results into rows of task, metric, values and the
recovery ratio (value / first model's value).

Command line of the child (also usable by hand)::

    python -m reap_fast.harness --model DIR --settings settings.json --json result.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .children import call_child, child_main
from .errors import ReapFastError, one_line
from .fileio import atomic_write_json
from .logs import configure_logging

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'reap-fast[eval]'"
RESULT_KEYS = ("results", "n-shot", "n-samples", "versions", "higher_is_better", "group_subtasks")
# Keys in lm-eval's per-task results that are not metrics.
NOT_METRICS = {"alias", "name", "sample_len", "sample_count", " "}


class HarnessError(ReapFastError, ValueError):
    """lm-eval missing, a task that does not exist, or a failed evaluation (one-line message)."""


@dataclass
class HarnessSettings:
    """What lm-eval is asked to do; the same for every model of one comparison.

    ``batch_size`` is an integer or lm-eval's ``auto`` / ``auto:N``; ``limit`` below 1 is a fraction of
    each task's examples, as in lm-eval. ``seed`` None keeps lm-eval's default seeds (0 for Python's
    ``random``, 1234 for numpy, torch and the few-shot sampler); an integer sets all four, as upstream
    REAP's evaluation does. ``device`` and ``dtype`` are reap-fast's names (``auto`` = CUDA when present;
    the checkpoint's dtype).
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
        self.tasks = parse_tasks(self.tasks)
        self.batch_size = str(self.batch_size)
        if self.limit is not None and self.limit <= 0:
            raise HarnessError(f"--limit must be positive, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise HarnessError(f"--num-fewshot must be at least 0, got {self.num_fewshot}")
        if not (self.batch_size.isdigit() and int(self.batch_size) > 0) and not self.batch_size.startswith("auto"):
            raise HarnessError(f"--batch-size must be a positive integer, auto or auto:N, got {self.batch_size!r}")
        if self.include_path is not None and not Path(self.include_path).exists():
            raise HarnessError(f"--include-path {self.include_path} does not exist")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine the numbers (the device does not)."""
        settings = asdict(self)
        settings.pop("device")
        return settings


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (at least one task)."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    parsed = [name.strip() for entry in names for name in str(entry).split(",") if name.strip()]
    if not parsed:
        raise HarnessError("no lm-eval task given")
    return parsed


def lm_eval_version() -> str:
    """The installed lm-eval version; :class:`HarnessError` with the install line when it is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise HarnessError(f"lm-eval is not installed ({INSTALL_HINT})")
    return importlib.metadata.version("lm_eval")


def is_available() -> bool:
    """Whether lm-eval can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def is_task_file(task: str) -> bool:
    """A task given as the path of its YAML file (lm-eval accepts those as task names)."""
    return task.endswith((".yaml", ".yml")) and Path(task).is_file()


def task_manager(settings: HarnessSettings):
    """lm-eval's TaskManager over its own tasks plus ``include_path``.

    When every requested task is a YAML file or is defined under ``include_path``, lm-eval's thousands
    of built-in task files are not indexed (the same tasks are found, only faster).
    """
    from lm_eval.tasks import TaskManager

    named = [task for task in settings.tasks if not is_task_file(task)]
    local = TaskManager(include_path=settings.include_path, include_defaults=False)
    if all(task in local.all_tasks for task in named):
        return local
    return TaskManager(include_path=settings.include_path)


def check_tasks(settings: HarnessSettings) -> None:
    """Fail with one line, before any long work, when lm-eval is missing or a task is unknown."""
    lm_eval_version()
    known = set(task_manager(settings).all_tasks)
    unknown = [task for task in settings.tasks if task not in known and not is_task_file(task)]
    if unknown:
        where = f" (searched lm-eval's tasks and {settings.include_path})" if settings.include_path else ""
        raise HarnessError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}; `lm_eval ls tasks` lists them")


def model_arguments(model_dir: str, settings: HarnessSettings) -> dict[str, Any]:
    """``model_args`` of lm-eval's HF backend for a local folder."""
    from .devices import resolve_device

    return {"pretrained": str(model_dir), "device": resolve_device(settings.device), "dtype": settings.dtype}


def evaluate_model(model_dir: str | os.PathLike, settings: HarnessSettings) -> dict[str, Any]:
    """Run the tasks on one model folder in this process; returns lm-eval's results (the keys above)."""
    version = lm_eval_version()
    import lm_eval

    seeds = {}
    if settings.seed is not None:
        seeds = {name: settings.seed for name in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                                   "fewshot_random_seed")}
    limit = settings.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_arguments(str(model_dir), settings),
        tasks=list(settings.tasks),
        num_fewshot=settings.num_fewshot,
        batch_size=settings.batch_size,
        limit=limit,
        task_manager=task_manager(settings),
        log_samples=False,
        **seeds,
    )
    result = {key: output[key] for key in RESULT_KEYS if key in output}
    result["lm_eval_version"] = version
    result["model"] = str(model_dir)
    return _plain(result)


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars and other objects become floats or strings)."""
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def evaluate_in_child(model_dir: str | os.PathLike, settings: HarnessSettings) -> dict[str, Any]:
    """:func:`evaluate_model` in a child ``python -m reap_fast.harness`` process.

    The child (which dies with this process) shows lm-eval's progress bars and log; a failed evaluation
    comes back as one :class:`HarnessError` line naming the model and the child's exception
    (:func:`reap_fast.children.call_child`).
    """
    with tempfile.TemporaryDirectory(prefix="reap-fast-lm-eval-") as scratch:
        settings_file = Path(scratch) / "settings.json"
        result_file = Path(scratch) / "result.json"
        settings_file.write_text(json.dumps(asdict(settings)))
        command = [sys.executable, "-m", "reap_fast.harness", "--model", str(model_dir),
                   "--settings", str(settings_file), "--json", str(result_file)]
        call_child(command, HarnessError, f"lm-eval on {model_dir}")
        return json.loads(result_file.read_text())


@dataclass
class ModelEntry:
    """One model of a comparison: its column name, folder, and what identifies its contents for reuse."""

    name: str
    path: str
    identity: Any = None  # e.g. the checksums recorded for the folder; None: the path alone


@dataclass
class Comparison:
    """Several models on the same tasks; results cached per model under ``cache_dir`` (reused on resume)."""

    models: list[ModelEntry]
    settings: HarnessSettings
    cache_dir: Path | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _key(self, entry: ModelEntry) -> dict[str, Any]:
        return {"settings": self.settings.fingerprint(), "path": entry.path, "identity": entry.identity}

    def _cached(self, entry: ModelEntry) -> dict[str, Any] | None:
        if self.cache_dir is None:
            return None
        file = self.cache_dir / f"{entry.name}.json"
        if not file.is_file():
            return None
        try:
            stored = json.loads(file.read_text())
        except json.JSONDecodeError:
            return None
        return stored["result"] if stored.get("key") == _plain(self._key(entry)) else None

    def run(self) -> dict[str, dict[str, Any]]:
        """Evaluate every model (one child process each) unless its cached result still applies."""
        for entry in self.models:
            result = self._cached(entry)
            if result is None:
                logger.info("lm-eval: %s (%s) on %s", entry.name, entry.path, ", ".join(self.settings.tasks))
                result = evaluate_in_child(entry.path, self.settings)
                if self.cache_dir is not None:
                    atomic_write_json({"key": self._key(entry), "result": result}, self.cache_dir / f"{entry.name}.json")
            else:
                logger.info("lm-eval: %s reused from %s", entry.name, self.cache_dir)
            self.results[entry.name] = result
        return self.results

    def report(self) -> dict[str, Any]:
        """What is written as JSON: settings, per-model results and the comparison rows."""
        return {
            "settings": self.settings.fingerprint(),
            "models": {entry.name: entry.path for entry in self.models},
            "results": self.results,
            "comparison": comparison_rows(self.results),
        }


def _metric_values(result: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    values = {}
    for task, metrics in result.get("results", {}).items():
        for key, value in metrics.items():
            if key in NOT_METRICS or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            values[(task, key)] = float(value)
    return values


def _higher_is_better(results: Mapping[str, Mapping[str, Any]], task: str, metric: str) -> bool:
    name = metric.split(",")[0]
    for result in results.values():
        flags = result.get("higher_is_better", {}).get(task, {})
        if name in flags:
            return bool(flags[name])
    return True


def comparison_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, metric): each model's value and its ratio to the first model's (None if 0 or missing).

    ``metric`` is lm-eval's key without the default filter (``acc,none`` -> ``acc``; ``exact_match,strict-match``
    stays); ``higher_is_better`` comes from lm-eval (a ratio above 1 is then a loss).
    """
    names = list(results)
    per_model = {name: _metric_values(result) for name, result in results.items()}
    order: list[tuple[str, str]] = []
    for name in names:
        order.extend(key for key in per_model[name] if key not in order)
    rows = []
    for task, metric in order:
        values = {name: per_model[name].get((task, metric)) for name in names}
        reference = values[names[0]]
        ratios = {
            name: (values[name] / reference if reference and values[name] is not None else None)
            for name in names[1:]
        }
        rows.append({"task": task, "metric": metric.replace(",none", ""), "values": values, "recovery": ratios,
                     "higher_is_better": _higher_is_better(results, task, metric)})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """The comparison as a text table: task, metric, one column per model, then value / first model's."""
    first = names[0] if names else ""
    header = ["task", "metric", *names, *(f"{name}/{first}" for name in names[1:])]
    body = []
    for row in rows:
        values = [_number(row["values"].get(name)) for name in names]
        ratios = [_number(row["recovery"].get(name)) for name in names[1:]]
        metric = row["metric"] if row.get("higher_is_better", True) else f"{row['metric']} (lower=better)"
        body.append([row["task"], metric, *values, *ratios])
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for number, line in enumerate([header, *body]):
        cells = [str(cell).ljust(widths[i]) if i < 2 else str(cell).rjust(widths[i]) for i, cell in enumerate(line)]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_comparison(comparison: Comparison, output: str | os.PathLike | None) -> dict[str, Any]:
    """Run a comparison and write its report as JSON (atomically) when ``output`` is given."""
    comparison.run()
    report = comparison.report()
    if output is not None:
        atomic_write_json(report, output)
    return report


# --- child process -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reap_fast.harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--settings", required=True, help="JSON file holding the HarnessSettings fields")
    parser.add_argument("--json", required=True, help="where the result is written")
    args = parser.parse_args(argv)
    configure_logging("%(message)s")

    def work() -> None:
        settings = HarnessSettings(**json.loads(Path(args.settings).read_text()))
        try:
            result = evaluate_model(args.model, settings)
        except ReapFastError:
            raise
        except Exception as error:  # lm-eval failing on the user's task or model: one line, as lm-eval said it
            raise HarnessError(f"{type(error).__name__}: {one_line(error)}") from error
        atomic_write_json(result, args.json)

    return child_main(work, "python -m reap_fast.harness")


if __name__ == "__main__":
    sys.exit(main())
