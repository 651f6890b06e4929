"""Load + save cost of pruning a checkpoint (README "What a pruned folder contains").

    python bench/prune_io.py make DIR [--layers 2 --experts 64 --hidden 2048 --moe-intermediate 768]
    python bench/prune_io.py prune DIR OUT      # prints one JSON line: load_s, slice_s, save_s, sizes, dtypes
    python bench/prune_io.py checkpoint DIR OUT # prune_checkpoint end to end (synthetic observation): total_s

``make`` writes a random bf16 Qwen3-MoE (sharded safetensors). ``prune`` loads it with
``reap_fast.observe.load_model`` (dtype auto), keeps the first half of the experts of every layer, and
saves with ``reap_fast.prune.save_pruned``, timing each step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reap_lab/ lives at the repository root, not installed


def make(folder: Path, layers: int, experts: int, hidden: int, moe_intermediate: int) -> None:
    from reap_lab.tiny import build_model, byte_tokenizer, tiny_qwen3_moe_config

    config = tiny_qwen3_moe_config(
        num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=8, hidden_size=hidden,
        moe_intermediate_size=moe_intermediate, intermediate_size=4 * moe_intermediate, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, vocab_size=32768,
    )
    model = build_model(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="400MB")
    byte_tokenizer().save_pretrained(folder)


def prune(folder: Path, output: Path) -> dict:
    from reap_fast.fileio import size_on_disk
    from reap_fast.observe import load_model
    from reap_fast.prune import expert_counts, prune_model, save_pruned

    shutil.rmtree(output, ignore_errors=True)
    began = time.perf_counter()
    model, tokenizer = load_model(str(folder), device="cpu")
    loaded = time.perf_counter()
    keep = {layer: torch.arange(count // 2) for layer, count in expert_counts(model).items()}
    prune_model(model, keep)
    sliced = time.perf_counter()
    save_pruned(model, tokenizer, output, keep, {"source_model": str(folder)})
    saved = time.perf_counter()
    return {
        "load_s": round(loaded - began, 2), "slice_s": round(sliced - loaded, 2), "save_s": round(saved - sliced, 2),
        "model_dtype": str(next(model.parameters()).dtype), "source_bytes": size_on_disk(folder),
        "output_bytes": size_on_disk(output),
    }


def prune_whole(folder: Path, output: Path) -> dict:
    """``prune_checkpoint`` from a synthetic observation file (random REAP scores), timed end to end."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from reap_fast.metrics import save_metrics
    from reap_fast.prune import PruneConfig, expert_counts, prune_checkpoint
    from reap_lab.tiny import random_observation

    shutil.rmtree(output, ignore_errors=True)
    with torch.device("meta"):
        counts = expert_counts(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)))
    metrics = random_observation(counts)
    metrics_path = output.with_name(output.name + "-obs.pt")
    save_metrics(metrics, metrics_path)
    began = time.perf_counter()
    prune_checkpoint(folder, metrics_path, output, PruneConfig(compression_ratio=0.5))
    return {"total_s": round(time.perf_counter() - began, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "prune", "checkpoint"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("output", type=Path, nargs="?")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=768)
    args = parser.parse_args()
    if args.command == "make":
        make(args.folder, args.layers, args.experts, args.hidden, args.moe_intermediate)
    elif args.command == "prune":
        print(json.dumps(prune(args.folder, args.output)))
    else:
        print(json.dumps(prune_whole(args.folder, args.output)))


if __name__ == "__main__":
    main()
