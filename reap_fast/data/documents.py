"""Rows to documents: a category's rows become text (chats rendered by the tokenizer's chat template).

Dataset names upstream REAP registers (``processors.UPSTREAM_PROCESSORS``) are rendered exactly as
upstream's dataset processors render them. Any other source is read by column detection: a chat column
(``messages``/``conversations``/``conversation``/``chat``; OpenAI ``{role, content}`` or ShareGPT
``{from, value}`` turns) goes through the chat template; ``instruction``/``output``-style pairs become a
user/assistant chat; otherwise the first of ``text``, ``content``, ``document``, ``prompt``, ``body``,
``question``, ``instruction`` is used as plain text. ``column=`` picks a column explicitly.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .processors import UPSTREAM_PROCESSORS, UpstreamProcessor, message_content_text, normalize_tool_call_arguments
from .sources import datasets_module, load_raw, reason_of
from .spec import CalibrationDataError, CategorySpec

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

CHAT_COLUMNS = ("messages", "conversations", "conversation", "chat")
PAIR_COLUMNS = (("instruction", "output"), ("instruction", "response"), ("prompt", "completion"), ("prompt", "response"))
TEXT_COLUMNS = ("text", "content", "document", "prompt", "body", "question", "instruction")

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class DocumentSource:
    """The documents of one category, rendered lazily by row index (row order = the dataset's)."""

    def __init__(self, rows: datasets.Dataset, render: Callable[[dict[str, Any]], str], label: str) -> None:
        self.rows, self.render, self.label = rows, render, label

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, index: int) -> str:
        """The document of row ``index``."""
        return self.render(self.rows[index])


def document_source(category: CategorySpec, tokenizer: Any) -> DocumentSource:
    """The rows of ``category`` and how each becomes text (upstream's processor for its registered names)."""
    ds = load_raw(category)
    label = category.label
    if len(ds) == 0:
        raise CalibrationDataError(f"{label}: the dataset is empty")
    processor = UPSTREAM_PROCESSORS.get(category.name)
    if processor is not None and category.column is None:
        return _upstream_source(ds, processor, tokenizer, label)
    kind, columns = _resolve_columns(ds, category)
    if kind != "text" and not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(
            f"{label}: column '{columns[0]}' holds chats but the tokenizer has no chat template"
        )
    keep = list(columns) + (["tools"] if kind == "chat" and "tools" in ds.column_names else [])
    rows = ds.select_columns(list(dict.fromkeys(keep)))
    if kind == "text":  # blank lines and empty cells are not documents (rows are counted after this)
        rows = rows.filter(lambda value: isinstance(value, str) and bool(value.strip()), input_columns=list(columns))
        if len(rows) == 0:
            raise CalibrationDataError(f"{label}: the dataset has no non-empty documents")
    return DocumentSource(rows, lambda row: _row_text(row, kind, columns, tokenizer, label), label)


def _upstream_source(ds: datasets.Dataset, processor: UpstreamProcessor, tokenizer: Any, label: str) -> DocumentSource:
    """Rows mapped with ``Dataset.map`` as upstream maps them (Arrow fills keys missing in some rows with None)."""
    if processor.note:
        logger.warning("%s: %s", label, processor.note)
    if processor.to_row is not None:
        try:
            ds = ds.map(processor.to_row, desc=f"formatting {label}")
        except Exception as exc:  # a row without the columns upstream's processor reads
            raise CalibrationDataError(f"{label}: rows do not have the columns its format needs: {reason_of(exc)}") from None
    if processor.kind == "text":
        if "text" not in ds.column_names:
            raise CalibrationDataError(f"{label}: no 'text' column; columns are {ds.column_names}")
        return DocumentSource(ds, lambda row: row["text"], label)
    if "messages" not in ds.column_names:
        raise CalibrationDataError(f"{label}: no 'messages' column; columns are {ds.column_names}")
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationDataError(f"{label}: a chat dataset needs a tokenizer with a chat template")
    with_tools = "tools" in ds.column_names

    def render(row: dict[str, Any]) -> str:
        messages = normalize_tool_call_arguments(row["messages"])
        kwargs = {"tools": _maybe_json(row["tools"], strict=True)} if with_tools else {}
        return _apply_template(tokenizer, messages, kwargs, label)

    return DocumentSource(ds, render, label)


def iter_documents(category: CategorySpec, tokenizer: Any, order: Callable[[int], Iterator[int]]) -> Iterator[str]:
    """Documents of ``category`` in the row order ``order(number of rows)`` yields."""
    source = document_source(category, tokenizer)
    for index in order(len(source)):
        yield source.text(index)


def _is_string(feature: Any) -> bool:
    return isinstance(feature, datasets_module().Value) and feature.dtype in ("string", "large_string")


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


def _maybe_json(value: Any, strict: bool = False) -> Any:
    """A JSON string decoded (left as it is when not JSON, unless ``strict``, as upstream's decoding is)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            if strict:
                raise CalibrationDataError(f"a 'tools' value is not valid JSON: {value[:60]!r}") from None
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
        message["content"] = message_content_text(turn.get("content", turn.get("value")))
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
    tools = _maybe_json(tools)
    kwargs = {"tools": tools} if isinstance(tools, list) and tools else {}
    return _apply_template(tokenizer, messages, kwargs, label)


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], kwargs: dict[str, Any], label: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kwargs)
    except Exception as exc:
        raise CalibrationDataError(f"{label}: the chat template failed on a row: {reason_of(exc)}") from None


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


