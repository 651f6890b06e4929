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

Each row becomes one document: a chat column (``messages``/``conversations``/``conversation``/
``chat``; OpenAI ``{role, content}`` or ShareGPT ``{from, value}`` turns) goes through the
tokenizer's chat template; ``instruction``/``output``-style pairs become a user/assistant chat as in
upstream's dataset processors; otherwise the first of ``text``, ``content``, ``document``, ``prompt``,
``body``, ``question``, ``instruction`` is used as plain text. ``column=`` picks a column explicitly.

Packing follows upstream ``BaseDatasetProcessor._process_batches_for_category_packed``: documents are
drawn in a seeded random order without replacement and written one after another into a sequence of
``model_max_length`` tokens with a one-token gap between documents; a document that does not fit is
cut at the end of the sequence and its tail is dropped; the next sequence starts with a fresh
document. When the documents run out the last sequence is kept and padded. Unlike upstream, the gap
holds the tokenizer's EOS token and is attended (the packed row is one causal sequence); gaps and
padding are excluded from the REAP statistics through ``stats_mask``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from .errors import ReapFastError
from .preflight import is_path_like

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "train"
DEFAULT_SAMPLES_PER_CATEGORY = 1024  # upstream ObserverArgs.batches_per_category
DEFAULT_MODEL_MAX_LENGTH = 2048  # upstream ObserverArgs.model_max_length
DEFAULT_SEED = 42  # upstream ReapArgs.seed

CHAT_COLUMNS = ("messages", "conversations", "conversation", "chat")
PAIR_COLUMNS = (("instruction", "output"), ("instruction", "response"), ("prompt", "completion"), ("prompt", "response"))
TEXT_COLUMNS = ("text", "content", "document", "prompt", "body", "question", "instruction")

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_ROWS_PER_READ = 256
_TEXTS_PER_TOKENIZE = 64


class CalibrationDataError(ReapFastError, ValueError):
    """Bad calibration input; the message is one line meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --- spec parsing ------------------------------------------------------------------------------


@dataclass
class CategorySpec:
    """One category of a spec: a dataset (hub name or local path), subset, split and sample count."""

    name: str
    subset: str | None = None
    split: str = DEFAULT_SPLIT
    num_samples: int | None = None
    column: str | None = None  # explicit text/chat column; None = detect

    @property
    def label(self) -> str:
        """The category's name as written in a spec (``(split)`` shown unless it is ``train``)."""
        label = self.name
        if self.subset is not None:
            label += f"[{self.subset}]"
        if self.split != DEFAULT_SPLIT:
            label += f"({self.split})"
        return label


_FORBIDDEN = r"\[\]():,"
_PART_RE = re.compile(
    rf"^(?P<name>[^{_FORBIDDEN}]+)"
    rf"(?:\[(?P<subset>[^{_FORBIDDEN}]*)\])?"
    rf"(?:\((?P<split>[^{_FORBIDDEN}]*)\))?"
    r"(?::(?P<count>[^:,]*))?$"
)
_SPEC_FORMAT = "name[subset](split):N with [subset], (split) and :N optional"


def parse_dataset_spec(spec: str, default_split: str = DEFAULT_SPLIT) -> list[CategorySpec]:
    """Parse ``"name[subset](split):N,name2:M"`` into categories (upstream ``parse_composite_dataset_spec``).

    Names may contain ``/``, ``.``, ``-``, ``_`` and spaces but none of ``[]():,``; ``:`` is only the
    count separator. A missing ``:N`` gives ``num_samples=None`` (the caller's default applies).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CalibrationDataError("empty dataset spec; expected " + _SPEC_FORMAT)
    return [_parse_part(part.strip(), index, spec, default_split) for index, part in enumerate(spec.split(","))]


def _parse_part(part: str, index: int, spec: str, default_split: str) -> CategorySpec:
    where = f"dataset spec entry {index + 1} '{part}' (in '{spec}')"
    if not part:
        raise CalibrationDataError(f"dataset spec entry {index + 1} is empty (stray comma?) in '{spec}'")
    match = _PART_RE.match(part)
    if match is None:
        if part.count(":") > 1:
            raise CalibrationDataError(f"malformed {where}: ':' may appear only once, before the sample count")
        raise CalibrationDataError(f"malformed {where}: expected {_SPEC_FORMAT}")
    name = match["name"].strip()
    subset, split, count = match["subset"], match["split"], match["count"]
    if not name:
        raise CalibrationDataError(f"malformed {where}: the dataset name is empty")
    if subset is not None and not subset.strip():
        raise CalibrationDataError(f"malformed {where}: empty [subset]")
    if split is not None and not split.strip():
        raise CalibrationDataError(f"malformed {where}: empty (split)")
    num_samples = None
    if count is not None:
        if re.fullmatch(r"[0-9]+", count.strip()) is None:
            reason = f"sample count '{count}' is not a positive integer (':' only separates the sample count)"
            raise CalibrationDataError(f"malformed {where}: {reason}")
        num_samples = int(count)
        if num_samples <= 0:
            raise CalibrationDataError(f"malformed {where}: sample count must be > 0")
    return CategorySpec(
        name=name,
        subset=subset.strip() if subset is not None else None,
        split=split.strip() if split is not None else default_split,
        num_samples=num_samples,
    )


# --- loading raw datasets ----------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
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


def _looks_like_path(name: str) -> bool:
    """A local path (never looked up on the hub): path-like as for ``--model``, or a data file's suffix."""
    return name.startswith(".\\") or is_path_like(name) or _builder_for(Path(name)) is not None


def _datasets():
    """The ``datasets`` package, imported only when a calibration source is read.

    Pre-tokenized batches (``CalibrationSet``) and everything else in reap-fast work without it.
    """
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationDataError(f"reading calibration data needs the 'datasets' package: {exc}") from None
    return datasets


def _run_builder(builder: str, files: list[Path], what: str, **config: Any) -> datasets.Dataset:
    datasets = _datasets()
    try:
        return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split="train", **config)
    except Exception as exc:  # datasets raises many kinds; the user needs the path and the reason
        logger.debug("loading %s failed", what, exc_info=True)
        reason = _reason(exc)
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
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CalibrationDataError(f"cannot read saved dataset '{path}': {_reason(exc)}") from None
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
    datasets = _datasets()
    try:
        loaded = datasets.load_dataset(category.name, category.subset, split=category.split)
    except Exception as exc:
        logger.debug("loading %s failed", category.name, exc_info=True)
        raise CalibrationDataError(
            f"cannot load dataset '{category.name}' (subset={category.subset}, split={category.split}): "
            f"not a local file or folder, and the Hugging Face hub said {_reason(exc)}"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise CalibrationDataError(f"{category.label}: expected a map-style dataset, got {type(loaded).__name__}")
    return loaded


def _load_raw(category: CategorySpec) -> datasets.Dataset:
    """The rows of one category (local path first, then the hub)."""
    path = Path(os.path.expanduser(category.name))
    if path.is_dir():
        return _load_local_folder(path, category)
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise CalibrationDataError(f"cannot read '{path}': permission denied")
        return _load_local_file(path, category)
    if _looks_like_path(category.name):
        raise CalibrationDataError(f"{category.label}: no such file or folder '{path}'")
    return _load_hub(category)


# --- rows to documents ---------------------------------------------------------------------------


def _is_string(feature: Any) -> bool:
    return isinstance(feature, _datasets().Value) and feature.dtype in ("string", "large_string")


def _resolve_columns(ds: datasets.Dataset, category: CategorySpec) -> tuple[str, tuple[str, ...]]:
    """How rows become documents: ``("chat"|"pair"|"text", columns)``."""
    columns = ds.column_names
    if category.column is not None:
        if category.column not in columns:
            raise CalibrationDataError(f"{category.label}: no column '{category.column}'; columns are {columns}")
        feature = ds.features[category.column]
        if _is_string(feature) and category.column not in CHAT_COLUMNS:
            return "text", (category.column,)
        return "chat", (category.column,)
    for name in CHAT_COLUMNS:
        if name in columns:
            return "chat", (name,)
    for pair in PAIR_COLUMNS:
        if all(name in columns and _is_string(ds.features[name]) for name in pair):
            return "pair", pair
    for name in TEXT_COLUMNS:
        if name in columns and _is_string(ds.features[name]):
            return "text", (name,)
    raise CalibrationDataError(
        f"{category.label}: no text or chat column found; columns are {columns} (name the text column one of "
        f"{', '.join(TEXT_COLUMNS[:4])}, ... or the chat column one of {', '.join(CHAT_COLUMNS)})"
    )


def _content_text(content: Any) -> str:
    """Message content as text (multi-part content joined, as upstream ``_normalize_message_content``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, dict):
                text = item.get("text") if item.get("type", "text") == "text" else None
                parts.append(text if isinstance(text, str) else json.dumps(item, sort_keys=True, default=str))
            elif item is not None:
                parts.append(str(item))
        return "\n".join(p for p in parts if p)
    return str(content)


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _normalize_messages(value: Any, label: str) -> list[dict[str, Any]]:
    """Turns as ``{role, content, ...}`` dicts (ShareGPT ``from``/``value`` mapped, nulls dropped)."""
    value = _maybe_json(value)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise CalibrationDataError(f"{label}: a chat row is not a list of {{role, content}} messages")
    messages = []
    for turn in value:
        role = turn.get("role", turn.get("from"))
        message = {k: v for k, v in turn.items() if v is not None and k not in ("from", "value")}
        message["role"] = _ROLE_ALIASES.get(str(role).lower(), str(role))
        message["content"] = _content_text(turn.get("content", turn.get("value")))
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_normalize_tool_call(call) for call in message["tool_calls"]]
        messages.append(message)
    return messages


def _normalize_tool_call(call: Any) -> Any:
    """Tool-call arguments as objects (templates expect dicts, datasets often store JSON strings)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        function = dict(call["function"])
        function["arguments"] = _maybe_json(function.get("arguments"))
        return {**call, "function": function}
    return call


def _chat_text(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, label: str) -> str:
    kwargs = {}
    tools = _maybe_json(tools)
    if isinstance(tools, list) and tools:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kwargs)
    except Exception as exc:
        raise CalibrationDataError(f"{label}: the chat template failed on a row: {_reason(exc)}") from None


def _row_text(row: dict[str, Any], kind: str, columns: tuple[str, ...], tokenizer: Any, label: str) -> str:
    if kind == "text":
        value = row[columns[0]]
        return value if isinstance(value, str) else ("" if value is None else str(value))
    if kind == "pair":
        prompt, answer = (row[c] or "" for c in columns)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    else:
        messages = _normalize_messages(row[columns[0]], label)
    if not messages:
        return ""
    return _chat_text(tokenizer, messages, row.get("tools"), label)


def _iter_documents(category: CategorySpec, tokenizer: Any, seed: int) -> Iterator[str]:
    """Non-empty documents of a category in a seeded random order (rows read lazily)."""
    ds = _load_raw(category)
    label = category.label
    if len(ds) == 0:
        raise CalibrationDataError(f"{label}: the dataset is empty")
    kind, columns = _resolve_columns(ds, category)
    if kind != "text" and not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(
            f"{label}: column '{columns[0]}' holds chats but the tokenizer has no chat template"
        )
    keep = list(columns) + (["tools"] if kind == "chat" and "tools" in ds.column_names else [])
    ds = ds.select_columns(list(dict.fromkeys(keep)))
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    produced = 0
    for start in range(0, len(order), _ROWS_PER_READ):
        chunk = ds[order[start : start + _ROWS_PER_READ]]
        for i in range(len(chunk[keep[0]])):
            text = _row_text({name: chunk[name][i] for name in chunk}, kind, columns, tokenizer, label)
            if text.strip():
                produced += 1
                yield text
    if produced == 0:
        raise CalibrationDataError(f"{label}: the dataset has no non-empty documents")


def load_documents(category: CategorySpec, tokenizer: Any, seed: int = DEFAULT_SEED) -> list[str]:
    """All non-empty documents of a category (chats rendered by the chat template), shuffled by ``seed``.

    The order is the order in which ``build_calibration_set`` consumes documents.
    """
    return list(_iter_documents(category, tokenizer, seed))


# --- tokenization and packing --------------------------------------------------------------------


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Tokens the tokenizer adds around a text by default (e.g. BOS), found on a probe."""
    probe = "calibration"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain) :]
    return [], []


def _token_stream(texts: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each text, with the tokenizer's default special tokens (BOS not doubled)."""
    prefix, suffix = _special_affixes(tokenizer)
    prefix_text = tokenizer.decode(prefix) if prefix else ""
    iterator = iter(texts)
    while chunk := list(islice(iterator, _TEXTS_PER_TOKENIZE)):
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for text, ids in zip(chunk, encoded):
            head = [] if prefix_text and text.startswith(prefix_text) else prefix
            ids = head + list(ids) + suffix
            if ids:
                yield ids


def _single_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _separator_id(tokenizer: Any) -> int:
    for attr in ("eos_token_id", "sep_token_id", "bos_token_id"):
        token = _single_id(getattr(tokenizer, attr, None))
        if token is not None:
            return token
    raise CalibrationDataError("the tokenizer has no EOS token to separate packed documents; use pack=False")


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        token = _single_id(getattr(tokenizer, attr, None))
        if token is not None:
            return token
    return 0


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _pack(docs: Iterator[list[int]], count: int, length: int, sep_id: int, pad_id: int) -> Rows:
    """Up to ``count`` packed rows of ``length`` tokens (upstream packing; see the module docstring)."""
    ids = torch.full((count, length), pad_id, dtype=torch.long)
    attention = torch.zeros((count, length), dtype=torch.long)
    stats = torch.zeros((count, length), dtype=torch.bool)
    doc = next(docs, None)
    rows = 0
    while doc is not None and rows < count:
        pos = 0
        while doc is not None and pos < length:
            if pos > 0:  # one separator between documents; attended, not counted
                ids[rows, pos], attention[rows, pos] = sep_id, 1
                pos += 1
                if pos == length:
                    break  # the document waits for the next row
            take = min(len(doc), length - pos)
            ids[rows, pos : pos + take] = torch.as_tensor(doc[:take], dtype=torch.long)
            attention[rows, pos : pos + take] = 1
            stats[rows, pos : pos + take] = True
            pos += take
            doc = next(docs, None)  # a cut document's tail is dropped, as upstream
        rows += 1
    return ids[:rows], attention[:rows], stats[:rows]


def _unpacked(docs: Iterator[list[int]], count: int, length: int, pad_id: int) -> Rows:
    """Up to ``count`` rows, one document each, cut to ``length`` and right-padded to the longest."""
    chosen = [doc[:length] for doc in islice(docs, count)]
    width = max((len(doc) for doc in chosen), default=0)
    ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, doc in enumerate(chosen):
        ids[row, : len(doc)] = torch.as_tensor(doc, dtype=torch.long)
        attention[row, : len(doc)] = 1
    return ids, attention, attention.bool()


# --- the calibration set --------------------------------------------------------------------------


@dataclass
class CalibrationBatch:
    """One batch for the observer."""

    input_ids: torch.LongTensor  # (B, L)
    attention_mask: torch.LongTensor  # (B, L) 1 = real token (attended), 0 = padding
    stats_mask: torch.BoolTensor  # (B, L) True = counted in the REAP statistics


@dataclass
class CalibrationSet:
    """Calibration sequences (N, L) with their masks and the category of each sequence."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    stats_mask: torch.BoolTensor
    categories: list[str]

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.stats_mask)}
        if len(shapes) != 1 or self.input_ids.dim() != 2 or len(self.categories) != self.input_ids.shape[0]:
            raise ValueError(f"inconsistent calibration set: shapes {shapes}, {len(self.categories)} categories")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (L)."""
        return self.input_ids.shape[1]

    def num_stat_tokens(self) -> int:
        """Number of tokens counted in the statistics (no separators, no padding)."""
        return int(self.stats_mask.sum())

    def batches(self, batch_size: int, start: int = 0) -> Iterator[CalibrationBatch]:
        """Batches of ``batch_size`` sequences in order, from sequence ``start`` (to resume); last may be short."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise CalibrationDataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(start, int) or not 0 <= start <= len(self):
            raise CalibrationDataError(f"start must be in [0, {len(self)}], got {start!r}")
        for begin in range(start, len(self), batch_size):
            end = begin + batch_size
            yield CalibrationBatch(self.input_ids[begin:end], self.attention_mask[begin:end], self.stats_mask[begin:end])

    def shard(self, rank: int, world_size: int) -> CalibrationSet:
        """Sequences ``rank, rank + world_size, ...`` (data-parallel split; shards may differ by one)."""
        if not isinstance(world_size, int) or world_size <= 0:
            raise CalibrationDataError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise CalibrationDataError(f"rank must be in [0, {world_size - 1}], got {rank!r}")
        index = torch.arange(rank, len(self), world_size)
        return CalibrationSet(
            self.input_ids[index].clone(),
            self.attention_mask[index].clone(),
            self.stats_mask[index].clone(),
            [self.categories[i] for i in index.tolist()],
        )


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise CalibrationDataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _categories(spec: str, column: str | None) -> list[CategorySpec]:
    categories = parse_dataset_spec(spec)
    labels = [c.label for c in categories]
    for label in labels:
        if labels.count(label) > 1:
            raise CalibrationDataError(f"category '{label}' appears twice in the dataset spec")
    seen: dict[tuple[str, str | None, str], str] = {}
    for category in categories:
        path = Path(os.path.expanduser(category.name))
        if not path.exists():
            continue
        key = (str(path.resolve()), category.subset, category.split)  # ./a.jsonl and a.jsonl are one file
        if key in seen:
            raise CalibrationDataError(
                f"'{seen[key]}' and '{category.name}' are the same file in the dataset spec; give it once"
            )
        seen[key] = category.name
    for category in categories:
        if category.column is None:
            category.column = column
    return categories


def check_dataset_spec(spec: str) -> None:
    """Cheap check of a spec before long work: it parses, and its local files and folders exist."""
    for category in _categories(spec, None):
        path = Path(os.path.expanduser(category.name))
        if path.exists():
            if path.is_file() and not os.access(path, os.R_OK):
                raise CalibrationDataError(f"cannot read '{path}': permission denied")
        elif _looks_like_path(category.name):
            raise CalibrationDataError(f"{category.label}: no such file or folder '{path}'")


class _Counted:
    """An iterator wrapper that counts the items it has produced."""

    def __init__(self, items: Iterator[str]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.count += 1
            yield item


def build_calibration_set(
    spec: str,
    tokenizer: Any,
    samples_per_category: int | None = None,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    seed: int = DEFAULT_SEED,
    pack: bool = True,
    column: str | None = None,
) -> CalibrationSet:
    """Tokenize the spec's categories into calibration sequences.

    A *sample* is one sequence, as upstream's ``samples_per_category``/``batches_per_category`` with
    batch size 1: with ``pack=True`` a packed row of exactly ``model_max_length`` tokens, with
    ``pack=False`` one document (cut to ``model_max_length``; rows right-padded to the longest).
    Each category gets its spec's ``:N`` sequences, else ``samples_per_category``, else
    ``DEFAULT_SAMPLES_PER_CATEGORY`` (1024, upstream's default). Asking for more sequences than the
    documents can fill is an error that says how many there are. Sequences come category by category,
    in spec order; each category's documents are shuffled with ``seed`` independently of the others.
    """
    _check_positive("model_max_length", model_max_length, minimum=2)
    _check_positive("samples_per_category", samples_per_category)
    categories = _categories(spec, column)
    pad_id = _pad_id(tokenizer)
    sep_id = _separator_id(tokenizer) if pack else pad_id
    parts: list[Rows] = []
    names: list[str] = []
    for category in categories:
        count = category.num_samples or samples_per_category or DEFAULT_SAMPLES_PER_CATEGORY
        texts = _Counted(_iter_documents(category, tokenizer, seed))
        docs = _token_stream(texts, tokenizer)
        if pack:
            rows = _pack(docs, count, model_max_length, sep_id, pad_id)
        else:
            rows = _unpacked(docs, count, model_max_length, pad_id)
        if rows[0].shape[0] < count:
            unit = f"packed sequences of {model_max_length} tokens" if pack else "documents"
            raise CalibrationDataError(
                f"{category.label}: asked for {count} samples but its {texts.count} documents give only "
                f"{rows[0].shape[0]} {unit}; ask for at most {rows[0].shape[0]}"
            )
        parts.append(rows)
        names += [category.label] * count
    width = max(rows[0].shape[1] for rows in parts)
    ids = torch.cat([_pad_to(rows[0], width, pad_id) for rows in parts])
    attention = torch.cat([_pad_to(rows[1], width, 0) for rows in parts])
    stats = torch.cat([_pad_to(rows[2], width, False) for rows in parts])
    logger.info("calibration set: %d sequences x %d tokens, %d counted", ids.shape[0], width, int(stats.sum()))
    return CalibrationSet(ids, attention, stats, names)


def _pad_to(tensor: torch.Tensor, width: int, fill: Any) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    padding = torch.full((tensor.shape[0], width - tensor.shape[1]), fill, dtype=tensor.dtype)
    return torch.cat([tensor, padding], dim=1)


def calibration_texts(
    spec: str,
    tokenizer: Any,
    num_samples: int,
    seed: int = DEFAULT_SEED,
    column: str | None = None,
) -> list[str]:
    """Raw documents (chats rendered by the template) for text-based calibration such as AutoRound.

    Each category gives its spec's ``:N`` documents, else ``num_samples`` (so a single-dataset spec
    gives exactly ``num_samples`` texts); categories are interleaved round-robin so that a prefix of
    the list stays a balanced mix. Texts are not truncated.
    """
    _check_positive("num_samples", num_samples)
    per_category = []
    for category in _categories(spec, column):
        count = category.num_samples or num_samples
        texts = list(islice(_iter_documents(category, tokenizer, seed), count))
        if len(texts) < count:
            raise CalibrationDataError(
                f"{category.label}: asked for {count} samples but it has only {len(texts)} non-empty documents"
            )
        per_category.append(texts)
    return [text for group in _round_robin(per_category) for text in group]


def _round_robin(groups: list[list[str]]) -> Iterator[list[str]]:
    for position in range(max(len(g) for g in groups)):
        yield [g[position] for g in groups if position < len(g)]
