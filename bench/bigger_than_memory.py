"""Bigger than memory: observe and prune a real-shape checkpoint larger than this machine's RAM.

    python bench/bigger_than_memory.py DIR --layers 24 [--free-disk-gb 20] [--keep] [--json FILE]

Builds DIR with ``bench/realshape.py`` (Qwen3-30B-A3B layer shape, Hub per-expert layout, bf16; 24 layers are
31.3 GB) unless it exists, then runs, each as its own process, timed (wall, peak RSS, bytes read):

1. ``reap-fast observe`` without a layerwise flag (8 x 512 tokens): the memory plan must choose streaming;
2. ``reap-fast observe --no-layerwise``: must be refused in one line before loading;
3. ``reap-fast prune`` from that observation (half the experts), the written size next to the estimate;
4. the drop-in ``python -m reap_fast.layerwise_prune`` (2 x 256 tokens), with the disk filled by a
   temporary file until ``--free-disk-gb`` are free (the file is removed afterwards).

DIR and every output are deleted at the end unless ``--keep``. Prints a Markdown table (README "Bigger than
memory") and writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from realshape import machine, make, measure, write_text_dataset

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _fill_disk(folder: Path, free_gb: float) -> Path | None:
    """A file that leaves about ``free_gb`` GB free on ``folder``'s file system (None when already less)."""
    extra = shutil.disk_usage(folder).free - int(free_gb * GB)
    if extra <= 0:
        return None
    filler = folder / "disk-filler.bin"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, extra)
    return filler


def run(folder: Path, work: Path, layers: int, free_disk_gb: float | None) -> dict:
    report: dict = {"machine": machine(), "layers": layers}
    if not (folder / "config.json").is_file():
        report["make"] = measure([sys.executable, str(Path(__file__).with_name("realshape.py")), str(folder),
                                  "--layers", str(layers)], cwd=REPO)
    report["checkpoint_gb"] = round(_size(folder) / GB, 2)
    data = write_text_dataset(work / "calibration.jsonl")
    observe = [sys.executable, "-m", "reap_fast", "observe", "--model", str(folder), "--dataset", f"{data}:8",
               "--model-max-length", "512", "--batch-size", "1"]
    report["observe"] = measure(observe + ["--output", str(work / "obs.pt")], cwd=REPO)
    report["observe"]["streamed_automatically"] = any("memory plan: layer streaming" in line
                                                      for line in report["observe"]["plan"])
    report["no_layerwise"] = measure(observe + ["--output", str(work / "refused.pt"), "--no-layerwise"], cwd=REPO)
    report["prune"] = measure([sys.executable, "-m", "reap_fast", "prune", "--model", str(folder), "--metrics",
                               str(work / "obs.pt"), "--output", str(work / "pruned"), "--compression-ratio", "0.5"],
                              cwd=REPO)
    report["prune"]["written_gb"] = round(_size(work / "pruned") / GB, 2)
    shutil.rmtree(work / "pruned", ignore_errors=True)
    dropin = work / "dropin"
    dropin.mkdir()
    filler = _fill_disk(work, free_disk_gb) if free_disk_gb else None
    try:
        report["dropin_free_disk_gb"] = round(shutil.disk_usage(work).free / GB, 1)
        report["layerwise_prune"] = measure([
            sys.executable, "-m", "reap_fast.layerwise_prune", "--model_name", str(folder), "--dataset_name", str(data),
            "--prune_method", "reap", "--compression_ratio", "0.5", "--batches_per_category", "1", "--batch_size", "2",
            "--model_max_length", "256", "--record_pruning_metrics_only", "true", "--do_eval", "false",
        ], cwd=dropin)
    finally:
        if filler is not None:
            filler.unlink()
    report["layerwise_prune"]["written_gb"] = round(_size(dropin / "artifacts") / GB, 2)
    return report


def table(report: dict) -> str:
    """The README table."""
    def row(name: str, entry: dict, result: str) -> str:
        return (f"| {name} | {result} | {entry['wall_s']:.0f} s | {entry['peak_rss_gib']:.1f} GiB | "
                f"{entry['read_gb']:.1f} GB | {entry['disk_read_gb']:.1f} GB |")

    observe, refused, prune, dropin = (report[k] for k in ("observe", "no_layerwise", "prune", "layerwise_prune"))
    refusal = refused["tail"].strip().splitlines()[-1] if refused["tail"].strip() else ""
    lines = [
        f"Checkpoint: {report['layers']} layers at the Qwen3-30B-A3B layer shape, {report['checkpoint_gb']} GB bf16; "
        f"machine: {report['machine']}.",
        "",
        "| run | result | wall | peak RSS | read (read calls) | read from disk |",
        "|---|---|---|---|---|---|",
        row("`reap-fast observe` (no flag; 8 x 512 tokens)",
            observe, f"exit {observe['returncode']}, "
            + ("streamed: chosen by the memory plan" if observe["streamed_automatically"] else "in memory")),
        row("`reap-fast observe --no-layerwise`", refused,
            f"refused before loading, exit {refused['returncode']}: `{refusal[:160]}`" if refused["returncode"]
            else "not refused: the model fits in memory here"),
        row("`reap-fast prune` (half the experts)", prune, f"exit {prune['returncode']}, {prune['written_gb']} GB written"),
        row(f"drop-in `layerwise_prune` (2 x 256 tokens), {report['dropin_free_disk_gb']} GB free disk", dropin,
            f"exit {dropin['returncode']}, {dropin['written_gb']} GB written"),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--free-disk-gb", type=float, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (deleted by default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reap-fast-btm-", dir=args.folder.parent))
    try:
        report = run(args.folder, work, args.layers, args.free_disk_gb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    for entry in report.values():
        if isinstance(entry, dict):
            entry["tail"] = entry.get("tail", "")[-600:]
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
