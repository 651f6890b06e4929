"""Held-out perplexity of saved model folders, each scored in a child process.

Loading an auto-round W4A16 checkpoint patches transformers' MoE classes process-wide, so the pipeline
never scores a model in its own process: :func:`perplexity_in_child` runs this module's command line
and reads its JSON result; a failure comes back through :func:`reap_fast.children.call_child`. By hand::

    python -m reap_fast.evaluate.heldout --model DIR --texts-file docs.json [--texts-file code.json ...] \\
        [--seq-len 512] [--quantized] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..children import QUIET_RUNPY, call_child, child_main
from ..config.evaluate import EvalConfig
from ..outputs import work_prefix
from .scoring import EvalError, combine_results, perplexity

MODULE = "reap_fast.evaluate.heldout"


def perplexity_in_child(
    model_dir: str, texts_file: Path, config: EvalConfig, quantized: bool = False
) -> dict[str, Any]:
    """Perplexity of ``model_dir`` on the texts in ``texts_file`` (``config.max_length`` tokens per row),
    computed in a child process; :class:`EvalError` names the model when the child refuses."""
    result_file = texts_file.with_name(f"{work_prefix(texts_file, 'scratch')}{Path(model_dir).name}.json")
    command = [sys.executable, *QUIET_RUNPY, "-m", MODULE, "--model", model_dir, "--texts-file", str(texts_file),
               "--seq-len", str(config.max_length), "--batch-size", str(config.batch_size), "--json", str(result_file)]
    if quantized:
        command.append("--quantized")
    try:
        call_child(command, EvalError, f"evaluation of {model_dir}", capture_output=True)
        return json.loads(result_file.read_text())
    finally:
        result_file.unlink(missing_ok=True)


def load_texts(path: str) -> list[str]:
    """Texts of a JSON list, ``{"texts": [...]}``, or a .jsonl of ``{"text": ...}`` rows."""
    file = Path(path)
    if file.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = json.loads(file.read_text(encoding="utf-8"))
    texts = data["texts"] if isinstance(data, dict) else data
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise EvalError(f"{path}: expected a JSON list of strings or {{'texts': [...]}}, or a .jsonl of {{'text': ...}}")
    return texts


def _score_files(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quantized:
        from ..quantize import load_quantized

        model, tokenizer = load_quantized(args.model, device="cpu")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    parts = {
        Path(name).stem: perplexity(model, tokenizer, load_texts(name), args.seq_len, args.batch_size)
        for name in args.texts_file
    }
    result = combine_results(parts)
    result["model"] = str(args.model)
    result["quantized"] = bool(args.quantized)
    result["first_param_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    """The child's command line (module docstring); returns its exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--texts-file", required=True, action="append",
                        help="JSON list of texts, {'texts': [...]}, or .jsonl; repeat it to pack sets separately and "
                        "combine them token-weighted (each file is one category, named by its stem)")
    parser.add_argument("--seq-len", type=int, default=EvalConfig.max_length)
    parser.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    parser.add_argument("--quantized", action="store_true", help="load with reap_fast.quantize.load_quantized")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the result here as well as to stdout")
    args = parser.parse_args(argv)
    return child_main(lambda: _score_files(args), f"python -m {MODULE}")


if __name__ == "__main__":
    sys.exit(main())
