"""The end-to-end demo on the built-in tiny Qwen3-MoE, runnable on a 2-core CPU without downloads.

1. train the tiny MoE (4 layers x 16 experts, top-2, sizes divisible by 128) for 300 steps on the Python
   standard library's docs and code (train split);
2. ``reap-fast run``: observe on the calibration split -> prune 50% by REAP -> AutoRound W4A16 ->
   held-out perplexity of the original, pruned and quantized models; the picture of what was pruned is
   written beside the pruned model (``run/pruned.png``);
3. reload the W4A16 model (in a child process: auto-round's loader patches transformers classes)
   and generate a continuation of a prompt.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

from reap_fast.children import call_child, write_request
from reap_fast.errors import ReapFastError
from .corpus import write_jsonl

logger = logging.getLogger(__name__)

PROMPT = "def read_json(path):\n    \"\"\"Return the "

GENERATE = """
import json, sys
import torch
from reap_fast.children import child_main, read_request
from reap_fast.quantize import load_quantized

request = read_request(None, "reap-fast demo (generation)", "Greedy continuation by a W4A16 folder.")

def generate():
    model, tokenizer = load_quantized(request["model_dir"])
    ids = tokenizer(request["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, repetition_penalty=1.2)
    print(json.dumps(tokenizer.decode(out[0, ids.shape[1]:])))

sys.exit(child_main(generate, "reap-fast demo (generation)"))
"""


def prepare_demo_inputs(folder: Path, steps: int) -> tuple[Path, str, str]:
    """The briefly trained checkpoint, and calibration / held-out specs over disjoint documents."""
    from .train import TrainConfig, split_documents, stdlib_corpus, train_tiny_moe

    splits = split_documents(stdlib_corpus(), seed=0)
    model_dir = folder / "tiny-qwen3-moe"
    if not (model_dir / "train_info.json").is_file():
        train_tiny_moe(model_dir, TrainConfig(steps=steps, seed=0, threads=1, eval_max_rows=8), splits=splits)
    calibration = ",".join(
        f"{write_jsonl(docs, folder / 'data' / f'calibration_{category}.jsonl')}:8"
        for category, docs in sorted(splits["calibration"].items())
    )
    heldout = ",".join(
        f"{write_jsonl(docs, folder / 'data' / f'heldout_{category}.jsonl')}:6"
        for category, docs in sorted(splits["eval"].items())
    )
    return model_dir, calibration, heldout


def generate_with_quantized(model_dir: Path, prompt: str = PROMPT) -> str:
    """Greedy continuation of ``prompt`` by a W4A16 folder, computed in a child process."""
    with tempfile.TemporaryDirectory(prefix="reap-fast-demo-") as scratch:
        request_file = write_request(scratch, {"model_dir": str(model_dir), "prompt": prompt})
        completed = call_child([sys.executable, "-c", GENERATE, str(request_file)], ReapFastError,
                               f"reloading {model_dir}", capture_output=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_demo(folder: Path, steps: int = 300) -> dict:
    """Train, observe, prune, quantize, evaluate, reload and generate; print what happened."""
    from reap_fast.metrics import format_expert_table, load_metrics
    from reap_fast.config import EvalConfig, ObserveConfig, PruneConfig, QuantConfig
    from reap_fast.pipeline import Pipeline, PipelineConfig, format_summary

    folder.mkdir(parents=True, exist_ok=True)
    model_dir, calibration, heldout = prepare_demo_inputs(folder, steps)
    config = PipelineConfig(
        str(model_dir), calibration, str(folder / "run"),
        observe=ObserveConfig(model_max_length=512, batch_size=4, device="cpu", dtype="float32"),
        prune=PruneConfig(compression_ratio=0.5, device="cpu", dtype="float32"),
        quantize=QuantConfig(iters=20, nsamples=16, seqlen=256, batch_size=4, device="cpu"),
        evaluate=EvalConfig(dataset=heldout, samples=12, max_length=256),
    )
    pipeline = Pipeline(config)
    summary = pipeline.run()
    print("\nREAP scores of the observed model (top and bottom experts per layer):")
    print(format_expert_table(load_metrics(pipeline.observation)))
    print("\n" + format_summary(summary))
    continuation = generate_with_quantized(pipeline.quantized)
    print(f"\nW4A16 model, prompt {PROMPT!r} ->\n{PROMPT}{continuation}")
    return summary
