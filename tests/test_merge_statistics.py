"""Upstream's five merging statistics against the float64 oracle (tests/merge_oracle.py) on several families.

Routing comes from the hand-written table (tests/gate_table.py), expert outputs from tests/oracle.py's
float64 dense pass, the statistics from upstream's per-batch definitions folded as its OnlineStatsTracker.
"""

from __future__ import annotations

import pytest
import torch
from gate_table import route64, table_family
from merge_oracle import RunningMeans, batch_values, router_logits64
from oracle import all_expert_outputs64

from reap_lab.families_tiny import tiny_family_config
from reap_lab.tiny import build_model
from reap_fast.merge_metrics import MERGE_KEYS
from reap_fast.metrics import MetricsFileError, load_metrics, save_metrics
from reap_fast.models import find_moe_layers
from reap_fast.observe import Observer
from reap_fast.observe import merging

# softmax routers (qwen3_moe, mixtral, gpt_oss with its logit bias, ernie with fp32 logits) and sigmoid ones
# (deepseek_v3, glm4_moe), and Llama-4 whose routing weight scales the expert input.
FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "ernie4_5_moe", "deepseek_v3", "glm4_moe", "llama4")


def _batch(seed: int, batch: int = 2, length: int = 9, pad_last: int = 3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 256, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length - pad_last :] = 0
    return input_ids, attention_mask


def oracle(model, batches, stats_masks=None) -> dict[int, dict[str, torch.Tensor]]:
    """Run the stock model, capture each router's input, compute upstream's statistics in float64."""
    family = table_family(model.config)
    config = model.config.get_text_config()
    layers = find_moe_layers(model)
    captured = {}

    def capture(layer):
        def hook(module, args, output):
            captured[layer.layer_index] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    handles = [layer.router.register_forward_hook(capture(layer)) for layer in layers]
    means = {layer.layer_index: RunningMeans() for layer in layers}
    try:
        for number, (input_ids, attention_mask) in enumerate(batches):
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask)
            mask = attention_mask if stats_masks is None else stats_masks[number]
            keep = mask.reshape(-1).bool()
            for layer in layers:
                hidden = captured[layer.layer_index]
                index = route64(family, config, layer.router, hidden).index[keep]
                y_all = all_expert_outputs64(layer.experts, hidden)[:, keep]
                logits = router_logits64(layer.router, hidden)[keep]
                means[layer.layer_index].update(batch_values(y_all, index, logits))
    finally:
        for handle in handles:
            handle.remove()
    return {index: running.mean for index, running in means.items()}


def observe(model, batches, engine: str = "reference", stats_masks=None):
    with Observer(model, engine=engine, renormalize=True, merging=True) as observer:
        for number, (input_ids, attention_mask) in enumerate(batches):
            observer.forward(input_ids, attention_mask, None if stats_masks is None else stats_masks[number])
    return observer


def assert_merge_close(ours, expected, context: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert sorted(ours) == sorted(expected) and ours, context
    for layer in expected:
        for key in MERGE_KEYS:
            got = ours[layer][key]
            assert got.dtype == torch.float32, f"{context} layer {layer} {key}: {got.dtype}"
            torch.testing.assert_close(got.double(), expected[layer][key], rtol=rtol, atol=atol,
                                       msg=f"{context} layer {layer} {key}")


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_merging_statistics_match_float64_oracle(family):
    model = build_model(tiny_family_config(family, num_experts=8, top_k=2), seed=5)
    batches = [_batch(0), _batch(1, batch=1, length=7, pad_last=0)]
    ours = observe(model, batches).metrics()
    assert_merge_close(ours, oracle(model, batches), family)
    for layer in ours.values():
        assert len(layer) == 14


@pytest.mark.parametrize("top_k", [1, 8])
def test_top_k_of_one_and_of_every_expert(top_k):
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=top_k), seed=top_k)
    batches = [_batch(2), _batch(3, batch=3, length=5, pad_last=2)]
    ours = observe(model, batches).metrics()
    assert_merge_close(ours, oracle(model, batches), f"top_k={top_k}")
    if top_k == 8:  # every token reaches every expert: ttm's pairs and the all-token distances coincide
        layer = ours[min(ours)]
        pairs = layer["pairwise_expert_frequency"].double()
        ttm_from_all = layer["online_characteristic_activation_dist"].double() * 2 * layer["total_tokens"] / pairs
        ttm_from_all.fill_diagonal_(0.0)
        torch.testing.assert_close(layer["ttm_similarity_matrix"].double(), ttm_from_all, rtol=1e-5, atol=1e-6)


def test_statistics_mask_excludes_attended_tokens():
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=2), seed=11)
    batches = [_batch(4, batch=2, length=8, pad_last=2)]
    stats_mask = batches[0][1].clone().bool()
    stats_mask[0, 3] = False  # an attended token (a packing separator) that is not counted
    ours = observe(model, batches, stats_masks=[stats_mask]).metrics()
    assert int(ours[min(ours)]["total_tokens"]) == int(stats_mask.sum())
    assert_merge_close(ours, oracle(model, batches, stats_masks=[stats_mask]), "stats mask")


def test_expert_no_token_reaches():
    model = build_model(tiny_family_config("gpt_oss", num_experts=8, top_k=2), seed=13)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.router.bias[5] = -1e4  # expert 5 is never chosen
    batches = [_batch(6), _batch(7, batch=1, length=6, pad_last=0)]
    ours = observe(model, batches).metrics()
    layer = ours[min(ours)]
    assert int(layer["expert_frequency"][5]) == 0
    assert bool((layer["routed_characteristic_activation"][5] == 0).all())
    assert bool((layer["characteristic_activation"][5] != 0).any())  # every expert runs on every token
    assert_merge_close(ours, oracle(model, batches), "unused expert")


def test_small_chunks_give_the_same_statistics(monkeypatch):
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=2), seed=17)
    batches = [_batch(8, batch=3, length=11, pad_last=4)]
    whole = observe(model, batches).metrics()
    hidden = model.config.hidden_size
    monkeypatch.setattr(merging, "DENSE_BYTES", 5 * 8 * hidden * 4)  # 5 tokens per chunk
    monkeypatch.setattr(merging, "EXACT_BYTES", 2 * 4 * 8 * (hidden + 8))  # 2 tokens per slice
    assert merging.chunk_sizes(8, hidden, 4) == (5, 2)
    chunked = observe(model, batches).metrics()
    assert_merge_close(chunked, oracle(model, batches), "chunked")
    for layer in whole:
        for key in MERGE_KEYS:
            torch.testing.assert_close(chunked[layer][key], whole[layer][key], rtol=1e-6, atol=1e-7)


def test_shards_and_restored_state_combine_to_the_single_run():
    """torchrun adds the ranks' raw sums, resume restores them: both give the single process's file."""
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=2), seed=19)
    first, second = _batch(9), _batch(10, batch=1, length=7, pad_last=0)
    single = observe(model, [first, second]).metrics()
    rank0, rank1 = observe(model, [first]), observe(model, [second])
    resumed = observe(model, [])
    for index, accumulator in rank0.accumulators.items():
        state = {key: value.clone() for key, value in accumulator.state_tensors().items()}
        resumed.accumulators[index].load_state_tensors(state)  # what a checkpoint of rank 0 holds
        accumulator.merge(rank1.accumulators[index])
    assert_merge_close(rank0.metrics(), {k: {m: v.double() for m, v in d.items()} for k, d in single.items()},
                       "merged shards", rtol=1e-6, atol=1e-7)
    continued = Observer(model, engine="reference", renormalize=True, merging=True)
    for index, accumulator in resumed.accumulators.items():
        continued.accumulators[index].load_state_tensors(accumulator.state_tensors())
    with continued:
        continued.forward(*second)
    assert_merge_close(continued.metrics(), {k: {m: v.double() for m, v in d.items()} for k, d in single.items()},
                       "resumed", rtol=1e-6, atol=1e-7)


def test_off_by_default_nine_keys():
    model = build_model(tiny_family_config("qwen3_moe"), seed=0)
    with Observer(model, engine="reference") as observer:
        observer.forward(*_batch(0))
    assert all(len(layer) == 9 for layer in observer.metrics().values())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_triton_path_matches_float64_oracle(family):
    """The Triton engine's observation (interpreter on the CPU) records the same five statistics."""
    pytest.importorskip("triton")
    model = build_model(tiny_family_config(family, num_experts=8, top_k=2), seed=23)
    batches = [_batch(12), _batch(13, batch=1, length=6, pad_last=0)]
    ours = observe(model, batches, engine="triton").metrics()
    assert_merge_close(ours, oracle(model, batches), f"triton {family}", rtol=1e-4, atol=1e-5)


def _saved_layer(tmp_path):
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=2), seed=29)
    metrics = observe(model, [_batch(14)]).metrics()
    path = save_metrics(metrics, tmp_path / "obs.pt")
    return metrics, path


def test_validation_accepts_the_file_and_keeps_all_fourteen_keys(tmp_path):
    metrics, path = _saved_layer(tmp_path)
    loaded = load_metrics(path)
    for layer, values in metrics.items():
        assert sorted(loaded[layer]) == sorted(values) and len(values) == 14
        for key in MERGE_KEYS:
            assert torch.equal(loaded[layer][key], values[key])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda m: m.pop("router_logit_similiarity"), "without router_logit_similiarity"),
        (lambda m: m.__setitem__("characteristic_activation", m["characteristic_activation"].double()), "float64"),
        (lambda m: m.__setitem__("routed_characteristic_activation", m["routed_characteristic_activation"][:, :3]),
         "shape"),
        (lambda m: m["online_characteristic_activation_dist"].__setitem__((0, 1), float("nan")), "non-finite"),
        (lambda m: m["online_characteristic_activation_dist"].__setitem__((0, 1), 0.7), "not symmetric"),
        (lambda m: m["ttm_similarity_matrix"].__setitem__((2, 2), 1e-6), "non-zero diagonal"),
        (lambda m: m["router_logit_similiarity"].__setitem__((1, 1), 0.5), "non-zero diagonal"),
        (lambda m: m["router_logit_similiarity"].mul_(3.0), "outside [0, 2]"),
    ],
)
def test_validation_refuses_broken_merging_statistics(tmp_path, corrupt, message):
    metrics, _ = _saved_layer(tmp_path)
    layer = metrics[min(metrics)]
    corrupt(layer)
    with pytest.raises(MetricsFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        save_metrics(metrics, tmp_path / "broken.pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_expert_outputs_equal_one_expert_at_a_time(family):
    """The GPU's batched products compute what the module's own per-expert operations compute."""
    model = build_model(tiny_family_config(family, num_experts=8, top_k=2), seed=31)
    layer = find_moe_layers(model)[0]
    experts = layer.experts
    if not hasattr(experts, "_apply_gate"):  # Llama-4: the engines read it through the transposed view
        from reap_fast.observe.input_scaled import TransposedExpertsView

        experts = TransposedExpertsView(experts)
    x = torch.randn(6, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = merging.batched_expert_outputs(experts, x)
        looped = merging.all_expert_outputs(experts, x, layer.num_experts)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
