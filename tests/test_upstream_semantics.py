"""Upstream's rules in the drop-in: when g is renormalised, when super experts are protected, the notes, --do_eval."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from reap_lab.families_tiny import tiny_family_config
from reap_fast.observe import Observer
from reap_fast.observe.session import RENORMALIZE_ALWAYS
from reap_lab.tiny import build_model
from reap_fast.upstream.args import EvalArgs
from reap_fast.upstream.evaluation import evaluate_pruned
from reap_fast.upstream.semantics import (
    family_note,
    observer_renormalize,
    super_expert_layer_note,
    super_experts_apply,
)


@pytest.mark.parametrize(
    "norm_topk_prob, flag, layerwise, rule, expected",
    [
        (True, True, False, "upstream", RENORMALIZE_ALWAYS),
        (None, True, False, "upstream", False),  # Mixtral: no norm_topk_prob in its config -> raw softmax
        (False, True, False, "upstream", False),
        (None, True, True, "upstream", RENORMALIZE_ALWAYS),  # layerwise passes the flag on as it is
        (True, False, True, "upstream", False),
        (None, True, False, "model", True),  # reap-fast: where the model renormalises
    ],
)
def test_renormalize_rule(norm_topk_prob, flag, layerwise, rule, expected):
    config = SimpleNamespace() if norm_topk_prob is None else SimpleNamespace(norm_topk_prob=norm_topk_prob)
    assert observer_renormalize(config, flag, layerwise, rule) == expected


def _gate_sums(model, renormalize) -> tuple[float, int]:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 200, (2, 12))
    with Observer(model, engine="reference", renormalize=renormalize) as observer:
        observer.forward(input_ids, torch.ones_like(input_ids))
    metrics = observer.metrics()
    layer = metrics[min(metrics)]
    return float(layer["weighted_expert_frequency_sum"].sum()), int(layer["total_tokens"])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_always_renormalises_g_over_the_top_k(family):
    config = tiny_family_config(family, num_experts=8, top_k=2)
    if family == "qwen3_moe":
        config.norm_topk_prob = False
    model = build_model(config)
    # Each token's renormalised top-k gates sum to 1, so the gate sums add up to the token count.
    summed, tokens = _gate_sums(model, RENORMALIZE_ALWAYS)
    assert summed == pytest.approx(tokens, rel=1e-6)
    raw, _ = _gate_sums(model, False)
    assert raw < tokens * 0.999  # top-2 of 8 softmax probabilities sum to less than 1
    native, _ = _gate_sums(model, True)
    assert native == pytest.approx(summed if family == "mixtral" else raw, rel=1e-6)


def test_super_expert_rules_and_notes():
    assert super_experts_apply("reap", False) and super_experts_apply("weighted_ean_sum", False)
    assert not super_experts_apply("frequency", False) and not super_experts_apply("max_activations", False)
    assert super_experts_apply("frequency", True)
    assert super_expert_layer_note([0, 1, 2]) is None
    assert "1..3" in super_expert_layer_note([1, 2, 3])
    assert family_note(SimpleNamespace(model_type="qwen3_moe")) is None
    assert "GLM-4.5" in family_note(SimpleNamespace(model_type="glm4_moe"))
    assert family_note(SimpleNamespace(model_type="llama4_text")) is None  # upstream records Llama-4 as reap-fast does
    assert "correction bias" in family_note(SimpleNamespace(model_type="ernie4_5_moe"))
    assert "group_limited_greedy" in family_note(SimpleNamespace(model_type="deepseek_v2"))


def test_do_eval_never_skips_silently(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as without lm-eval installed
    text = evaluate_pruned(tmp_path, EvalArgs(), 0)
    lines = text.splitlines()
    assert lines[0] == "not run by reap-fast: EvalPlus, LiveCodeBench (lm-eval tasks only)"  # upstream's defaults
    assert lines[1].startswith("evaluation skipped: lm-eval is not installed (pip install 'reap-fast[eval]')")
    assert "winogrande" in lines[1]
    assert capsys.readouterr().out.strip() == text