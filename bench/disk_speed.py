"""Loading at disk speed, streaming that hides I/O, and the drop-in against upstream REAP, on the two-layer
real-shape checkpoint (``bench/realshape.py DIR --layers 2 --vocab 32768``, 2.49 GiB bf16), page cache warm.

    python bench/disk_speed.py DIR [--only dropin,load,stream] [--json bench/results/disk_speed.json]

* ``load``: ``load_model`` (the fast loader) and ``from_pretrained(device_map="cpu")`` in fresh processes,
  imports and model-class set-up done before the clock starts; GB/s = weight bytes / seconds.
* ``stream``: ``reap-fast observe`` with ``--layerwise`` and with ``--no-layerwise`` (8 x 512 tokens, batch 1),
  whole commands timed; the ratio streamed / in memory.
* ``dropin``: upstream's ``prune.py --record_pruning_metrics_only true`` (its own venv, tests/upstream_oracle.py)
  and the drop-in ``python -m reap_fast.prune`` with the same flags (2 x 2 x 256 tokens), one after the other;
  compiled modules cached for both (``realshape.measure``; ``--warmup`` fills that cache on a first use).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from realshape import machine, measure, warm, write_text_dataset

REPO = Path(__file__).resolve().parents[1]
_LOAD = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from reap_fast.models.loading import load_config, load_model
from reap_fast.models.weights import build_skeleton
path, mode = sys.argv[1], sys.argv[2]
build_skeleton(load_config(path), torch.bfloat16)  # imports and class set-up, outside the clock for both
began = time.perf_counter()
if mode == "fast":
    model, _ = load_model(path, device="cpu")
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="cpu")
print(json.dumps({"seconds": time.perf_counter() - began}))
"""


def _weight_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def bench_load(folder: Path) -> dict:
    results = {}
    for mode in ("fast", "from_pretrained"):
        warm(folder)
        run = measure([sys.executable, "-c", _LOAD, str(folder), mode], cwd=REPO)
        seconds = json.loads(run["tail"].strip().splitlines()[-1])["seconds"]
        results[mode] = {"seconds": round(seconds, 2), "gb_per_s": round(_weight_bytes(folder) / seconds / 1e9, 2),
                         "peak_rss_gib": run["peak_rss_gib"]}
    results["speedup"] = round(results["from_pretrained"]["seconds"] / results["fast"]["seconds"], 2)
    return results


def bench_stream(folder: Path, work: Path) -> dict:
    data = write_text_dataset(work / "calibration.jsonl")
    results = {}
    for flag in ("--layerwise", "--no-layerwise"):
        output = work / f"obs{flag}.pt"
        warm(folder)
        results[flag.strip("-")] = measure([
            sys.executable, "-m", "reap_fast", "observe", "--model", str(folder), "--dataset", f"{data}:8",
            "--model-max-length", "512", "--batch-size", "1", "--output", str(output), flag,
        ], cwd=REPO)
        assert results[flag.strip("-")]["returncode"] == 0, results[flag.strip("-")]["tail"]
    results["streamed_over_in_memory"] = round(results["layerwise"]["wall_s"] / results["no-layerwise"]["wall_s"], 3)
    return results


def bench_dropin(folder: Path, work: Path, warmup: bool = False) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from upstream_oracle import _dropin_command, _upstream_command, find_upstream, write_datasets

    upstream = find_upstream(work)
    if isinstance(upstream, str):
        return {"skipped": upstream}
    argv = [
        "--model_name", str(folder), "--dataset_name", "theblackcat102/evol-codealpaca-v1", "--seed", "42",
        "--prune_method", "reap", "--compression_ratio", "0.5", "--batches_per_category", "2", "--batch_size", "2",
        "--model_max_length", "256", "--renormalize_router_weights", "true", "--record_pruning_metrics_only", "true",
        "--output_file_name", "obs.pt", "--do_eval", "false", "--smoke_test", "false", "--profile", "false",
    ]
    results = {}
    for name, build in (("upstream", lambda cwd: _upstream_command(upstream, cwd, argv, "reap.prune")),
                        ("dropin", lambda cwd: _dropin_command(cwd, argv, layerwise=False))):
        cwd = work / f"run-{name}"
        cwd.mkdir()
        write_datasets(cwd, rows=400)
        command, env = build(cwd)
        if warmup:  # compiled modules cached (a first use of the cache compiles them)
            measure(command, cwd=cwd, env=env)
            shutil.rmtree(cwd / "artifacts", ignore_errors=True)
        warm(folder)
        results[name] = measure(command, cwd=cwd, env=env)
        assert results[name]["returncode"] == 0, results[name]["tail"]
        shutil.rmtree(cwd / "artifacts", ignore_errors=True)
    results["upstream_over_dropin"] = round(results["upstream"]["wall_s"] / results["dropin"]["wall_s"], 2)
    return results


def table(report: dict) -> str:
    """The README table of whichever parts ran."""
    lines = [f"Checkpoint: 2 layers at the Qwen3-30B-A3B layer shape, {report['checkpoint_gb']} GB bf16, in the page "
             f"cache; machine: {report['machine']}.", "", "| measurement | result |", "|---|---|"]
    if "load" in report:
        load = report["load"]
        for name, label in (("fast", "`load_model` (fast loader)"), ("from_pretrained", "`from_pretrained`")):
            lines.append(f"| {label} | {load[name]['seconds']} s, {load[name]['gb_per_s']} GB/s, "
                         f"peak RSS {load[name]['peak_rss_gib']} GiB |")
    if "stream" in report:
        stream = report["stream"]
        lines.append(f"| `reap-fast observe`, 8 x 512 tokens: streamed / in memory | {stream['layerwise']['wall_s']} s / "
                     f"{stream['no-layerwise']['wall_s']} s = {stream['streamed_over_in_memory']} |")
    if "dropin" in report and "skipped" not in report["dropin"]:
        dropin = report["dropin"]
        lines.append(f"| upstream `prune.py --record_pruning_metrics_only true` / drop-in `python -m reap_fast.prune`, "
                     f"2 x 2 x 256 tokens | {dropin['upstream']['wall_s']} s / {dropin['dropin']['wall_s']} s = "
                     f"{dropin['upstream_over_dropin']}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--only", default="dropin,load,stream")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--warmup", action="store_true", help="run each drop-in comparison command once untimed first")
    args = parser.parse_args()
    report = {"machine": machine(), "checkpoint_gb": round(_weight_bytes(args.folder) / 1e9, 2)}
    with tempfile.TemporaryDirectory(prefix="reap-fast-disk-speed-") as work:
        for name in args.only.split(","):
            target = Path(work) / name
            target.mkdir()
            report[name] = {"load": lambda: bench_load(args.folder), "stream": lambda: bench_stream(args.folder, target),
                            "dropin": lambda: bench_dropin(args.folder, target, args.warmup)}[name]()
            for value in report[name].values():
                if isinstance(value, dict):
                    value.pop("tail", None)
            print(json.dumps({name: report[name]}), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
