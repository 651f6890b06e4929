"""Drawing documents and packing them into calibration sequences, as upstream REAP does.

Upstream (``BaseDatasetProcessor._process_batches_for_category_packed``), reproduced by default:

* **Sampler.** One ``random.Random(seed)`` stream for the whole spec (upstream seeds the global
  ``random`` with ``--seed`` and nothing else draws from it before the data). Each category draws row
  indices with ``randint(0, rows - 1)``, drawing again when an index was already taken, and only when a
  document is needed; the next category continues the same stream.
* **Encoding.** ``tokenizer(text)`` with the tokenizer's default special tokens (a BOS is added even when
  the chat template already wrote one, as upstream does; ``dedupe_bos`` avoids that).
* **Packing.** A sequence of ``model_max_length`` tokens is filled with documents one after another,
  leaving one position between documents; a document that does not fit is cut at the end of the
  sequence and its tail dropped; the next sequence starts with a new document. Gaps and unused tail
  positions hold token id 0 with attention mask 0 (``separator="masked"``), and the attention mask is also
  the mask of counted tokens. When a category's rows run out, the sequence being filled is kept (short)
  and the category gives fewer sequences: an error unless ``allow_fewer`` (upstream warns).

``separator="eos"`` (a reap-fast option) writes the tokenizer's EOS token in the gaps, attended but not
counted, so each packed row is one causal text; padding then holds the pad token.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from ..config.checks import DEFAULT_SEED
from ..config.observe import DEFAULT_MODEL_MAX_LENGTH
from .calibration_set import CalibrationSet
from .documents import iter_documents
from .sources import looks_like_path
from .spec import CalibrationDataError, CategorySpec, parse_dataset_spec

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_CATEGORY = 1024  # upstream ObserverArgs.batches_per_category

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PackingOptions:
    """How documents become sequences; the defaults are upstream REAP's."""

    separator: Literal["masked", "eos"] = "masked"  # masked: token 0, mask 0 (upstream); eos: attended EOS
    allow_fewer: bool = False  # a category whose rows run out gives fewer sequences, with a warning
    dedupe_bos: bool = False  # do not add a BOS in front of a text that already starts with it
    truncate: bool = False  # upstream --truncate: cut each document to the tokenizer's model_max_length
    sequences_per_count: int = 1  # sequences per unit of a sample count (upstream counts batches)
    default_split: str = "train"  # split of entries without (split)
    default_subset: str | None = None  # subset of entries without [subset]

    def __post_init__(self) -> None:
        if self.separator not in ("masked", "eos"):
            raise CalibrationDataError(f"separator must be 'masked' or 'eos', got {self.separator!r}")
        if isinstance(self.sequences_per_count, bool) or not isinstance(self.sequences_per_count, int):
            raise CalibrationDataError(f"sequences_per_count must be an integer, got {self.sequences_per_count!r}")
        if self.sequences_per_count < 1:
            raise CalibrationDataError(f"sequences_per_count must be >= 1, got {self.sequences_per_count}")


def draw_order(rng: random.Random) -> Callable[[int], Iterator[int]]:
    """Row order of upstream's sampler: ``randint`` without repeats, one draw per document needed."""

    def order(num_rows: int) -> Iterator[int]:
        drawn: set[int] = set()
        while len(drawn) < num_rows:
            index = rng.randint(0, num_rows - 1)
            if index not in drawn:
                drawn.add(index)
                yield index

    return order


# --- tokenization ---------------------------------------------------------------------------------


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Tokens the tokenizer adds around a text by default (e.g. BOS), found on a probe."""
    probe = "calibration"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain) :]
    return [], []


def encoder(tokenizer: Any, options: PackingOptions) -> Callable[[str], list[int]]:
    """A function text -> token ids (upstream: ``tokenizer(text)``, optionally truncated)."""
    kwargs: dict[str, Any] = {}
    if options.truncate:
        kwargs = {"truncation": True, "max_length": tokenizer.model_max_length}
    if not options.dedupe_bos:
        return lambda text: list(tokenizer(text, **kwargs)["input_ids"])
    prefix, suffix = _special_affixes(tokenizer)
    prefix_text = tokenizer.decode(prefix) if prefix else ""

    def encode(text: str) -> list[int]:
        head = [] if prefix_text and text.startswith(prefix_text) else prefix
        ids = head + list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]) + suffix
        return ids[: kwargs["max_length"]] if options.truncate else ids

    return encode


def _single_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _separator_id(tokenizer: Any) -> int:
    for attr in ("eos_token_id", "sep_token_id", "bos_token_id"):
        token = _single_id(getattr(tokenizer, attr, None))
        if token is not None:
            return token
    raise CalibrationDataError("the tokenizer has no EOS token to separate packed documents; use separator='masked'")


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        token = _single_id(getattr(tokenizer, attr, None))
        if token is not None:
            return token
    return 0


# --- packing --------------------------------------------------------------------------------------


def pack_rows(docs: Iterator[list[int]], count: int, length: int, separator_id: int | None = None, pad_id: int = 0) -> Rows:
    """Up to ``count`` packed rows of ``length`` tokens (see the module docstring).

    ``separator_id`` None: gaps and tail hold ``pad_id`` (0 upstream) with mask 0; otherwise gaps hold
    ``separator_id``, attended and not counted. A document is drawn only when a row has room for it.
    """
    rows = []
    while len(rows) < count:
        doc = next(docs, None)
        if doc is None:
            break
        ids = torch.full((length,), pad_id, dtype=torch.long)
        attention = torch.zeros(length, dtype=torch.long)
        counted = torch.zeros(length, dtype=torch.bool)
        position = 0
        while doc is not None:
            end = min(position + len(doc), length)
            ids[position:end] = torch.as_tensor(doc[: end - position], dtype=torch.long)
            attention[position:end] = 1
            counted[position:end] = True
            if separator_id is not None and end < length:
                ids[end], attention[end] = separator_id, 1
            position = end + 1
            doc = next(docs, None) if position < length else None
        rows.append((ids, attention, counted))
    if not rows:
        empty = torch.zeros((0, length), dtype=torch.long)
        return empty, empty.clone(), empty.bool()
    return tuple(torch.stack(parts) for parts in zip(*rows))  # type: ignore[return-value]


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


# --- the calibration set ----------------------------------------------------------------------------


def _check_positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise CalibrationDataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def categories_of(spec: str, column: str | None, options: PackingOptions | None = None) -> list[CategorySpec]:
    """The spec's categories, each with ``column`` as its explicit column (unless it names one)."""
    options = options or PackingOptions()
    categories = parse_dataset_spec(spec, options.default_split, options.default_subset)
    seen: dict[tuple[str, str | None, str], str] = {}
    for category in categories:
        path = Path(os.path.expanduser(category.name))
        if not path.exists():
            continue
        key = (str(path.resolve()), category.subset, category.split)  # ./a.jsonl and a.jsonl are one file
        if key in seen and seen[key] != category.name:
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
    for category in categories_of(spec, None):
        path = Path(os.path.expanduser(category.name))
        if path.exists():
            if path.is_file() and not os.access(path, os.R_OK):
                raise CalibrationDataError(f"cannot read '{path}': permission denied")
        elif looks_like_path(category.name):
            raise CalibrationDataError(f"{category.label}: no such file or folder '{path}'")


class _Counted:
    """An iterator wrapper that counts the items it has produced."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items, self.count = items, 0

    def __iter__(self) -> Iterator[Any]:
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
    options: PackingOptions | None = None,
) -> CalibrationSet:
    """Tokenize the spec's categories into calibration sequences (upstream's sampler and packing).

    A *sample* is one sequence: with ``pack`` a packed row of ``model_max_length`` tokens,
    without it one document (cut to ``model_max_length``; rows right-padded to the longest). Each category
    gets its spec's ``:N`` sequences, else ``samples_per_category``, else ``DEFAULT_SAMPLES_PER_CATEGORY``,
    times ``options.sequences_per_count``. Sequences come category by category, in spec order.
    """
    options = options or PackingOptions()
    _check_positive("model_max_length", model_max_length, minimum=2)
    _check_positive("samples_per_category", samples_per_category)
    categories = categories_of(spec, column, options)
    order = draw_order(random.Random(seed))
    encode = encoder(tokenizer, options)
    separator = _separator_id(tokenizer) if options.separator == "eos" and pack else None
    pad_id = _pad_id(tokenizer) if separator is not None or not pack else 0
    parts: list[Rows] = []
    names: list[str] = []
    for category in categories:
        count = (category.num_samples or samples_per_category or DEFAULT_SAMPLES_PER_CATEGORY) * options.sequences_per_count
        texts = _Counted(iter_documents(category, tokenizer, order))
        docs = (encode(text) for text in texts)
        if pack:
            rows = pack_rows(docs, count, model_max_length, separator, pad_id)
        else:
            rows = _unpacked(docs, count, model_max_length, pad_id)
        got = rows[0].shape[0]
        if got < count:
            unit = f"packed sequences of {model_max_length} tokens" if pack else "documents"
            message = f"{category.label}: asked for {count} samples but its {texts.count} documents give only {got} {unit}"
            if not options.allow_fewer:
                raise CalibrationDataError(f"{message}; ask for at most {got}")
            logger.warning("%s; using %d", message, got)
        parts.append(rows)
        names += [category.label] * got
    width = max(rows[0].shape[1] for rows in parts)
    ids = torch.cat([_pad_to(rows[0], width, pad_id) for rows in parts])
    attention = torch.cat([_pad_to(rows[1], width, 0) for rows in parts])
    stats = torch.cat([_pad_to(rows[2], width, False) for rows in parts])
    if not bool(stats.any()):
        raise CalibrationDataError(f"the calibration set '{spec}' has no tokens to observe (empty documents?)")
    logger.info("calibration set: %d sequences x %d tokens, %d counted", ids.shape[0], width, int(stats.sum()))
    return CalibrationSet(ids, attention, stats, names)


def _pad_to(tensor: torch.Tensor, width: int, fill: Any) -> torch.Tensor:
    if tensor.shape[1] == width:
        return tensor
    padding = torch.full((tensor.shape[0], width - tensor.shape[1]), fill, dtype=tensor.dtype)
    return torch.cat([tensor, padding], dim=1)


def load_documents(category: CategorySpec, tokenizer: Any, seed: int = DEFAULT_SEED) -> list[str]:
    """All documents of a category (chats rendered by the chat template) in the order the sampler draws them.

    For the first category of a spec this is the order in which ``build_calibration_set`` consumes them.
    """
    return list(iter_documents(category, tokenizer, draw_order(random.Random(seed))))


def calibration_texts(
    spec: str,
    tokenizer: Any,
    num_samples: int,
    seed: int = DEFAULT_SEED,
    column: str | None = None,
) -> list[str]:
    """Raw non-empty documents (chats rendered by the template) for text-based calibration such as AutoRound.

    Each category gives its spec's ``:N`` documents, else ``num_samples`` (so a single-dataset spec
    gives exactly ``num_samples`` texts), drawn as the sampler draws them; categories are interleaved
    round-robin so that a prefix of the list stays a balanced mix. Texts are not truncated.
    """
    _check_positive("num_samples", num_samples)
    per_category = []
    for category in categories_of(spec, column):
        count = category.num_samples or num_samples
        documents = iter_documents(category, tokenizer, draw_order(random.Random(seed)))
        texts = list(islice((text for text in documents if text.strip()), count))
        if len(texts) < count:
            raise CalibrationDataError(
                f"{category.label}: asked for {count} samples but it has only {len(texts)} non-empty documents"
            )
        per_category.append(texts)
    return [text for group in _round_robin(per_category) for text in group]


def _round_robin(groups: list[list[str]]) -> Iterator[list[str]]:
    for position in range(max(len(g) for g in groups)):
        yield [g[position] for g in groups if position < len(g)]
