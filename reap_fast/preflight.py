"""Checks that run before any long work: the model folder (config, readable weights, tokenizer) and
the output location (writable, with room for what the stage writes). Each failure is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from .errors import ReapFastError
from .outputs import OutputLocationError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Any of these makes AutoTokenizer load the checkpoint's own tokenizer instead of inventing one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tiktoken.model")
# Room kept free on top of a stage's estimate (file systems misbehave when full).
SPACE_MARGIN_BYTES = 64 << 20
_MAX_HEADER_BYTES = 100 << 20


class ModelFolderError(ReapFastError, ValueError):
    """A model folder that is missing, incomplete or corrupt."""


def is_path_like(name: str) -> bool:
    """Whether a ``--model`` value names a local path rather than a hub repository.

    Absolute, ``./``, ``../`` and ``~`` paths, paths with more than one ``/`` or a trailing ``/``, and
    paths whose first component exists here are local: they are never looked up on the hub.
    """
    text = str(name)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.endswith("/"):
        return True
    if text.count("/") > 1 or os.sep != "/" and os.sep in text:
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).is_dir()


def check_safetensors(path: Path) -> None:
    """Read a safetensors file's header and check that the file is as long as the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError("header length exceeds the file")
            header = json.loads(handle.read(header_bytes))
    except PermissionError:
        raise ModelFolderError(f"weight file {path} is not readable (permission denied)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ModelFolderError(f"weight file {path} is corrupt ({exc}); download or save it again") from None
    end = max((int(info["data_offsets"][1]) for key, info in header.items() if key != "__metadata__"), default=0)
    if 8 + header_bytes + end > size:
        raise ModelFolderError(
            f"weight file {path} is truncated ({size} bytes, its header needs {8 + header_bytes + end}); "
            "download or save it again"
        )


def check_model_folder(model: str | os.PathLike, need_tokenizer: bool = True) -> Path | None:
    """Check a local model folder before loading it; returns it (None for a hub name, checked by the hub)."""
    text = str(model)
    if not is_path_like(text):
        return None
    folder = Path(text).expanduser()
    if not folder.exists():
        raise ModelFolderError(f"model folder not found: {text}")
    if not folder.is_dir():
        raise ModelFolderError(f"the model path {text} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{text} has no config.json: not a Hugging Face model folder")
    weights = weight_files(folder)
    if not weights:
        raise ModelFolderError(f"{text} holds no weight files (*.safetensors or *.bin)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            raise ModelFolderError(f"{index} is not a valid safetensors index") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise ModelFolderError(f"{text} lacks weight shards named in its index: {', '.join(missing[:3])}")
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif not os.access(path, os.R_OK):
            raise ModelFolderError(f"weight file {path} is not readable (permission denied)")
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{text} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the tokenizer of the "
            "original model into it (reap-fast never makes one up)"
        )
    return folder


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder."""
    folder = Path(folder)
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES)


def weights_bytes(model: str | os.PathLike) -> int:
    """Bytes of a local model's weight files (0 for a hub name)."""
    folder = Path(str(model)).expanduser()
    return sum(path.stat().st_size for path in weight_files(folder)) if folder.is_dir() else 0


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def check_output_location(output: str | os.PathLike, needed_bytes: int) -> None:
    """The nearest existing folder of ``output`` is writable and has ``needed_bytes`` (+ a margin) free."""
    target = Path(output).expanduser().absolute()
    base = _existing_ancestor(target.parent)
    if not base.is_dir():
        raise OutputLocationError(f"cannot write {output}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputLocationError(f"cannot write {output}: {base} is not writable (read-only or permission denied)")
    free = shutil.disk_usage(base).free
    needed = int(needed_bytes) + SPACE_MARGIN_BYTES
    if free < needed:
        raise OutputLocationError(
            f"not enough free space for {output}: about {needed / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB "
            f"free on {base}"
        )
