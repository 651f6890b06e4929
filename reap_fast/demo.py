"""The end-to-end demo on the built-in tiny Qwen3-MoE, runnable on a 2-core CPU without downloads."""

from __future__ import annotations

import logging
from pathlib import Path

from .corpus import stdlib_code_documents, stdlib_doc_documents, write_jsonl
from .tiny import make_tiny_checkpoint

logger = logging.getLogger(__name__)

# Sizes divisible by 128 so that the W4A16 stage (group size 128) can quantize every expert linear.
DEMO_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=2,
)


def prepare_demo_inputs(folder: Path) -> tuple[Path, str]:
    """The tiny checkpoint and a two-category calibration spec under ``folder``."""
    model_dir = folder / "tiny-qwen3-moe"
    if not (model_dir / "config.json").is_file():
        make_tiny_checkpoint(model_dir, seed=0, **DEMO_CONFIG)
    docs = write_jsonl(stdlib_doc_documents(), folder / "calibration" / "stdlib_docs.jsonl")
    code = write_jsonl(stdlib_code_documents(), folder / "calibration" / "stdlib_code.jsonl")
    return model_dir, f"{docs}:4,{code}:4"


def run_demo(folder: Path) -> None:
    """Observe the tiny model on stdlib text and print the per-layer expert table."""
    from .cli import format_expert_table
    from .metrics import save_metrics
    from .observe import load_model, run_observation

    folder.mkdir(parents=True, exist_ok=True)
    model_dir, spec = prepare_demo_inputs(folder)
    model, tokenizer = load_model(str(model_dir), device="cpu", dtype="float32")
    metrics = run_observation(model, tokenizer, spec, samples_per_category=None, model_max_length=512, batch_size=2)
    path = save_metrics(metrics, folder / "observation.pt")
    print(format_expert_table(metrics))
    print(f"observation saved to {path}")
