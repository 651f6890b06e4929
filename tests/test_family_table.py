"""A family is described once: its adapter entry (reap_fast/models/families.py) and its tiny config
(reap_lab/families_tiny.py).

The set of families comes from the adapter table; every part of reap-fast that depends on the family
(layer streaming, the Triton kernel layout, the count keys of a pruned config.json) must answer for each
of them from the entry, and none of those modules may name a family itself.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from reap_lab.families_tiny import TINY_CONFIGS, tiny_family_config
from reap_fast.models import ADAPTERS, UnsupportedModelError, find_moe_layers
from reap_fast.observe.input_scaled import TransposedExpertsView
from reap_fast.observe.streaming import STREAMING_FAMILIES, build_skeleton, streaming_supported
from reap_fast.observe.triton_engine import experts_layout
from reap_fast.prune.checkpoint import pruned_config

PACKAGE = Path(__file__).resolve().parents[1] / "reap_fast"
FAMILIES = [adapter.family for adapter in ADAPTERS]
BY_FAMILY = {adapter.family: adapter for adapter in ADAPTERS}
# the modules that read family facts from the adapter entry and must not list families themselves
CONSUMERS = sorted((PACKAGE / "observe" / "streaming").glob("*.py")) + [
    PACKAGE / "observe" / "triton_engine.py",
    PACKAGE / "prune" / "checkpoint.py",
]


def test_every_family_has_one_tiny_config():
    assert sorted(TINY_CONFIGS) == sorted(FAMILIES)
    assert len(set(FAMILIES)) == len(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_answers_from_the_entry(family):
    adapter = BY_FAMILY[family]
    config = tiny_family_config(family)
    if adapter.streaming is None:
        assert family not in STREAMING_FAMILIES
        with pytest.raises(UnsupportedModelError, match=f"layer streaming .* {family} is not checked exact"):
            streaming_supported(config)
    else:
        assert family in STREAMING_FAMILIES
        assert streaming_supported(config) is adapter.streaming


def test_streaming_refuses_model_types_the_entry_leaves_out():
    """Llama-4's multimodal wrapper keeps its text layers under another prefix: only llama4_text streams."""
    from transformers import Llama4Config

    assert BY_FAMILY["llama4"].streaming.model_types == ("llama4_text",)
    with pytest.raises(UnsupportedModelError, match="llama4 checkpoints of model_type llama4_text only; this multimodal"):
        streaming_supported(Llama4Config(text_config=tiny_family_config("llama4").to_dict()))


def _experts_modules(family: str):
    model = build_skeleton(tiny_family_config(family), torch.float32)  # meta device: shapes and flags only
    layers = find_moe_layers(model)
    assert layers, family
    scaled = BY_FAMILY[family].expert_input_scaled  # observed through a view with the default gate's flags
    return [TransposedExpertsView(layer.experts) if scaled else layer.experts for layer in layers]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_layout_answers_from_the_entry(family):
    pytest.importorskip("reap_kernels")
    kernel = BY_FAMILY[family].kernel
    for experts in _experts_modules(family):
        layout = experts_layout(experts)
        assert layout.activation == kernel.activation
        assert layout.interleaved == kernel.interleaved
        assert layout.transposed == bool(getattr(experts, "is_transposed", False))
        for constant in kernel.constants:
            assert getattr(layout, constant) == float(getattr(experts, constant))


def test_triton_layout_by_hand():
    """Two layouts written out: transformers' default SiLU gate, and gpt-oss's clamped interleaved swiglu."""
    pytest.importorskip("reap_kernels")
    qwen = experts_layout(_experts_modules("qwen3_moe")[0])
    assert (qwen.activation, qwen.interleaved, qwen.transposed) == ("silu", False, False)
    config = tiny_family_config("gpt_oss")
    gpt_oss = experts_layout(_experts_modules("gpt_oss")[0])
    assert (gpt_oss.activation, gpt_oss.interleaved, gpt_oss.transposed) == ("gpt_oss_swiglu", True, True)
    assert (gpt_oss.alpha, gpt_oss.limit) == (config.swiglu_alpha, config.swiglu_limit)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("new_count", [6, 1])
def test_pruned_config_keys_answer_from_the_entry(family, new_count):
    """transformers reads the edited config.json with the new expert count (and top-k clamped to it)."""
    adapter = BY_FAMILY[family]
    config = tiny_family_config(family, num_experts=8, top_k=2)
    source = json.loads(config.to_json_string())  # what save_pretrained writes
    edited = pruned_config(source, 8, new_count)
    reread = adapter.text_config(type(config).from_dict(edited))
    assert getattr(reread, adapter.num_experts_key) == new_count
    assert getattr(reread, adapter.top_k_key) == min(2, new_count)
    changed = {key for key in source if source[key] != edited[key]}
    assert changed
    for key in changed:  # counts and clamped top-k become the new count; lists become lists of it
        assert edited[key] == ([new_count] * len(source[key]) if isinstance(source[key], list) else new_count), key


def _names(adapter) -> set[str]:
    kernel_class = {adapter.kernel.gate_class} if adapter.kernel.gate_class else set()
    return {adapter.family, *adapter.model_types, *kernel_class}


def _string_constants(path: Path) -> set[str]:
    """String literals of the module other than docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


@pytest.mark.parametrize("path", CONSUMERS, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_consumers_name_no_family(path):
    """No family name, model type or experts class anywhere in the text (code, comments, docstrings), and no
    family's config key as a string literal: those modules read them from the adapter entry."""
    text = path.read_text(encoding="utf-8")
    names = set().union(*(_names(adapter) for adapter in ADAPTERS))
    named = sorted(name for name in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", text))
    assert named == []
    keys = {key for adapter in ADAPTERS for key in (*adapter.count_keys, *adapter.top_k_keys, *adapter.expert_list_keys)}
    assert sorted(keys & _string_constants(path)) == []


def test_the_name_check_sees_a_family():
    """The check above is not vacuous: the adapter table itself names every family."""
    text = (PACKAGE / "models" / "families.py").read_text(encoding="utf-8")
    for adapter in ADAPTERS:
        assert re.search(rf"(?<![A-Za-z0-9_]){adapter.family}(?![A-Za-z0-9_])", text)
    assert "num_experts" in _string_constants(PACKAGE / "models" / "families.py")
