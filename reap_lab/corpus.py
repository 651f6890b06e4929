"""Offline text the project can always get: the Python standard library's own docs and source.

Used as calibration text by the demo and as training/evaluation text by the quality study, so that
nothing has to be downloaded. The selection is deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

from reap_fast.fileio import atomic_write

STDLIB_MODULES = (
    "argparse", "bisect", "calendar", "collections", "csv", "dataclasses", "difflib", "enum", "fractions",
    "functools", "heapq", "itertools", "json", "pathlib", "pprint", "re", "shlex", "statistics", "string",
    "textwrap", "typing", "urllib.parse", "zipfile", "tarfile", "logging", "datetime", "decimal", "random",
)


def stdlib_doc_documents(min_chars: int = 80) -> list[str]:
    """Docstrings of stdlib modules and their public members, one document each."""
    documents = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        objects = [module] + [getattr(module, name) for name in sorted(vars(module)) if not name.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj) else None
            if doc and len(doc) >= min_chars and doc not in documents:
                documents.append(doc)
    return documents


def stdlib_code_documents(min_chars: int = 200) -> list[str]:
    """Top-level function and class sources of the same modules, one document each."""
    documents = []
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", None) != module.__name__:
                continue
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            if len(source) >= min_chars:
                documents.append(source)
    return documents


def write_jsonl(texts: list[str], path: str | os.PathLike) -> Path:
    """Write ``{"text": ...}`` lines (atomically: a reader never sees a half-written file)."""
    data = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))
