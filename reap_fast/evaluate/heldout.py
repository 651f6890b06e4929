"""Held-out perplexity of saved model folders, each scored in a child process.

Loading an auto-round W4A16 checkpoint patches transformers' MoE classes process-wide, so the pipeline
never scores a model in its own process: :func:`perplexity_in_child` writes a request file
(:func:`reap_fast.children.write_request`), runs ``python -m reap_fast.evaluate.heldout REQUEST.json``
and reads the JSON result the child writes; a failure comes back through
:func:`reap_fast.children.call_child`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..children import call_child, child_argv, child_main, read_request, write_request
from ..config.evaluate import EvalConfig
from ..fileio import atomic_write_json, load_texts_file
from ..outputs import work_prefix
from .scoring import EvalError, combine_results, perplexity

MODULE = "reap_fast.evaluate.heldout"


def perplexity_in_child(
    model_dir: str, texts_file: Path, config: EvalConfig, quantized: bool = False
) -> dict[str, Any]:
    """Perplexity of ``model_dir`` on the texts in ``texts_file`` (``config.max_length`` tokens per row),
    computed in a child process; :class:`EvalError` names the model when the child refuses."""
    with tempfile.TemporaryDirectory(prefix=work_prefix(texts_file, "scratch"), dir=texts_file.parent) as scratch:
        result_file = Path(scratch) / "result.json"
        request = {"model_dir": str(model_dir), "texts_files": [str(texts_file)], "seq_len": config.max_length,
                   "batch_size": config.batch_size, "quantized": quantized, "result_file": str(result_file)}
        call_child(child_argv(MODULE, write_request(scratch, request)), EvalError, f"evaluation of {model_dir}",
                   capture_output=True)
        return json.loads(result_file.read_text())


def _score_files(request: dict[str, Any]) -> None:
    model_dir = request["model_dir"]
    if request["quantized"]:
        from ..quantize import load_quantized

        model, tokenizer = load_quantized(model_dir, device="cpu")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parts = {
        Path(name).stem: perplexity(model, tokenizer, load_texts_file(name), request["seq_len"], request["batch_size"])
        for name in request["texts_files"]
    }
    result = combine_results(parts)
    result["model"] = str(model_dir)
    result["quantized"] = bool(request["quantized"])
    result["first_param_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    atomic_write_json(result, request["result_file"])


def main(argv: list[str] | None = None) -> int:
    """The child's command line (module docstring); returns its exit code."""
    request = read_request(argv, f"python -m {MODULE}", __doc__.split("\n\n")[0])
    return child_main(lambda: _score_files(request), f"python -m {MODULE}")


if __name__ == "__main__":
    sys.exit(main())
