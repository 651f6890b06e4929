"""Reloading a quantized output with transformers (needs auto-round installed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from .checks import QuantizationError, auto_round_version


def load_quantized(output_dir: str | os.PathLike, *, device: str = "cpu", dtype: Any = None):
    """Reload a quantized output with transformers; returns ``(model, tokenizer)``.

    Needs auto-round installed. On CPU transformers uses auto-round's torch backend
    (``auto_round:torch_zp``), which computes in float16, or in bfloat16 on processors with AMX /
    AVX512-BF16 (read ``model.dtype``). Loading converts the model through auto-round, which also
    patches transformers' MoE classes process-wide: call this in a separate
    process, or last, after everything that needs the original classes.
    """
    auto_round_version()
    folder = Path(output_dir)
    if not (folder / "config.json").exists():
        raise QuantizationError(f"not a quantized model folder (no config.json): {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    kwargs: dict[str, Any] = {"device_map": resolve_device(device)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer

