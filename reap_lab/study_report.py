"""Summaries, tables, plot and the quick-run comparison of the quality study (:mod:`reap_lab.study`)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from reap_fast.fileio import atomic_write, atomic_write_json
from .environment import describe
from .study_stats import paired_comparison, per_model_means, prediction_interval, t_interval

LEVEL = 0.95
RESULTS_FORMAT = 2  # of results.json; a stored per-model file of another format is redone


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _seed0_values(runs: Sequence[Mapping], method: str, ratio: float) -> list[float]:
    """One value per model: the run with calibration seed 0 (what a one-seed quick run measures)."""
    return [r["perplexity"] for r in sorted(runs, key=lambda r: r["train_seed"])
            if r["method"] == method and math.isclose(r["compression_ratio"], ratio) and r["seed"] == 0]


def _method_summary(runs: Sequence[Mapping], method: str, ratio: float) -> dict[str, Any] | None:
    chosen = [r for r in runs if r["method"] == method and math.isclose(r["compression_ratio"], ratio)]
    if not chosen:
        return None
    reap = {(r["train_seed"], r["seed"]): r for r in runs
            if r["method"] == "reap" and math.isclose(r["compression_ratio"], ratio)}
    overlaps = [statistics.fmean(_jaccard(r["kept"][layer], reap[key]["kept"][layer]) for layer in r["kept"])
                for r in chosen if (key := (r["train_seed"], r["seed"])) in reap]
    ppl_by_model = per_model_means(runs, method, ratio)
    seed0 = _seed0_values(runs, method, ratio)
    quick = {"n": len(seed0)}
    if seed0:
        quick.update(min=min(seed0), max=max(seed0))
    if len(seed0) >= 2:
        quick["prediction_low"], quick["prediction_high"] = prediction_interval(seed0, LEVEL)
    return {
        "perplexity": t_interval(list(ppl_by_model.values()), LEVEL).as_dict(),
        "perplexity_by_model": {str(k): v for k, v in ppl_by_model.items()},
        "perplexity_range": [min(r["perplexity"] for r in chosen), max(r["perplexity"] for r in chosen)],
        "next_token_accuracy": t_interval(list(per_model_means(runs, method, ratio, "next_token_accuracy").values()),
                                          LEVEL).as_dict(),
        "removed_traffic_share": statistics.fmean(r["removed_traffic_share"] for r in chosen),
        "jaccard_with_reap": statistics.fmean(overlaps) if overlaps else None,
        "quick_spread": quick,
        "runs": len(chosen),
    }


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per ratio and method: t-interval over models, ranges, quick-run spread; paired comparisons of all pairs."""
    runs, settings = results["runs"], results["settings"]
    baseline = [b["perplexity"] for _, b in sorted(results["baseline"].items(), key=lambda kv: int(kv[0]))]
    out: dict[str, Any] = {"level": LEVEL, "models": len(baseline),
                           "unpruned": {"perplexity": t_interval(baseline, LEVEL).as_dict(),
                                        "perplexity_by_model": baseline,
                                        "next_token_accuracy": t_interval(
                                            [b["next_token_accuracy"] for b in results["baseline"].values()],
                                            LEVEL).as_dict()},
                           "methods": {}, "comparisons": []}
    if len(baseline) >= 2:
        out["unpruned"]["quick_spread"] = dict(zip(("prediction_low", "prediction_high"),
                                                   prediction_interval(baseline, LEVEL)), min=min(baseline),
                                               max=max(baseline), n=len(baseline))
    methods = settings["methods"]
    for ratio in settings["compression_ratios"]:
        key = f"{ratio:g}"
        out["methods"][key] = {m: s for m in methods if (s := _method_summary(runs, m, ratio)) is not None}
        present = [m for m in methods if m in out["methods"][key]]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                out["comparisons"].append(paired_comparison(runs, a, b, ratio, LEVEL).as_dict())
    return out


# --- markdown ---------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _interval_text(entry: Mapping[str, float], digits: int = 3, scale: float = 1.0) -> str:
    mean = _fmt(entry["mean"] * scale, digits)
    if entry["n"] < 2:
        return mean
    return f"{mean} [{_fmt(entry['low'] * scale, digits)}, {_fmt(entry['high'] * scale, digits)}]"


def _comparison_text(comparison: Mapping[str, Any]) -> str:
    p = comparison["percent"]
    return f"{p['mean']:+.1f}% [{p['low']:+.1f}, {p['high']:+.1f}]"


def comparisons_for(summary: Mapping[str, Any], ratio: float, method: str) -> list[Mapping[str, Any]]:
    """The paired comparisons at ``ratio`` that involve ``method``, oriented as ``method`` vs the other."""
    out = []
    for c in summary["comparisons"]:
        if not math.isclose(c["compression_ratio"], ratio) or method not in (c["a"], c["b"]):
            continue
        if c["a"] == method:
            out.append(c)
        else:
            p = c["percent"]
            flipped = {k: 100 * (1 / (1 + v / 100) - 1) for k, v in p.items()}
            out.append({**c, "a": c["b"], "b": c["a"], "a_better_on": c["models"] - c["a_better_on"],
                        "percent": {"mean": flipped["mean"], "low": flipped["high"], "high": flipped["low"]}})
    return out


def significant_findings(summary: Mapping[str, Any]) -> list[str]:
    """One sentence per significant paired difference, ordered by ratio then size."""
    lines = []
    for c in sorted((c for c in summary["comparisons"] if c["significant"]),
                    key=lambda c: (c["compression_ratio"], -abs(c["percent"]["mean"]))):
        better, worse = (c["a"], c["b"]) if c["percent"]["mean"] < 0 else (c["b"], c["a"])
        oriented = next(x for x in comparisons_for(summary, c["compression_ratio"], worse) if x["b"] == better)
        lines.append(f"at {c['compression_ratio']:.0%}, `{better}` beats `{worse}`: `{worse}`'s perplexity is "
                     f"{_comparison_text(oriented)} higher, `{better}` better on {c['models'] - oriented['a_better_on']}"
                     f"/{c['models']} models")
    return lines


def ties(summary: Mapping[str, Any]) -> list[str]:
    """Pairs whose interval contains zero."""
    return [f"at {c['compression_ratio']:.0%}: `{c['a']}` vs `{c['b']}` {_comparison_text(c)}"
            for c in summary["comparisons"] if not c["significant"]]


def quality_table(results: Mapping[str, Any]) -> list[str]:
    """The main table: mean perplexity per method and ratio with its t-interval over models, and REAP's paired gap."""
    settings, summary = results["settings"], results["summary"]
    ratios = settings["compression_ratios"]
    n = summary["models"]
    head = "| method | " + " | ".join(f"ppl @{r:.0%} [95% CI] | vs REAP @{r:.0%} | acc @{r:.0%}" for r in ratios) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(ratios)]
    unpruned = summary["unpruned"]
    lines.append("| unpruned | " + " | ".join(
        f"{_interval_text(unpruned['perplexity'])} | - | {_fmt(unpruned['next_token_accuracy']['mean'] * 100, 2)}%"
        for _ in ratios) + " |")
    for method in settings["methods"]:
        cells = []
        for ratio in ratios:
            entry = summary["methods"].get(f"{ratio:g}", {}).get(method)
            if entry is None:
                cells.append("- | - | -")
                continue
            versus = "-"
            if method != "reap":
                found = [c for c in comparisons_for(summary, ratio, method) if c["b"] == "reap"]
                if found:
                    c = found[0]
                    versus = _comparison_text(c) + (" **sig.**" if c["significant"] else " tie") if n > 1 else \
                        f"{c['percent']['mean']:+.1f}%"
            cells.append(f"{_interval_text(entry['perplexity'])} | {versus} | "
                         f"{_fmt(entry['next_token_accuracy']['mean'] * 100, 2)}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(results: Mapping[str, Any]) -> str:
    """The study's tables in markdown."""
    settings, summary = results["settings"], results["summary"]
    n = summary["models"]
    seeds = len(settings["seeds"])
    tokens = next(iter(results["baseline"].values()))["tokens"]
    lines = [
        "# REAP quality study (trained tiny Qwen3-MoE, held-out stdlib text)", "",
        f"{n} independently trained model(s) (train seeds {settings['train_seeds']}) x {seeds} calibration seed(s) "
        f"{settings['seeds']} (also the random method's seed); {tokens} held-out byte tokens per evaluation. "
        "A cell is the mean over models of each model's mean over calibration seeds, with the 95 % Student-t "
        f"interval over the {n} models in brackets. *vs REAP*: the method's perplexity relative to REAP's, paired "
        "model by model (mean of per-model log ratios, 95 % t-interval); **sig.** when the interval excludes 0, "
        "otherwise a tie.", "",
    ]
    lines += quality_table(results)
    lines += ["", "## Significant differences (paired over models, 95 % t-interval excludes 0)", ""]
    found = significant_findings(summary) if n > 1 else []
    lines += [f"- {line}" for line in found] or ["- none"]
    lines += ["", "## Ties (interval contains 0)", ""]
    lines += [f"- {line}" for line in ties(summary)] if n > 1 else ["- one model: no intervals"]
    lines += ["", f"With {len(summary['comparisons'])} comparisons at 95 %, about "
              f"{0.05 * len(summary['comparisons']):.1f} could exclude 0 by chance alone; differences near the edge "
              "deserve less weight than those far from it.", ""]
    lines += ["## Per model (perplexity, mean over calibration seeds)", ""]
    ratios = settings["compression_ratios"]
    lines.append("| train seed | unpruned | " + " | ".join(f"{m} @{r:.0%}" for r in ratios for m in settings["methods"]) + " |")
    lines.append("|---|---:|" + "---:|" * (len(ratios) * len(settings["methods"])))
    for seed, base in sorted(results["baseline"].items(), key=lambda kv: int(kv[0])):
        cells = []
        for r in ratios:
            for m in settings["methods"]:
                value = summary["methods"].get(f"{r:g}", {}).get(m, {}).get("perplexity_by_model", {}).get(seed)
                cells.append(_fmt(value) if value is not None else "-")
        lines.append(f"| {seed} | {_fmt(base['perplexity'])} | " + " | ".join(cells) + " |")
    lines += ["", "## Other figures (means over all runs)", "",
              "| method | " + " | ".join(f"ppl range @{r:.0%} | overlap w/ REAP @{r:.0%} | traffic removed @{r:.0%}"
                                         for r in ratios) + " |",
              "|---|" + "---:|---:|---:|" * len(ratios)]
    for method in settings["methods"]:
        cells = []
        for r in ratios:
            e = summary["methods"].get(f"{r:g}", {}).get(method)
            if e is None:
                cells.append("- | - | -")
                continue
            overlap = _fmt(e["jaccard_with_reap"], 2) if e["jaccard_with_reap"] is not None else "-"
            cells.append(f"{_fmt(e['perplexity_range'][0])}..{_fmt(e['perplexity_range'][1])} | {overlap} | "
                         f"{e['removed_traffic_share'] * 100:.1f}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Overlap w/ REAP: mean Jaccard index between the method's kept experts and REAP's, per layer, same "
              "model and calibration seed. Traffic removed: share of the calibration tokens' routed (token, expert) "
              "slots that went to the removed experts, mean over layers.", ""]
    lines += quick_spread_markdown(results)
    lines += _routing_markdown(results)
    lines += _run_markdown(results)
    return "\n".join(lines) + "\n"


def quick_spread_markdown(results: Mapping[str, Any]) -> list[str]:
    """Where a one-model, calibration-seed-0 run (``--quick``) should land."""
    summary = results["summary"]
    if summary["models"] < 2:
        return []
    lines = ["## Expected spread of `--quick` (one model, calibration seed 0)", "",
             "Per cell: the range of the committed models' calibration-seed-0 perplexities, and the 95 % prediction "
             "interval for one more independently trained model (mean +- t * sd * sqrt(1 + 1/n)).", "",
             "| method | " + " | ".join(f"range @{r:.0%} | 95% prediction @{r:.0%}"
                                        for r in results["settings"]["compression_ratios"]) + " |",
             "|---|" + "---:|---:|" * len(results["settings"]["compression_ratios"])]
    unpruned = summary["unpruned"]["quick_spread"]
    lines.append("| unpruned | " + " | ".join(
        f"{_fmt(unpruned['min'])}..{_fmt(unpruned['max'])} | "
        f"{_fmt(unpruned['prediction_low'])}..{_fmt(unpruned['prediction_high'])}"
        for _ in results["settings"]["compression_ratios"]) + " |")
    for method in results["settings"]["methods"]:
        cells = []
        for r in results["settings"]["compression_ratios"]:
            q = summary["methods"].get(f"{r:g}", {}).get(method, {}).get("quick_spread", {})
            if q.get("n", 0) < 2:
                cells.append("- | -")
                continue
            cells.append(f"{_fmt(q['min'])}..{_fmt(q['max'])} | {_fmt(q['prediction_low'])}..{_fmt(q['prediction_high'])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _routing_markdown(results: Mapping[str, Any]) -> list[str]:
    lines = ["## Routing of the trained models (held-out text, mean over layers)", "",
             "| train seed | | usage CV | max/min share | usage entropy / log E | token entropy / log E | docs-vs-code JS (bits) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for seed, info in sorted(results["training"].items(), key=lambda kv: int(kv[0])):
        for when in ("before", "after"):
            mean = info[when]["routing"]["mean"]
            lines.append(f"| {seed} | {when} training | {_fmt(mean['usage_cv'])} | {_fmt(mean['max_min_ratio'], 2)} | "
                         f"{_fmt(mean['usage_entropy'])} | {_fmt(mean['token_entropy'])} | "
                         f"{_fmt(mean.get('category_js_bits', float('nan')))} |")
    return lines + [""]


def _run_markdown(results: Mapping[str, Any]) -> list[str]:
    training = list(results["training"].values())
    first = training[0] if training else {}
    compute = results.get("compute", {})
    train_min = compute.get("training_s", float("nan")) / 60
    return [
        "## How it was run", "",
        f"Model: {first.get('parameters', '?')} parameters, trained {first.get('steps', '?')} steps of "
        f"{first.get('batch_size', '?')} x {first.get('seq_len', '?')} tokens ({first.get('epochs', float('nan')):.2f} "
        f"epochs), router aux-loss coefficient {first.get('aux_loss_coef', '?')}, deterministic algorithms "
        f"{first.get('deterministic_algorithms', '?')}, {first.get('threads', '?')} thread(s).", "",
        f"Environment: {describe(results['environment'])}.", "",
        f"Compute: training {train_min:.1f} min for {len(training)} model(s), pruning + evaluation "
        f"{compute.get('evaluation_s', float('nan')) / 60:.1f} min (both summed over the runs that did them; "
        f"this invocation {compute.get('this_run_s', float('nan')) / 60:.1f} min, reusing stored checkpoints and "
        "evaluations when present). Timings were taken on a CPU shared with other work.", "",
        "Another processor (other vector instructions) rounds differently during training and so trains other "
        "models: compare a rerun elsewhere with the intervals, not with the digits.",
    ]


# --- plot -----------------------------------------------------------------------------------------------------


def plot_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Left: perplexity per method and ratio (mean over models, 95 % t-interval, one dot per model).
    Right: each method against REAP, paired over models (percent, 95 % t-interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, summary = results["settings"], results["summary"]
    methods, ratios = settings["methods"], settings["compression_ratios"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(ratios)
    colors = plt.cm.viridis([0.2 + 0.55 * i / max(1, len(ratios) - 1) for i in range(len(ratios))])
    for i, ratio in enumerate(ratios):
        offset = (i - (len(ratios) - 1) / 2) * width
        for j, method in enumerate(methods):
            entry = summary["methods"].get(f"{ratio:g}", {}).get(method)
            if entry is None:
                continue
            ppl = entry["perplexity"]
            dots = list(entry["perplexity_by_model"].values())
            left.scatter([j + offset] * len(dots), dots, s=10, color=colors[i], alpha=0.6, zorder=2)
            left.errorbar(j + offset, ppl["mean"], yerr=[[ppl["mean"] - ppl["low"]], [ppl["high"] - ppl["mean"]]],
                          fmt="D", color="black", markerfacecolor=colors[i], capsize=4, zorder=3,
                          label=f"{ratio:.0%} pruned: mean, 95% CI; dots = models" if j == 0 else None)
            if method == "reap":
                continue
            found = [c for c in comparisons_for(summary, ratio, method) if c["b"] == "reap"]
            if found:
                p = found[0]["percent"]
                right.errorbar(j + offset, p["mean"], yerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]],
                               fmt="o", color=colors[i], capsize=4, markersize=7 if found[0]["significant"] else 4,
                               label=f"{ratio:.0%} pruned" if j == 1 else None)
    unpruned = summary["unpruned"]["perplexity"]["mean"]
    left.axhline(unpruned, color="crimson", linestyle="--", linewidth=1.2, label=f"unpruned ({unpruned:.3g})")
    left.set_ylabel("held-out perplexity (lower is better)")
    left.set_title(f"perplexity, {summary['models']} trained models", fontsize=10)
    right.axhline(0, color="black", linewidth=1)
    right.set_ylabel("perplexity relative to REAP, paired over models (%)")
    right.set_title("method vs REAP (above 0: worse than REAP; interval off 0: significant)", fontsize=10)
    for axis in (left, right):
        axis.set_xticks(range(len(methods)))
        axis.set_xticklabels(methods, rotation=15)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Expert pruning of trained 4x16-expert top-2 Qwen3-MoEs (byte LM, stdlib text)\n"
                 + describe(results["environment"]), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda handle: fig.savefig(handle, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_outputs(results: Mapping[str, Any], output_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """``results.json``, ``results.md`` and (with ``plot``) ``quality.png`` in ``output_dir``, each written atomically."""
    output_dir = Path(output_dir)
    paths = {"json": atomic_write_json(json.loads(json.dumps(results, default=str)), output_dir / "results.json")}
    text = results_markdown(results)
    paths["markdown"] = atomic_write(output_dir / "results.md", lambda handle: handle.write(text.encode("utf-8")))
    if plot:
        paths["plot"] = plot_results(results, output_dir / "quality.png")
    return paths


# --- quick run against committed results -------------------------------------------------------------------------


def check_reference(reference: Mapping[str, Any], path: object = "the reference") -> None:
    """ValueError unless ``reference`` is a results.json of this format with a spread (two models or more)."""
    if reference.get("format") != RESULTS_FORMAT or "summary" not in reference:
        raise ValueError(f"{path} is not a results.json of format {RESULTS_FORMAT}; rerun the study or pass --compare")
    if reference["summary"].get("models", 0) < 2:
        raise ValueError(f"{path} holds fewer than two trained models: it has no spread to compare with")


def compare_with(results: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """Each perplexity of a one-model run (``results``) against the committed spread of ``reference``."""
    check_reference(reference)
    ref_summary = reference["summary"]
    same_machine = (reference["environment"].get("cpu") == results["environment"].get("cpu")
                    and reference["environment"].get("versions", {}).get("torch")
                    == results["environment"].get("versions", {}).get("torch"))
    cells = []
    baseline = results["baseline"]
    for seed, base in baseline.items():
        spread = ref_summary["unpruned"].get("quick_spread", {})
        cells.append(_cell("unpruned", None, int(seed), base["perplexity"], spread,
                           reference["baseline"].get(seed, {}).get("perplexity")))
    for run in results["runs"]:
        if run["seed"] != 0:
            continue
        entry = ref_summary["methods"].get(f"{run['compression_ratio']:g}", {}).get(run["method"])
        if entry is None:
            continue
        same = [r["perplexity"] for r in reference["runs"] if r["train_seed"] == run["train_seed"] and r["seed"] == 0
                and r["method"] == run["method"] and math.isclose(r["compression_ratio"], run["compression_ratio"])]
        cells.append(_cell(run["method"], run["compression_ratio"], run["train_seed"], run["perplexity"],
                           entry["quick_spread"], same[0] if same else None))
    return {"same_processor_and_torch": same_machine, "reference_environment": describe(reference["environment"]),
            "this_environment": describe(results["environment"]), "cells": cells,
            "inside_range": sum(c["inside_range"] for c in cells),
            "inside_prediction": sum(c["inside_prediction"] for c in cells), "total": len(cells)}


def _cell(method: str, ratio: float | None, train_seed: int, value: float, spread: Mapping[str, Any],
          committed_same_model: float | None) -> dict[str, Any]:
    low, high = spread.get("min", math.nan), spread.get("max", math.nan)
    p_low, p_high = spread.get("prediction_low", math.nan), spread.get("prediction_high", math.nan)
    return {"method": method, "compression_ratio": ratio, "train_seed": train_seed, "perplexity": value,
            "range": [low, high], "prediction": [p_low, p_high], "inside_range": bool(low <= value <= high),
            "inside_prediction": bool(p_low <= value <= p_high), "committed_same_seed": committed_same_model}


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """The quick run's perplexities next to the committed spread."""
    lines = ["## This run against the committed study", "",
             f"Committed: {comparison['reference_environment']}", f"This run: {comparison['this_environment']}", "",
             "| setting | this run | committed, same train seed | committed range | 95% prediction | inside |",
             "|---|---:|---:|---:|---:|---|"]
    for c in comparison["cells"]:
        name = c["method"] if c["compression_ratio"] is None else f"{c['method']} @{c['compression_ratio']:.0%}"
        same = _fmt(c["committed_same_seed"]) if c["committed_same_seed"] is not None else "-"
        verdict = "range" if c["inside_range"] else ("prediction interval" if c["inside_prediction"] else "OUTSIDE")
        lines.append(f"| {name} | {_fmt(c['perplexity'])} | {same} | {_fmt(c['range'][0])}..{_fmt(c['range'][1])} | "
                     f"{_fmt(c['prediction'][0])}..{_fmt(c['prediction'][1])} | {verdict} |")
    lines += ["", f"{comparison['inside_range']}/{comparison['total']} inside the committed range, "
              f"{comparison['inside_prediction']}/{comparison['total']} inside the 95 % prediction interval."]
    if comparison["same_processor_and_torch"]:
        lines.append("Same processor and torch as the committed run: with the same threads the model of the same "
                     "train seed is bit-identical, so the 'same train seed' column should match to the last digit.")
    else:
        lines.append("Another processor or torch than the committed run: this is another model, expected inside the "
                     "spread, not equal to any committed digit.")
    return "\n".join(lines) + "\n"
