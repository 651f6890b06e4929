"""Benchmark JSON -> markdown speed tables and a speed-up plot.

Reads every ``bench/results/*.json`` (or the files given): pytest-benchmark output
(``{"machine_info": ..., "benchmarks": [{"stats": {...}, "extra_info": {...}}]}``) or the fallback
format of ``bench/test_moe_layer.py --json`` (``{"machine_info": ..., "results": [{"median_s": ...}]}``).
Each measurement is identified by its device, its shape (every ``extra_info`` field except the variant
and the timing) and its variant. End-to-end observation results (``bench/test_observe_e2e.py``: their
``extra_info`` has a ``projection``) get a table of their own: time per 2048-token sample and the
projection for the whole 48-layer job next to upstream's reported time. Speed-up = median time of the baseline variant (default
``upstream_hook``, Cerebras REAP's observer hook) / median time of the variant, for the same device,
file and shape. Missing fields are tolerated: the device falls back to ``machine_info``, the variant to
the benchmark's parameters or name, the token count to ``T``/``tokens``/``num_tokens``; rows without a
baseline get no ratio. Numbers measured under the Triton CPU interpreter are flagged: they check that
the suite runs and say nothing about speed.

    python bench/report.py                     # tables on stdout, bench/results/speedup.png
    python bench/report.py --write-readme      # only the markdown block meant for README.md
    python bench/report.py a.json b.json --plot out.png --baseline hf_fastest
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

HERE = Path(__file__).resolve().parent
DEFAULT_GLOB = str(HERE / "results" / "*.json")
DEFAULT_PLOT = HERE / "results" / "speedup.png"
DEFAULT_BASELINE = "upstream_hook"
TOKEN_KEYS = ("T", "tokens", "num_tokens", "tokens_per_batch")
VARIANT_KEYS = ("variant", "impl", "implementation", "engine", "method")
TIMING_KEYS = {"median_s", "min_s", "mean_s", "max_s", "stddev_s", "rounds", "iterations"}
NON_SHAPE_KEYS = {"device", "hf_impl", "torch", "triton", "transformers", "cuda", "note"}
VERSION_KEYS = ("torch", "triton", "transformers", "cuda")


def _as_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _variant(extra: dict, bench: dict) -> str:
    for key in VARIANT_KEYS:
        if extra.get(key) not in (None, ""):
            return str(extra[key])
    params = bench.get("params") or {}
    for key in VARIANT_KEYS:
        if params.get(key) not in (None, ""):
            return str(params[key])
    name = str(bench.get("name") or bench.get("fullname") or "unknown")
    match = re.search(r"\[(.*)\]", name)
    if match:  # test_x[variant-T] -> the first non-numeric id part
        parts = [p for p in match.group(1).split("-") if not re.fullmatch(r"[0-9.]+", p)]
        if parts:
            return parts[0]
    return name


def _tokens(extra: dict, bench: dict) -> int | None:
    for source in (extra, bench.get("params") or {}):
        for key in TOKEN_KEYS:
            value = _as_float(source.get(key))
            if value is not None:
                return int(value)
    return None


def load_measurements(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One row per measurement: file, device, versions, variant, tokens, shape, median/min seconds."""
    rows = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"warning: skipping {path}: {error}", file=sys.stderr)
            continue
        if not isinstance(data, dict):
            print(f"warning: skipping {path}: not a JSON object", file=sys.stderr)
            continue
        machine = data.get("machine_info") or {}
        env = machine.get("reap_fast") or {}
        cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else {}
        file_device = env.get("device") or cpu.get("brand_raw")  # pytest-benchmark records the CPU brand
        interpreted = bool(env.get("triton_interpret"))
        entries = []
        for bench in data.get("benchmarks") or []:
            stats = bench.get("stats") or {}
            entries.append((bench, bench.get("extra_info") or {}, _as_float(stats.get("median")), _as_float(stats.get("min")),
                            stats.get("rounds")))
        for result in data.get("results") or []:
            entries.append((result, result, _as_float(result.get("median_s")), _as_float(result.get("min_s")),
                            result.get("rounds")))
        for bench, extra, median, minimum, rounds in entries:
            if median is None:
                continue
            device = str(extra.get("device") or file_device or machine.get("machine") or "unknown device")
            variant = _variant(extra, bench)
            if "projection" in extra:
                rows.append(_end_to_end_row(path.name, device, variant, extra, env))
                continue
            # Only Triton variants run under the interpreter; PyTorch variants on a CPU are real timings.
            row_interpreted = (interpreted or "TRITON_INTERPRET" in device) and variant.startswith("triton")
            versions = {k: (extra.get(k) or env.get(k)) for k in VERSION_KEYS if (extra.get(k) or env.get(k))}
            shape = {
                k: v
                for k, v in sorted(extra.items())
                if k not in VARIANT_KEYS and k not in TIMING_KEYS and k not in NON_SHAPE_KEYS
                and isinstance(v, (int, float, str, bool))
            }
            if not shape and bench.get("group"):
                shape = {"group": bench["group"]}
            rows.append({
                "file": path.name,
                "device": device,
                "versions": versions,
                "interpreted": row_interpreted,
                "variant": variant,
                "tokens": _tokens(extra, bench),
                "shape": shape,
                "median_s": median,
                "min_s": minimum,
                "rounds": rounds,
            })
    return rows


def _end_to_end_row(file: str, device: str, variant: str, extra: dict, env: dict) -> dict[str, Any]:
    """A row of ``bench/test_observe_e2e.py``: the observed slice and the projection for the real job."""
    shape = extra.get("shape") if isinstance(extra.get("shape"), dict) else {}
    return {
        "kind": "end_to_end",
        "file": file,
        "device": device,
        "versions": {k: env[k] for k in VERSION_KEYS if env.get(k)},
        "variant": variant,
        "layers": shape.get("layers"),
        "samples": shape.get("samples"),
        "tokens_per_sample": shape.get("tokens_per_sample"),
        "seconds_per_sample": _as_float(extra.get("seconds_per_sample")),
        "seconds_per_layer_sample": _as_float(extra.get("seconds_per_layer_sample")),
        "projected_minutes": _as_float(extra.get("projected_real_job_minutes")),
        "upstream_minutes": _as_float(extra.get("upstream_reported_minutes")),
        "upstream_hardware": extra.get("upstream_hardware"),
        "projection": extra.get("projection"),
    }


def split_kinds(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(layer rows, end-to-end rows)."""
    layer = [r for r in rows if r.get("kind") != "end_to_end"]
    return layer, [r for r in rows if r.get("kind") == "end_to_end"]


def markdown_end_to_end(rows: list[dict[str, Any]]) -> str:
    """One table of end-to-end observation rows: measured slice, per-sample time, projected real job."""
    if not rows:
        return ""
    out = ["### End-to-end observation (whole model forward, REAP statistics on)", "",
           "| device | variant | measured slice | per sample (slice) | per layer and sample | "
           "projected job | upstream reported |",
           "|---|---|---|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["device"], r["variant"])):
        measured = f"{row['layers']} layers x {row['samples']} x {row['tokens_per_sample']} tokens"
        per_sample = _time(row["seconds_per_sample"]) if row["seconds_per_sample"] else "-"
        per_layer = _time(row["seconds_per_layer_sample"]) if row["seconds_per_layer_sample"] else "-"
        if row["projected_minutes"]:
            projected = f"{row['projected_minutes']:.1f} min"
            ratio = (f" ({row['upstream_minutes'] / row['projected_minutes']:.0f}x faster)"
                     if row["upstream_minutes"] else "")
        else:
            projected, ratio = "not meaningful (CPU, tiny shape)", ""
        upstream = (f"{row['upstream_minutes']:.0f} min on {row['upstream_hardware']}{ratio}"
                    if row["upstream_minutes"] else "-")
        out.append(f"| {row['device']} | {row['variant']} | {measured} | {per_sample} | {per_layer} | {projected} | {upstream} |")
    projections = {r["projection"] for r in rows if r.get("projection")}
    out.append("")
    out.append("Projected job: " + "; ".join(sorted(projections)) + " (the per-layer-and-sample time of the slice, "
               "times the job's layers and samples, plus weight loading). Upstream's figure is from other hardware.")
    return "\n".join(out) + "\n"


def add_speedups(rows: list[dict[str, Any]], baseline: str = DEFAULT_BASELINE) -> list[dict[str, Any]]:
    """Set ``speedup`` (baseline median / median) on every row that has a baseline in its group."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["file"], row["device"], json.dumps(row["shape"], sort_keys=True))].append(row)
    for members in groups.values():
        base = [r for r in members if r["variant"] == baseline]
        reference = base[0]["median_s"] if base else None
        for row in members:
            row["speedup"] = reference / row["median_s"] if reference else None
    return rows


def _shape_label(shape: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items() if k not in TOKEN_KEYS) or "-"


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def markdown(rows: list[dict[str, Any]], baseline: str = DEFAULT_BASELINE) -> str:
    """One table per (device, file): median time and speed-up vs the baseline for every variant and shape."""
    if not rows:
        return "_No benchmark results found (bench/results/*.json)._\n"
    out = []
    by_source: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[(row["device"], row["file"])].append(row)
    for (device, file), members in sorted(by_source.items()):
        versions = members[0]["versions"]
        version_text = ", ".join(f"{k} {v}" for k, v in versions.items()) or "versions not recorded"
        out.append(f"### {device} ({file})")
        out.append("")
        out.append(f"Versions: {version_text}.")
        if any(r["interpreted"] for r in members):
            out.append("")
            out.append("**Triton CPU interpreter (TRITON_INTERPRET=1): these times check that the suite runs; they are "
                       "not speed measurements.**")
        out.append("")
        variants = list(dict.fromkeys(r["variant"] for r in members))
        if baseline in variants:
            variants.remove(baseline)
            variants.insert(0, baseline)
        shapes = list(dict.fromkeys((json.dumps(r["shape"], sort_keys=True), r["tokens"]) for r in members))
        out.append("| shape | tokens | " + " | ".join(variants) + " |")
        out.append("|---|---:|" + "---:|" * len(variants))
        for shape_key, tokens in sorted(shapes, key=lambda s: (s[0], s[1] or 0)):
            cells = []
            for variant in variants:
                match = [r for r in members if r["variant"] == variant and json.dumps(r["shape"], sort_keys=True) == shape_key
                         and r["tokens"] == tokens]
                if not match:
                    cells.append("-")
                    continue
                row = match[0]
                ratio = f" ({row['speedup']:.2f}x)" if row.get("speedup") else ""
                cells.append(_time(row["median_s"]) + ratio)
            out.append(f"| {_shape_label(json.loads(shape_key))} | {tokens if tokens is not None else '-'} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(f"Median time per call; in brackets the speed-up over `{baseline}` (its median / the variant's) on the same "
               "device and shape.")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: str | os.PathLike, baseline: str = DEFAULT_BASELINE) -> Path | None:
    """Speed-up over the baseline vs tokens per batch, one panel per device, one line per variant."""
    usable = [r for r in rows if r.get("speedup") and r["tokens"] is not None and r["variant"] != baseline]
    if not usable:
        print("warning: nothing to plot (no rows with both a baseline and a token count)", file=sys.stderr)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in usable})
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4.5), squeeze=False)
    for axis, device in zip(axes[0], devices):
        members = [r for r in usable if r["device"] == device]
        lines: dict[tuple, list] = defaultdict(list)
        for row in members:
            lines[(row["variant"], _shape_label(row["shape"]))].append(row)
        shapes = {label for _, label in lines}
        for (variant, shape), points in sorted(lines.items()):
            points.sort(key=lambda r: r["tokens"])
            label = variant if len(shapes) == 1 else f"{variant} ({shape})"
            axis.plot([p["tokens"] for p in points], [p["speedup"] for p in points], marker="o", label=label)
        axis.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=f"{baseline} = 1")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per batch")
        axis.set_ylabel(f"speed-up over {baseline}")
        versions = members[0]["versions"]
        title = device + ("\n(Triton CPU interpreter: not a speed measurement)" if any(r["interpreted"] for r in members) else "")
        title += "\n" + ", ".join(f"{k} {v}" for k, v in versions.items())
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark JSON -> markdown tables and speedup.png")
    parser.add_argument("files", nargs="*", help=f"benchmark JSON files (default: {DEFAULT_GLOB})")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="variant the speed-ups are relative to")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="where to write the plot ('' = no plot)")
    parser.add_argument("--write-readme", action="store_true", help="print only the markdown block for README.md")
    args = parser.parse_args(argv)
    files = args.files or sorted(glob.glob(DEFAULT_GLOB))
    rows, end_to_end = split_kinds(load_measurements(files))
    rows = add_speedups(rows, args.baseline)
    text = markdown(rows, args.baseline)
    if end_to_end:
        text += "\n" + markdown_end_to_end(end_to_end)
    written = plot(rows, args.plot, args.baseline) if args.plot else None
    if args.write_readme:
        print("## Speed\n")
        print(text, end="")
        if written is not None:
            print(f"\n![speed-up vs tokens per batch]({os.path.relpath(written, Path.cwd())})")
        return 0
    print(text, end="")
    if written is not None:
        print(f"plot written to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
