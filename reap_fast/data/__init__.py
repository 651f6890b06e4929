"""Calibration data for REAP: dataset specs, document loading and packing into sequences.

A *spec* names one or more categories in the Cerebras REAP composite syntax::

    name[subset](split):N,name2:M

``[subset]``, ``(split)`` and ``:N`` are optional. ``name`` is a Hugging Face hub dataset
(``datasets.load_dataset(name, subset, split=split)``, needs network) or a local file or folder:

* ``.jsonl`` / ``.json`` (also ``.gz``-compressed), ``.parquet``, ``.csv``: one document per row;
* ``.txt`` file: one document per non-empty line;
* a folder of data files (all of one format, searched recursively, hidden files skipped): every file
  is loaded with the matching ``datasets`` builder; in a folder of ``.txt`` files each *file* is one
  document. ``[subset]`` selects a sub-folder; ``(split)`` selects a ``split/`` sub-folder or the
  files whose name starts with the split name (``test.jsonl``, ``test-00001.parquet``); the default
  split ``train`` takes every file when no such names exist;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Modules, one job each:

* :mod:`.spec` parses specs; :mod:`.sources` reads a category's rows;
* :mod:`.documents` turns rows into text (:mod:`.processors`: the dataset names upstream REAP knows,
  rendered exactly as upstream renders them);
* :mod:`.packing` draws documents with upstream's sampler and packs them as upstream does
  (:class:`PackingOptions` names the reap-fast alternatives);
* :mod:`.calibration_set` holds the sequences observers consume.
"""

from .calibration_set import CalibrationBatch, CalibrationSet
from .packing import (
    DEFAULT_MODEL_MAX_LENGTH,
    DEFAULT_SAMPLES_PER_CATEGORY,
    DEFAULT_SEED,
    PackingOptions,
    build_calibration_set,
    calibration_texts,
    check_dataset_spec,
    load_documents,
)
from .processors import UPSTREAM_PROCESSORS
from .spec import DEFAULT_SPLIT, CalibrationDataError, CategorySpec, parse_dataset_spec

__all__ = [
    "DEFAULT_MODEL_MAX_LENGTH",
    "DEFAULT_SAMPLES_PER_CATEGORY",
    "DEFAULT_SEED",
    "DEFAULT_SPLIT",
    "UPSTREAM_PROCESSORS",
    "CalibrationBatch",
    "CalibrationDataError",
    "CalibrationSet",
    "CategorySpec",
    "PackingOptions",
    "build_calibration_set",
    "calibration_texts",
    "check_dataset_spec",
    "load_documents",
    "parse_dataset_spec",
]
