"""Llama-4, ERNIE-4.5-MoE and DeepSeek-V2 (families upstream REAP supports): what is specific to them.

Their routing and g are rows of the hand-written table (tests/gate_table.py) and are checked there
(tests/test_gate_oracle.py), in the oracle tests (tests/test_reference.py) and with the Triton engine
(tests/test_families.py); pruning through the CLI path in tests/test_prune.py. Here: the hand-written
slicing rows (config.json keys, router tensors and their expert dimension), the stock logits while
observing (Llama-4's block forward is replaced), ERNIE's selection bias through save + reload + generate,
and the multimodal Llama-4 config.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from reap_lab.families_tiny import tiny_family_config
from reap_fast.models import find_moe_layers, text_config
from reap_fast.observe import Observer
from reap_fast.prune import prune_model, save_pruned
from reap_lab.tiny import build_model, byte_tokenizer

FAMILIES = ("llama4", "ernie4_5_moe", "deepseek_v2")


@dataclass(frozen=True)
class SlicingRow:
    count_key: str  # config.json key holding E (what the pruner must edit)
    top_k_key: str
    router_tensors: dict[str, int]  # router tensor (dotted under the router) -> its expert dimension


# read off the transformers 5.x configs' stored keys and the routers' parameters
ROWS = {
    "llama4": SlicingRow("num_local_experts", "num_experts_per_tok", {"weight": 0}),
    "ernie4_5_moe": SlicingRow("moe_num_experts", "moe_k", {"weight": 0, "moe_statics.e_score_correction_bias": 1}),
    "deepseek_v2": SlicingRow("n_routed_experts", "num_experts_per_tok", {"weight": 0}),
}


def _tensor(router, name):
    for part in name.split("."):
        router = getattr(router, part)
    return router


def family_model(family: str, top_k: int = 2, seed: int = 3):
    model = build_model(tiny_family_config(family, num_experts=8, top_k=top_k), seed=seed)
    generator = torch.Generator().manual_seed(seed + 20)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            if family == "ernie4_5_moe":  # a bias that changes choices (the stock init is zero)
                bias = _tensor(layer.router, "moe_statics.e_score_correction_bias")
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", ["reference", "triton"])
def test_observed_forward_gives_the_stock_logits(family, engine):
    model = family_model(family)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 11), generator=generator)
    attention_mask = torch.ones(2, 11, dtype=torch.long)
    attention_mask[-1, 7:] = 0
    with torch.no_grad():
        stock = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with Observer(model, engine=engine):
            observed = model(input_ids=input_ids, attention_mask=attention_mask).logits
        restored = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(observed, stock, rtol=1e-4, atol=1e-5)
    assert torch.equal(restored, stock)  # the stock forward is back after the observer exits


KEEP = {0: [0, 2, 3, 5, 6, 7], 1: [1, 2, 3, 4, 5, 7]}  # by MoE-layer position; 3 per routing group of 4


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_slices_router_tensors_and_config_keys(family):
    row = ROWS[family]
    model = family_model(family)
    layers = find_moe_layers(model)
    keep = {layer.layer_index: torch.tensor(KEEP[pos]) for pos, layer in enumerate(layers)}
    before = {
        layer.layer_index: {name: _tensor(layer.router, name).detach().clone() for name in row.router_tensors}
        for layer in layers
    }
    experts_before = {layer.layer_index: layer.experts.down_proj.detach().clone() for layer in layers}
    prune_model(model, keep)
    config = model.config
    assert getattr(config, row.count_key) == 6 and getattr(config, row.top_k_key) == 2
    assert config.to_dict()[row.count_key] == 6  # the key config.json stores, not only an alias
    for layer in find_moe_layers(model):
        kept = keep[layer.layer_index]
        for name, dim in row.router_tensors.items():
            expected = before[layer.layer_index][name].index_select(dim, kept)
            assert torch.equal(_tensor(layer.router, name), expected), f"{family} {name}"
        assert torch.equal(layer.experts.down_proj, experts_before[layer.layer_index][kept])


def test_pruned_ernie_reloads_with_its_sliced_selection_bias_and_generates_the_same_tokens(tmp_path):
    """ERNIE's moe_statics bias (1, E) is added to the softmax probabilities to select experts. The removed
    experts get a logit of about -240 (probability exactly 0 in fp32, so the kept probabilities do not change
    when they go) and a -1e4 bias; the kept ones keep random, non-zero biases that decide the choice. The
    pruned, saved and reloaded model must then give the original's logits and greedy tokens, which needs the
    kept bias entries in the right order. (tests/test_prune.py checks every family through the CLI path.)"""
    model = family_model("ernie4_5_moe")
    layers = find_moe_layers(model)
    keep = {layer.layer_index: torch.tensor(KEEP[pos]) for pos, layer in enumerate(layers)}
    removed = {index: sorted(set(range(8)) - set(kept.tolist())) for index, kept in keep.items()}
    with torch.no_grad():
        for layer in layers:
            _tensor(layer.router, "moe_statics.e_score_correction_bias")[0, removed[layer.layer_index]] = -1e4
    _push_logits_down(model, removed)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11, 64, 128]])
    with torch.no_grad():
        reference = model(ids).logits
        reference_tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    prune_model(model, keep)
    out = save_pruned(model, byte_tokenizer(), tmp_path / "pruned", keep, {"method": "test"})
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(pruned.generate(ids, max_new_tokens=5, do_sample=False), reference_tokens)
    assert pruned.config.moe_num_experts == 6


def _push_logits_down(model, removed: dict[int, list[int]]) -> None:
    """Give every router input a constant channel so that the ``removed`` experts get a logit of about -240.

    Channel 0 of the embeddings is set to 10 and nothing writes to it afterwards (every Linear with
    hidden-size outputs and the experts' down projections get 0 there), so the normed router input is
    about 8 there; the removed router rows get -30 at that channel, the kept rows 0.
    """
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 10.0
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features == hidden:
                module.weight[0] = 0
        for layer in find_moe_layers(model):
            layer.experts.down_proj[:, 0, :] = 0  # (E, H, I)
            layer.router.weight[:, 0] = 0
            layer.router.weight[removed[layer.layer_index], 0] = -30.0


def test_multimodal_llama4_config_uses_its_text_config():
    from transformers import Llama4Config

    from reap_fast.models import get_adapter
    from reap_fast.prune import PruneConfig, check_prune_budget

    config = Llama4Config(text_config=tiny_family_config("llama4", num_experts=16, top_k=1).to_dict())
    adapter = get_adapter(config)
    assert adapter.family == "llama4" and text_config(config).num_local_experts == 16
    assert check_prune_budget(config, PruneConfig(compression_ratio=0.5)) == 8
