"""The reference engine against the float64 oracle, on every family, with padding, several top-k and batches.

Routing and g come from the hand-written table (tests/gate_table.py), never from reap-fast's adapters.
"""

import pytest
import torch
from gate_table import NATIVE_RENORMALISED, gates64, renormalised, route64, table_family
from oracle import assert_metrics_close, merge_oracle, oracle_layer_stats

from reap_lab.families_tiny import TINY_CONFIGS, tiny_family_config
from reap_fast.metrics import METRIC_DTYPES, load_metrics, save_metrics
from reap_fast.models import find_moe_layers
from reap_fast.observe import Observer
from reap_lab.tiny import build_model


def _batch(seed: int, batch: int = 2, length: int = 11, pad_last: int = 4):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length - pad_last :] = 0  # right padding on the last row
    return input_ids, attention_mask


def _oracle(model, batches, renormalize: bool):
    """Run the STOCK model, capture each router's input; route, gate and count in float64 from the hand table."""
    family = table_family(model.config)
    layers = find_moe_layers(model)
    captured = {}
    renormalise = renormalised(NATIVE_RENORMALISED, family, model.config.get_text_config(), renormalize)

    def capture(layer):
        def hook(module, args, output):
            captured[layer.layer_index] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    handles = [layer.router.register_forward_hook(capture(layer)) for layer in layers]
    results = {}
    try:
        for input_ids, attention_mask in batches:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask)
            mask = attention_mask.reshape(-1).bool()
            for layer in layers:
                hidden = captured[layer.layer_index]
                routing = route64(family, model.config.get_text_config(), layer.router, hidden)
                gates = gates64(routing, renormalise)
                stats = oracle_layer_stats(layer.experts, hidden, routing.index, gates, mask)
                results[layer.layer_index] = merge_oracle(results.get(layer.layer_index), stats)
    finally:
        for handle in handles:
            handle.remove()
    return results


def _observe(model, batches, renormalize: bool, engine: str = "reference"):
    with Observer(model, engine=engine, renormalize=renormalize) as observer:
        for input_ids, attention_mask in batches:
            observer.forward(input_ids, attention_mask)
    return observer.metrics()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_matches_float64_oracle_on_every_family(family, renormalize):
    model = build_model(tiny_family_config(family, num_experts=8, top_k=2), seed=3)
    batches = [_batch(0), _batch(1, batch=1, length=7, pad_last=0)]
    ours = _observe(model, batches, renormalize)
    oracle = _oracle(model, batches, renormalize)
    assert sorted(ours) == sorted(oracle) and ours
    for layer in oracle:
        assert_metrics_close(ours[layer], oracle[layer], context=f"{family} layer {layer}")


@pytest.mark.parametrize("top_k", [1, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_reference_matches_oracle_for_top_k_and_batch_size(top_k, batch_size):
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=top_k), seed=top_k)
    batches = [_batch(seed, batch=batch_size, length=9, pad_last=3) for seed in range(2)]
    ours = _observe(model, batches, renormalize=True)
    oracle = _oracle(model, batches, renormalize=True)
    for layer in oracle:
        assert_metrics_close(ours[layer], oracle[layer], context=f"top_k={top_k} layer {layer}")


def test_padding_tokens_are_not_counted():
    model = build_model(tiny_family_config("qwen3_moe"), seed=0)
    input_ids, attention_mask = _batch(5, batch=2, length=10, pad_last=6)
    metrics = _observe(model, [(input_ids, attention_mask)], renormalize=True)
    for layer_metrics in metrics.values():
        assert int(layer_metrics["total_tokens"]) == 14
        assert int(layer_metrics["expert_frequency"].sum()) == 14 * 2


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_5_moe"])
def test_observing_model_logits_equal_stock_logits(family):
    model = build_model(tiny_family_config(family), seed=1)
    input_ids, attention_mask = _batch(2)
    with torch.no_grad():
        stock = model(input_ids=input_ids, attention_mask=attention_mask).logits
        with Observer(model, engine="reference"):
            observed = model(input_ids=input_ids, attention_mask=attention_mask).logits
        restored = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(observed, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored, stock)  # the stock implementation is back after the observer exits


def test_saved_file_round_trips_with_upstream_keys_and_dtypes(tmp_path):
    model = build_model(tiny_family_config("qwen3_moe"), seed=0)
    metrics = _observe(model, [_batch(0)], renormalize=True)
    path = save_metrics(metrics, tmp_path / "obs.pt")
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == [0, 1]
    for layer_metrics in raw.values():
        assert set(layer_metrics) == set(METRIC_DTYPES)
        for key, dtype in METRIC_DTYPES.items():
            assert layer_metrics[key].dtype == dtype, key
        assert layer_metrics["total_tokens"].shape == ()
        assert layer_metrics["pairwise_expert_frequency"].shape == (8, 8)
    loaded = load_metrics(path)
    for layer in metrics:
        for key in METRIC_DTYPES:
            assert torch.equal(loaded[layer][key], metrics[layer][key])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file
