"""Small file helpers shared by the stages: atomic (JSON) writes, texts files, checksums, sizes on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import UsageError
from .outputs import apply_umask, work_prefix


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=work_prefix(path, "tmp"), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(tmp)  # mkstemp creates 0600; the file gets what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def load_texts_file(path: str | os.PathLike) -> list[str]:
    """The texts of a JSON file holding a list of strings or ``{"texts": [...]}``; :class:`UsageError` otherwise."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"texts file not found: {file}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"texts file is not valid JSON: {file}: {error}") from None
    texts = data.get("texts") if isinstance(data, dict) else data
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise UsageError(f'texts file must hold a JSON list of strings or {{"texts": [...]}}: {file}')
    return texts


def publish_folder(staging: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Rename a finished ``staging`` folder to ``output_dir``; an existing one is replaced only at the end.

    Until the final rename the old folder (or nothing) stands at ``output_dir``, so an interrupted
    stage never leaves a half-written folder under the final name.
    """
    staging, output_dir = Path(staging), Path(output_dir)
    apply_umask(staging, recursive=True)  # mkdtemp creates 0700
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return output_dir
    trash = Path(tempfile.mkdtemp(prefix=work_prefix(output_dir, "old"), dir=output_dir.parent))
    os.replace(output_dir, trash / output_dir.name)
    try:
        os.replace(staging, output_dir)
    except BaseException:
        os.replace(trash / output_dir.name, output_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    return output_dir


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tree_checksums(root: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` (a file or a folder), keyed by relative path."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256_file(root)}
    return {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def size_on_disk(root: str | os.PathLike) -> int:
    """Total bytes of the files under ``root`` (0 when it does not exist)."""
    root = Path(root)
    if root.is_file():
        return root.stat().st_size
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) if root.is_dir() else 0


def human_size(num_bytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")
