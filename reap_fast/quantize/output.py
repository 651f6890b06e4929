"""What a finished quantization output holds: the saved quantization_config and 16-bit routers checked,
and the completion marker (``reap_fast_quant.json``: settings, versions, sha256 of each weight file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..fileio import sha256_file
from .checks import QuantizationError

MARKER_FILE = "reap_fast_quant.json"
MARKER_FORMAT = 1
PACKING_FORMAT = "auto_round:auto_gptq"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def weight_files(folder: Path) -> list[Path]:
    """The weight files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _tensor_names(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    from safetensors import safe_open  # noqa: PLC0415

    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def verify_saved(folder: Path, *, bits: int, group_size: int, sym: bool, routers: Iterable[str]) -> dict:
    """Check the saved quantization_config and that routers stayed 16 bit; returns the config."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise QuantizationError(f"auto-round wrote no config.json into {folder}")
    qcfg = json.loads(config_path.read_text()).get("quantization_config")
    if not isinstance(qcfg, dict):
        raise QuantizationError("saved config.json has no quantization_config")
    expected = {"bits": bits, "group_size": group_size, "sym": sym, "packing_format": PACKING_FORMAT}
    wrong = {k: qcfg.get(k) for k, v in expected.items() if qcfg.get(k) != v}
    if wrong:
        raise QuantizationError(f"saved quantization_config differs from the request: {wrong} (wanted {expected})")
    names = _tensor_names(folder)
    quantized_routers = [r for r in routers if f"{r}.qweight" in names or f"{r}.weight" not in names]
    if quantized_routers:
        raise QuantizationError(f"routers were quantized or are missing: {quantized_routers[:4]}")
    return qcfg


def read_marker(output_dir: str | os.PathLike) -> dict | None:
    path = Path(output_dir) / MARKER_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_complete_output(output_dir: str | os.PathLike, *, check_hashes: bool = True) -> bool:
    """True when ``output_dir`` is a finished quantization output (marker present, hashes match)."""
    folder = Path(output_dir)
    marker = read_marker(folder)
    if not marker or not marker.get("complete"):
        return False
    files = marker.get("weight_files", {})
    if not files:
        return False
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            return False
        if check_hashes and sha256_file(path) != digest:
            return False
    return True

