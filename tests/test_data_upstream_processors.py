"""Dataset names upstream REAP knows: the document text each gives, written out by hand from upstream's processors."""

from __future__ import annotations

import json

import pytest

from reap_fast.data import UPSTREAM_PROCESSORS, CategorySpec, load_documents
from reap_lab.tiny import byte_tokenizer

# Renders roles, contents, tool calls (name + JSON arguments) and the names of the tools passed.
TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name if t.function is defined else t.name }},{% endfor %}"
    "{{ '\\n' }}{% endif %}{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[{{ c.function.name }}{{ c.function.arguments | tojson }}]"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
)

CASES = {
    "theblackcat102/evol-codealpaca-v1": ({"instruction": "I", "output": "O"}, "user:I\nassistant:O\n"),
    "ise-uiuc/Magicoder-Evol-Instruct-110K": ({"instruction": "I", "response": "R"}, "user:I\nassistant:R\n"),
    "euclaise/WritingPrompts_curated": (
        {"prompt": "P", "body": "B"},
        "user:Please write a creative story using the following writing prompt:\n\n P\nassistant:B\n",
    ),
    "cais/mmlu": (
        {"question": "Q?", "choices": ["a", "b"], "subject": "s", "answer": 0},
        "user:Q? Choose from the following options: ['a', 'b']\n",
    ),
    "allenai/c4": ({"text": "plain text", "url": "u"}, "plain text"),
    "allenai/tulu-3-sft-mixture": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "source": "s"},
        "user:hi\nassistant:yo\n",
    ),
    "m-a-p/CodeFeedback-Filtered-Instruction": (
        {"messages": [{"role": "user", "content": "q"}], "lang": "py"},
        "user:q\n",
    ),
    "Salesforce/xlam-function-calling-60k": (
        {"query": "Q", "answers": json.dumps([{"name": "f", "arguments": {"x": 1}}]), "tools": json.dumps([{"name": "f"}])},
        'TOOLS:f,\nuser:Q\nassistant:[f{"x": 1}]\n',
    ),
    "SWE-bench/SWE-smith-trajectories": (
        {
            "messages": json.dumps([
                {"role": "user", "content": [{"type": "text", "text": "fix"}, {"type": "image", "url": "x"}]},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}]},
            ])
        },
        'TOOLS:str_replace_editor,_state_anthropic,submit,bash,\nuser:fix\n{"type": "image", "url": "x"}\n'
        'assistant:[bash{"command": "ls"}]\n',
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("name", sorted(CASES))
def test_registered_name_gives_upstreams_text(name, tokenizer, tmp_path, monkeypatch):
    row, expected = CASES[name]
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.chdir(tmp_path)  # a local folder with the hub name, as datasets.load_dataset would read it
    assert load_documents(CategorySpec(name=name), tokenizer) == [expected]


def test_every_upstream_name_is_covered():
    passthrough = {"allenai/tulu-3-sft-personas-math", "open-r1/Mixture-of-Thoughts"}
    assert set(UPSTREAM_PROCESSORS) == set(CASES) | passthrough
    assert all(UPSTREAM_PROCESSORS[name].to_row is None for name in passthrough)


def test_split_applies_to_entries_without_one(tmp_path, tokenizer, monkeypatch):
    from reap_fast.data import PackingOptions, build_calibration_set

    for split, text in (("train", "from train"), ("valid", "from valid")):
        folder = tmp_path / "org" / "data"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    monkeypatch.chdir(tmp_path)
    result = build_calibration_set(
        "org/data:1,org/data(train):1", tokenizer, model_max_length=16, options=PackingOptions(default_split="valid")
    )
    decoded = [bytes(row[row > 0].tolist()).decode() for row in result.input_ids]
    assert decoded == ["from valid", "from train"]
