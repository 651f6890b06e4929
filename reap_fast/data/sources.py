"""Reading the rows of one calibration category: local files and folders, saved datasets, the hub."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..preflight import is_path_like
from .spec import DEFAULT_SPLIT, CalibrationDataError, CategorySpec

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
# Upstream reads C4 from this one shard (``data._load_raw_dataset``), whatever split or subset is asked.
C4_NAME = "allenai/c4"
C4_SHARD_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz"



def reason_of(exc: BaseException) -> str:
    """A short one-line description of an exception, from the innermost cause."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _builder_for(path: Path) -> str | None:
    """The ``datasets`` builder that reads ``path`` (by suffix), or None for other files."""
    name = path.name.lower()
    for compression in _COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
            break
    builder = _BUILDERS.get(Path(name).suffix)
    return None if builder == "parquet" and name != path.name.lower() else builder


def looks_like_path(name: str) -> bool:
    """A local path (never looked up on the hub): path-like as for ``--model``, or a data file's suffix."""
    return name.startswith(".\\") or is_path_like(name) or _builder_for(Path(name)) is not None


def datasets_module():
    """The ``datasets`` package, imported only when a calibration source is read.

    Pre-tokenized batches (``CalibrationSet``) and everything else in reap-fast work without it.
    """
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationDataError(f"reading calibration data needs the 'datasets' package: {exc}") from None
    return datasets


def _run_builder(builder: str, files: list[Path], what: str, **config: Any) -> datasets.Dataset:
    datasets = datasets_module()
    try:
        return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split="train", **config)
    except Exception as exc:  # datasets raises many kinds; the user needs the path and the reason
        logger.debug("loading %s failed", what, exc_info=True)
        reason = reason_of(exc)
        if "corresponds to no data" in reason:  # datasets' way of saying that there are no rows
            raise CalibrationDataError(f"cannot use {what}: the dataset is empty") from None
        if builder == "json":
            reason = _first_bad_json_line(files) or reason  # datasets reports a byte offset, people want a line
        raise CalibrationDataError(f"cannot read {what}: {reason}") from None


def _first_bad_json_line(files: list[Path]) -> str | None:
    """``"<file> line N: <reason>"`` for the first line of a JSON-lines file that is not one JSON object."""
    import gzip

    for path in files:
        if path.suffix == ".json":
            continue  # a whole-file JSON document: the parser's message stands
        opener = gzip.open if path.suffix == ".gz" else open
        where = f"{path} " if len(files) > 1 else ""
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        return f"{where}line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
                    if not isinstance(row, dict):
                        return f"{where}line {number}: expected a JSON object, got {type(row).__name__}"
        except (OSError, UnicodeDecodeError) as exc:
            return f"{path}: {exc.__class__.__name__}: {exc}"
    return None


def _load_local_file(path: Path, category: CategorySpec) -> datasets.Dataset:
    label = category.label
    if category.subset is not None:
        raise CalibrationDataError(f"{label}: a local file has no subsets; drop [{category.subset}]")
    if category.split != DEFAULT_SPLIT:
        raise CalibrationDataError(f"{label}: a local file has only the '{DEFAULT_SPLIT}' split")
    if path.stat().st_size == 0:
        raise CalibrationDataError(f"{label}: the file '{path}' is empty")
    builder = _builder_for(path)
    if builder is None:
        known = ", ".join(sorted(_BUILDERS))
        raise CalibrationDataError(f"{label}: unsupported file type '{path.name}' (use {known} or a folder)")
    return _run_builder(builder, [path], f"'{path}'")


def _files_for_split(files: list[Path], root: Path, split: str) -> list[Path]:
    """Files of ``split`` in a folder: a ``split/`` sub-folder, files named ``split*``, else all (train)."""
    in_folder = [f for f in files if f.relative_to(root).parts[0] == split and len(f.relative_to(root).parts) > 1]
    if in_folder:
        return in_folder
    stems = {f: f.name.split(".")[0] for f in files}
    named = [f for f in files if stems[f] == split or stems[f].startswith((split + "-", split + "_"))]
    if named:
        return named
    if split == DEFAULT_SPLIT:
        return files
    return []


def _load_saved(path: Path, category: CategorySpec) -> datasets.Dataset:
    label = category.label
    datasets = datasets_module()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CalibrationDataError(f"cannot read saved dataset '{path}': {reason_of(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if category.split not in loaded:
            raise CalibrationDataError(f"{label}: no split '{category.split}'; splits are {sorted(loaded)}")
        return loaded[category.split]
    if category.split != DEFAULT_SPLIT:
        raise CalibrationDataError(f"{label}: the saved dataset has a single split; drop ({category.split})")
    return loaded


def _load_local_folder(path: Path, category: CategorySpec) -> datasets.Dataset:
    label = category.label
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        if category.subset is not None:
            raise CalibrationDataError(f"{label}: a saved dataset folder has no subsets")
        return _load_saved(path, category)
    root = path
    if category.subset is not None:
        root = path / category.subset
        if not root.is_dir():
            raise CalibrationDataError(f"{label}: no sub-folder '{category.subset}' in '{path}'")
    files = sorted(
        f
        for f in root.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts) and _builder_for(f)
    )
    if not files:
        known = ", ".join(sorted(_BUILDERS))
        raise CalibrationDataError(f"{label}: no data files ({known}) in folder '{root}'")
    files = _files_for_split(files, root, category.split)
    if not files:
        raise CalibrationDataError(
            f"{label}: no files for split '{category.split}' in '{root}' "
            f"(looked for a '{category.split}/' sub-folder or files named '{category.split}*')"
        )
    builders = sorted({_builder_for(f) for f in files})
    if len(builders) > 1:
        raise CalibrationDataError(f"{label}: folder '{root}' mixes file formats ({', '.join(builders)}); use one")
    config = {"sample_by": "document"} if builders[0] == "text" else {}
    return _run_builder(builders[0], files, f"folder '{root}'", **config)


def _load_hub(category: CategorySpec) -> datasets.Dataset:
    datasets = datasets_module()
    try:
        if category.name == C4_NAME:
            loaded = datasets.load_dataset("json", data_files={"train": C4_SHARD_URL}, split="train")
        else:
            loaded = datasets.load_dataset(category.name, category.subset, split=category.split)
    except Exception as exc:
        logger.debug("loading %s failed", category.name, exc_info=True)
        raise CalibrationDataError(
            f"cannot load dataset '{category.name}' (subset={category.subset}, split={category.split}): "
            f"not a local file or folder, and the Hugging Face hub said {reason_of(exc)}"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise CalibrationDataError(f"{category.label}: expected a map-style dataset, got {type(loaded).__name__}")
    return loaded


def load_raw(category: CategorySpec) -> datasets.Dataset:
    """The rows of one category (local path first, then the hub)."""
    path = Path(os.path.expanduser(category.name))
    if path.is_dir():
        return _load_local_folder(path, category)
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise CalibrationDataError(f"cannot read '{path}': permission denied")
        return _load_local_file(path, category)
    if looks_like_path(category.name):
        raise CalibrationDataError(f"{category.label}: no such file or folder '{path}'")
    return _load_hub(category)


