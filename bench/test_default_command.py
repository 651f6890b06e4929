"""Upstream's default command, side by side: Cerebras REAP's ``prune.py`` vs the drop-in, same flags, one run.

Upstream's default is ``--record_pruning_metrics_only false``: the observation also records the five
merging statistics (every expert on every token). Both programs run the same command line
(``--prune_method reap --compression_ratio 0.5``, evaluation off) on the same random-weight checkpoint at
the real Qwen3-30B-A3B shape (E=128, k=8, H=2048, I=768, 32 query / 4 KV heads of 128, vocabulary
151936), ``REAP_FAST_BENCH_LAYERS`` decoder layers (default 2), bf16, ``--batches_per_category 2
--batch_size 2 --model_max_length 256`` (4 x 256 tokens) of the local chat dataset. The checkpoint is
written by upstream's transformers (4.55) so both stacks read it.

Each program runs once, one after the other (never at the same time: two cores), under
``/usr/bin/time -v``: wall seconds, CPU seconds (user + system: the steadier figure on a shared machine)
and peak resident memory (max RSS) go into each benchmark's ``extra_info``; the drop-in's entry also holds the speed-up and memory ratio against upstream's, measured
in the same session. Needs upstream's environment (``REAP_UPSTREAM_PYTHON``, see tests/upstream_oracle.py);
skipped without it. CPU only (the GPU entry is ``bench/gpu_merge_check.py``).

Run: ``pytest bench/test_default_command.py --benchmark-json=bench/results/default_command.json -s``
(about 10 minutes on a 2-core CPU: upstream's run dominates).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from upstream_oracle import (  # noqa: E402  (tests/ is on the path only from here)
    CHAT_DATASET,
    _dropin_command,
    _upstream_command,
    find_upstream,
    write_datasets,
)

LAYERS = int(os.environ.get("REAP_FAST_BENCH_LAYERS", "2"))
SHAPE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
             vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6)
ARGV = ["--dataset_name", CHAT_DATASET, "--seed", "0", "--prune_method", "reap", "--compression_ratio", "0.5",
        "--batches_per_category", "2", "--batch_size", "2", "--model_max_length", "256",
        "--output_file_name", "obs.pt", "--do_eval", "false", "--smoke_test", "false", "--profile", "false"]

_BUILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from reap_lab.tiny import byte_tokenizer, tiny_qwen3_moe_config
folder, layers, shape = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])
torch.manual_seed(0)
config = tiny_qwen3_moe_config(num_hidden_layers=layers, **shape)
model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
model.save_pretrained(folder)
byte_tokenizer().save_pretrained(folder)
"""
RESULTS: dict[str, dict] = {}


@lru_cache(maxsize=None)
def setup() -> tuple:
    """(upstream, the checkpoint, the root folder): built once per session."""
    root = Path(os.environ.get("REAP_FAST_BENCH_DIR") or (Path("/tmp") / f"reap-fast-default-{os.getpid()}"))
    root.mkdir(parents=True, exist_ok=True)
    upstream = find_upstream(root)
    if isinstance(upstream, str):
        pytest.skip(upstream)
    write_datasets(root, rows=400)
    checkpoint = root / "qwen3-30b-a3b-shape"
    if not (checkpoint / "config.json").is_file():
        env = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([str(upstream.python), "-c", _BUILD, str(checkpoint), str(LAYERS), repr(SHAPE)],
                       check=True, env=env)
    return upstream, checkpoint, root


def _timed(command: list[str], env: dict, cwd: Path) -> dict:
    """Run under /usr/bin/time -v; wall seconds and peak RSS (GiB)."""
    began = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    assert done.returncode == 0, done.stderr[-4000:]
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    times = [re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr) for kind in ("User", "System")]
    cpu = sum(float(found.group(1)) for found in times)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gib": peak_kib / 2**20}


def _run(name: str) -> dict:
    upstream, checkpoint, root = setup()
    cwd = root / f"run-{name}"  # root/upstream holds upstream's exported source
    if cwd.exists():
        subprocess.run(["rm", "-rf", str(cwd)], check=True)
    cwd.mkdir()
    os.symlink(root / CHAT_DATASET.split("/")[0], cwd / CHAT_DATASET.split("/")[0])
    argv = ["--model_name", str(checkpoint), *ARGV]
    if name == "upstream":
        command, env = _upstream_command(upstream, cwd, argv, "reap.prune")
    else:
        command, env = _dropin_command(cwd, argv, layerwise=False)
    result = _timed(command, env, cwd)
    observation = cwd / "artifacts" / checkpoint.name / CHAT_DATASET.split("/")[-1] / "all" / "obs.pt"
    assert observation.is_file()
    RESULTS[name] = result
    return result


def _info(benchmark, result: dict) -> None:
    from conftest import environment_info

    benchmark.extra_info.update(result, layers=LAYERS, tokens="4 x 256", dtype="bfloat16",
                                shape="Qwen3-30B-A3B", device=environment_info()["device"])


def test_upstream_default_command(benchmark):
    result = benchmark.pedantic(_run, args=("upstream",), rounds=1, iterations=1)
    _info(benchmark, result)


def test_dropin_default_command(benchmark):
    result = benchmark.pedantic(_run, args=("dropin",), rounds=1, iterations=1)
    _info(benchmark, result)
    upstream = RESULTS.get("upstream")
    if upstream is not None:
        benchmark.extra_info["speedup_vs_upstream"] = upstream["seconds"] / result["seconds"]
        benchmark.extra_info["cpu_time_ratio_vs_upstream"] = upstream["cpu_seconds"] / result["cpu_seconds"]
        benchmark.extra_info["peak_rss_ratio_vs_upstream"] = result["peak_rss_gib"] / upstream["peak_rss_gib"]
        print(f"\nupstream {upstream['seconds']:.1f} s, {upstream['peak_rss_gib']:.2f} GiB; drop-in "
              f"{result['seconds']:.1f} s, {result['peak_rss_gib']:.2f} GiB; "
              f"{upstream['seconds'] / result['seconds']:.1f}x faster in wall time, "
              f"{upstream['cpu_seconds'] / result['cpu_seconds']:.1f}x less CPU time")
