"""The README's Python API block runs as written, on the built-in tiny model instead of Qwen3-30B-A3B.

Only what a CPU test cannot take is substituted (the model path, CUDA, the Triton engine, bf16, the
top-k of the real model, AutoRound's 200 iterations); every name, argument and call is the README's own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from reap_lab.tiny import make_tiny_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


def test_the_python_api_block_runs(tmp_path, monkeypatch):
    model_dir = make_tiny_checkpoint(tmp_path / "model")
    words = "the quick brown fox jumps over the lazy dog while seven experts route tokens".split()
    rows = [{"text": " ".join(words[i % 5:] + words[: i % 5]) * 12} for i in range(48)]  # ~14 x 2048 tokens
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:20]), encoding="utf-8")
    block = python_api_block()
    substitutions = {
        '"/models/Qwen3-30B-A3B"': repr(str(model_dir)),
        '"data.jsonl:64"': '"data.jsonl:4"',
        'device="cuda"': 'device="cpu"',
        'engine="triton"': 'engine="reference"',
        '"bfloat16"': '"float32"',
        "model_max_length=2048": "model_max_length=64",
        "top_k=8": "top_k=2",
        "quantize=QuantConfig(iters=200)": "quantize=None",
    }
    for written, runnable in substitutions.items():
        assert written in block, f"the README block no longer contains {written}"
        block = block.replace(written, runnable)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    keep = namespace["keep"]
    assert sorted(keep) == [0, 1] and all(len(kept) == 4 for kept in keep.values())  # tiny: 2 layers, 8 -> 4
    assert (tmp_path / "obs.pt").is_file() and (tmp_path / "pruned" / "config.json").is_file()
    summary = json.loads((tmp_path / "runs" / "qwen3-reap50" / "pipeline.json").read_text(encoding="utf-8"))
    assert {"observe", "prune", "eval"} <= set(summary["stages"])
