"""Several models on the same lm-eval tasks: each model's results (cached per model, reused on resume),
the rows comparing them (value and recovery = value / first model's value) and the text table."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config.evaluate import HarnessSettings
from ..fileio import atomic_write_json
from ..outputs import RESULTS_TAG, claim_output
from . import harness

logger = logging.getLogger(__name__)

# Keys in lm-eval's per-task results that are not metrics.
NOT_METRICS = {"alias", "name", "sample_len", "sample_count", " "}


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
        return stored["result"] if stored.get("key") == harness.plain(self._key(entry)) else None

    def run(self) -> dict[str, dict[str, Any]]:
        """Evaluate every model (one child process each) unless its cached result still applies."""
        for entry in self.models:
            result = self._cached(entry)
            if result is None:
                logger.info("lm-eval: %s (%s) on %s", entry.name, entry.path, ", ".join(self.settings.tasks))
                result = harness.evaluate_in_child(entry.path, self.settings)
                if self.cache_dir is not None:
                    atomic_write_json({"key": self._key(entry), "result": result}, self.cache_dir / f"{entry.name}.json")
            else:
                logger.info("lm-eval: %s reused from %s", entry.name, self.cache_dir)
            self.results[entry.name] = result
        return self.results

    def report(self) -> dict[str, Any]:
        """What is written as JSON: settings, per-model results and the comparison rows."""
        return {
            **RESULTS_TAG,
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


def run_comparison(
    comparison: Comparison, output: str | os.PathLike | None, overwrite: bool = False, inside_models: bool = False
) -> dict[str, Any]:
    """Run a comparison and write its report as JSON (atomically) when ``output`` is given.

    ``output`` follows the output rule (:func:`reap_fast.outputs.claim_output`), checked before the work and
    again before the write: never a file reap-fast did not write, an earlier report replaced only with
    ``overwrite``, never inside a model folder unless ``inside_models`` (the drop-in's upstream layout puts
    them in the pruned folder reap-fast wrote).
    """
    models = [] if inside_models else comparison.models
    inputs = {f"model folder {entry.name}": entry.path for entry in models}
    if output is not None:
        claim_output(output, "eval json", inputs, overwrite)
    comparison.run()
    report = comparison.report()
    if output is not None:
        claim_output(output, "eval json", inputs, overwrite)
        atomic_write_json(report, output)
    return report
