"""The dataset names upstream REAP knows, and the documents it makes of their rows.

Upstream (``reap/data.py``, ``DATASET_REGISTRY``) maps each row with ``Dataset.map`` to either a
``messages`` chat (rendered with the tokenizer's chat template, ``add_generation_prompt=False``, with
the row's ``tools`` when the row has that column) or a plain ``text``. The functions here produce the
same rows, so a name below gives the same document text in reap-fast as in upstream. Rows go through
``Dataset.map`` here too, so Arrow's handling of keys present in some rows only (filled with None) is
the same.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

Row = dict[str, Any]


@dataclass(frozen=True)
class UpstreamProcessor:
    """How upstream turns one dataset's rows into documents."""

    kind: Literal["chat", "text"]
    to_row: Callable[[Row], Row] | None = None  # applied with Dataset.map; None: the rows as they are
    note: str | None = None  # printed once when upstream's own processor differs (e.g. would crash)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _call_id() -> str:
    # Upstream gives every tool call a fresh uuid4 id (os.urandom: the seeded `random` is not used).
    return f"chatcmpl-tool-{uuid.uuid4()}"


def _user_assistant(user: str, assistant: str) -> Row:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _code_alpaca(row: Row) -> Row:
    return _user_assistant(row["instruction"], row["output"])


def _magicoder(row: Row) -> Row:
    return _user_assistant(row["instruction"], row["response"])


def _writing_prompts(row: Row) -> Row:
    prompt = f"Please write a creative story using the following writing prompt:\n\n {row['prompt']}"
    return _user_assistant(prompt, row["body"])


def _mmlu(row: Row) -> Row:
    question = f"{row['question']} Choose from the following options: {row['choices']}"
    return {"messages": [{"role": "user", "content": question}]}


def _xlam(row: Row) -> Row:
    calls = [
        {
            "function": {"arguments": json.dumps(call["arguments"]), "name": call["name"]},
            "id": _call_id(),
            "type": "function",
        }
        for call in _json(row["answers"])
    ]
    tools = row["tools"] if isinstance(row["tools"], str) else json.dumps(row["tools"])
    messages = [{"role": "user", "content": row["query"]}, {"role": "assistant", "content": "", "tool_calls": calls}]
    return {"messages": messages, "tools": tools}


def message_content_text(content: Any) -> str:
    """A message's content as text: parts joined by newlines, non-text parts as sorted JSON (as upstream)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                parts.append(item["text"])
            elif isinstance(item, dict):
                parts.append(json.dumps(item, sort_keys=True))
            else:
                parts.append(str(item))
        return "\n".join(part for part in parts if part)
    return str(content)


@lru_cache(maxsize=1)
def swe_smith_tools() -> list[Row]:
    """The tool schema upstream passes with every SWE-smith trajectory."""
    return json.loads((Path(__file__).with_name("swe_smith_tools.json")).read_text(encoding="utf-8"))


def _swe_smith(row: Row) -> Row:
    messages = []
    for turn in _json(row["messages"]):
        message = {"role": turn["role"], "content": message_content_text(turn.get("content"))}
        if turn.get("tool_calls") is not None:
            message["tool_calls"] = [
                {
                    "function": {"arguments": call["function"]["arguments"], "name": call["function"]["name"]},
                    "id": _call_id(),
                    "type": "function",
                }
                for call in turn["tool_calls"]
            ]
        messages.append(message)
    return {"messages": messages, "tools": swe_smith_tools()}


def normalize_tool_call_arguments(messages: Any) -> Any:
    """Tool-call ``arguments`` given as JSON strings decoded to objects, other fields untouched (as upstream)."""
    if not isinstance(messages, list):
        return messages
    result = []
    for message in messages:
        if not isinstance(message, dict) or not message.get("tool_calls"):
            result.append(message)
            continue
        calls = []
        for call in message["tool_calls"]:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                function = {**call["function"], "arguments": _json(call["function"].get("arguments"))}
                call = {**call, "function": function}
            calls.append(call)
        result.append({**message, "tool_calls": calls})
    return result


_CHAT = UpstreamProcessor("chat")

UPSTREAM_PROCESSORS: dict[str, UpstreamProcessor] = {
    "m-a-p/CodeFeedback-Filtered-Instruction": UpstreamProcessor(
        "chat",
        note="upstream's processor reads a 'text_fieldmessages' column that this dataset does not have and "
        "stops with a KeyError; reap-fast reads its 'messages' column",
    ),
    "allenai/tulu-3-sft-mixture": _CHAT,
    "cais/mmlu": UpstreamProcessor("chat", _mmlu),
    "ise-uiuc/Magicoder-Evol-Instruct-110K": UpstreamProcessor("chat", _magicoder),
    "allenai/c4": UpstreamProcessor("text"),
    "theblackcat102/evol-codealpaca-v1": UpstreamProcessor("chat", _code_alpaca),
    "euclaise/WritingPrompts_curated": UpstreamProcessor("chat", _writing_prompts),
    "allenai/tulu-3-sft-personas-math": _CHAT,
    "open-r1/Mixture-of-Thoughts": _CHAT,
    "Salesforce/xlam-function-calling-60k": UpstreamProcessor("chat", _xlam),
    "SWE-bench/SWE-smith-trajectories": UpstreamProcessor("chat", _swe_smith),
}
