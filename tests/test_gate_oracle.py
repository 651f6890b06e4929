"""REAP's gate g per family against the hand-written table (tests/gate_table.py), and hand values.

The expectations share no decision with reap-fast: routing (softmax or sigmoid, logit bias,
correction bias for the choice only, group-limited choice), renormalisation under each flag value and
the scaling factor all come from the table, in float64. The table itself is first checked against
the stock transformers routers, so a misread row fails here too. The tiny configs use values that make
each decision visible: ``routed_scaling_factor`` 2.5 / 1.5, ``norm_topk_prob`` both ways,
``topk_group < n_group`` with an unbalanced correction bias.
"""

from __future__ import annotations

import pytest
import torch
from gate_table import NATIVE_RENORMALISED, ROUTERS, gates64, limit_to_groups, renormalised, route64
from oracle import assert_metrics_close, merge_oracle, oracle_layer_stats

from reap_lab.families_tiny import TINY_CONFIGS, tiny_family_config
from reap_fast.metrics import LayerAccumulator
from reap_fast.models import find_moe_layers
from reap_fast.observe import Observer
from reap_fast.observe.reference import expert_statistics
from reap_lab.tiny import build_model

GROUPED = {"n_group": 4, "topk_group": 2}
# (family, top-k, config overrides): every row of the table with each norm_topk_prob value it reads
VARIANTS = [
    ("qwen3_moe", 2, {"norm_topk_prob": True}),
    ("qwen3_moe", 2, {"norm_topk_prob": False}),
    ("qwen3_next", 2, {"norm_topk_prob": False}),
    ("olmoe", 3, {"norm_topk_prob": True}),
    ("olmoe", 2, {"norm_topk_prob": False}),
    ("qwen3_5_moe", 2, {}),
    ("mixtral", 2, {}),
    ("gpt_oss", 2, {}),
    ("deepseek_v3", 3, {**GROUPED, "norm_topk_prob": True, "routed_scaling_factor": 2.5}),
    ("deepseek_v3", 3, {**GROUPED, "norm_topk_prob": False, "routed_scaling_factor": 2.5}),
    ("glm4_moe", 3, {**GROUPED, "norm_topk_prob": True, "routed_scaling_factor": 1.5}),
    ("glm4_moe", 2, {**GROUPED, "norm_topk_prob": False, "routed_scaling_factor": 1.5}),
    ("llama4", 1, {}),
    ("llama4", 3, {}),
    ("ernie4_5_moe", 2, {}),
    ("ernie4_5_moe", 3, {}),
    # DeepSeek-V2: group-limited (groups scored by their best) with norm_topk_prob set, which transformers ignores
    ("deepseek_v2", 3, {**GROUPED, "norm_topk_prob": True, "routed_scaling_factor": 16.0}),
    ("deepseek_v2", 2, {"topk_method": "greedy", "n_group": 1, "topk_group": 1}),  # V2-Lite's routing
]
VARIANT_IDS = [f"{f}-k{k}-" + "-".join(f"{key}={v}" for key, v in o.items() if key != "n_group") for f, k, o in VARIANTS]


def test_every_family_has_a_hand_written_row():
    missing = sorted(set(TINY_CONFIGS) - set(ROUTERS) - set(NATIVE_RENORMALISED))
    assert not missing, f"add hand-written rows for {missing} to tests/gate_table.py (ROUTERS, NATIVE_RENORMALISED)"
    assert {family for family, _, _ in VARIANTS} >= set(TINY_CONFIGS) & set(ROUTERS)


def variant_model(family: str, top_k: int, overrides: dict, seed: int = 3):
    config = tiny_family_config(family, num_experts=8, top_k=top_k)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = build_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            router = layer.router
            # small logits: sigmoid scores far from saturation, so fp32 and fp64 choose alike
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 0.15)
            if getattr(router, "bias", None) is not None:
                router.bias.copy_(torch.randn(router.bias.shape, generator=generator) * 0.5)
            if getattr(router, "e_score_correction_bias", None) is not None:
                # unbalanced: group 3 is pushed down, single experts pushed up, so the bias changes choices
                bias = torch.tensor([0.02, 0.25, -0.05, 0.0, 0.2, -0.1, -0.6, -0.5])
                router.e_score_correction_bias.copy_(bias)
            if hasattr(router, "moe_statics"):  # ERNIE: (1, E) bias on the softmax probabilities
                router.moe_statics.e_score_correction_bias.copy_(torch.randn(1, 8, generator=generator) * 0.05)
    return model


def batches(seed: int):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for batch, length, pad in ((2, 11, 4), (1, 7, 0)):
        input_ids = torch.randint(0, 256, (batch, length), generator=generator)
        attention_mask = torch.ones(batch, length, dtype=torch.long)
        attention_mask[-1, length - pad :] = 0
        stats_mask = attention_mask.bool().clone()
        stats_mask[0, 1] = False  # a counted-out token that is not padding (a packing separator)
        out.append((input_ids, attention_mask, stats_mask))
    return out


def capture_router_inputs(model, batch_list):
    """Per batch, every MoE layer's router input (T, H) and the stock router's (weights, index)."""
    layers = find_moe_layers(model)
    captured, runs = {}, []

    def hook(layer):
        def fn(module, args, output):
            hidden = args[0].reshape(-1, args[0].shape[-1]).detach()
            if len(output) == 2:  # Llama-4's router: (sigmoid scores, 0 off the top-k; logits), choice = top-k logits
                scores, logits = output
                index = torch.topk(logits, layer.block.top_k, dim=1).indices
                captured[layer.layer_index] = (hidden, scores.gather(1, index), index)
            else:
                captured[layer.layer_index] = (hidden, output[1], output[2])

        return fn

    handles = [layer.router.register_forward_hook(hook(layer)) for layer in layers]
    try:
        for input_ids, attention_mask, _ in batch_list:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=attention_mask)
            runs.append(dict(captured))
    finally:
        for handle in handles:
            handle.remove()
    return layers, runs


@pytest.mark.parametrize("family, top_k, overrides", VARIANTS, ids=VARIANT_IDS)
def test_table_routing_is_the_stock_routers(family, top_k, overrides):
    """The table's float64 routing chooses the experts transformers chooses, with the model's own weights."""
    model = variant_model(family, top_k, overrides)
    config = model.config
    layers, runs = capture_router_inputs(model, batches(0))
    for run in runs:
        for layer in layers:
            hidden, weights, index = run[layer.layer_index]
            routing = route64(family, config, layer.router, hidden)
            order = torch.sort(index, dim=-1)
            assert torch.equal(order.values.long(), routing.index), f"{family} layer {layer.layer_index}: choice"
            stock = weights.double().gather(1, order.indices)
            torch.testing.assert_close(stock, routing.model_weights, rtol=2e-6, atol=1e-7)


def test_variants_make_each_decision_visible():
    """Preconditions: the configs above would expose a wrong decision (groups, bias, scale, renormalisation)."""
    for family in ("deepseek_v3", "glm4_moe"):
        model = variant_model(family, 3, {**GROUPED, "norm_topk_prob": True, "routed_scaling_factor": 2.5})
        layers, runs = capture_router_inputs(model, batches(0))
        layer = layers[0]
        hidden = runs[0][layer.layer_index][0]
        scores = torch.sigmoid(hidden.double() @ layer.router.weight.double().T)
        choice = scores + layer.router.e_score_correction_bias.double()
        grouped = limit_to_groups(choice, 4, 2).topk(3).indices.sort(-1).values
        plain = choice.topk(3).indices.sort(-1).values
        no_bias = limit_to_groups(scores, 4, 2).topk(3).indices.sort(-1).values
        assert (grouped != plain).any(dim=-1).sum() >= 3, "group limiting changes no choice"
        assert (grouped != no_bias).any(dim=-1).sum() >= 3, "the correction bias changes no choice"
    model = variant_model("qwen3_moe", 2, {"norm_topk_prob": True})
    layers, runs = capture_router_inputs(model, batches(0))
    routing = route64("qwen3_moe", model.config, layers[0].router, runs[0][layers[0].layer_index][0])
    assert (routing.probs.sum(-1) < 0.9).all(), "renormalising would not change g"


def observe(model, batch_list, renormalize: bool):
    with Observer(model, engine="reference", renormalize=renormalize) as observer:
        for input_ids, attention_mask, stats_mask in batch_list:
            observer.forward(input_ids, attention_mask, stats_mask)
    return observer.metrics()


def table_oracle(family, model, batch_list, flag: bool, table=NATIVE_RENORMALISED):
    """Float64 statistics from the table's routing and g, on the stock model's router inputs."""
    layers, runs = capture_router_inputs(model, batch_list)
    renorm = renormalised(table, family, model.config, flag)
    results = {}
    for run, (_, _, stats_mask) in zip(runs, batch_list):
        for layer in layers:
            hidden = run[layer.layer_index][0]
            routing = route64(family, model.config, layer.router, hidden)
            stats = oracle_layer_stats(layer.experts, hidden, routing.index, gates64(routing, renorm), stats_mask.reshape(-1))
            results[layer.layer_index] = merge_oracle(results.get(layer.layer_index), stats)
    return results


@pytest.mark.parametrize("flag", [True, False], ids=["renorm_true", "renorm_false"])
@pytest.mark.parametrize("family, top_k, overrides", VARIANTS, ids=VARIANT_IDS)
def test_observation_matches_the_table_oracle(family, top_k, overrides, flag):
    model = variant_model(family, top_k, overrides)
    batch_list = batches(1)
    ours = observe(model, batch_list, flag)
    expected = table_oracle(family, model, batch_list, flag)
    assert sorted(ours) == sorted(expected) and ours
    for layer in expected:
        assert_metrics_close(ours[layer], expected[layer], context=f"{family} flag={flag} layer {layer}")


def test_expert_whose_tokens_are_all_masked_counts_nothing_while_others_count():
    model = variant_model("qwen3_moe", 2, {"norm_topk_prob": True})
    (input_ids, attention_mask, _), = batches(2)[:1]
    layers, runs = capture_router_inputs(model, [(input_ids, attention_mask, None)])
    first = layers[0]
    index = route64("qwen3_moe", model.config, first.router, runs[0][first.layer_index][0]).index
    valid = attention_mask.reshape(-1).bool()
    counts = torch.bincount(index[valid].reshape(-1), minlength=8)
    target = int(torch.where(counts > 0, counts, 10**6).argmin())  # the least used expert that is used
    stats_mask = valid & ~(index == target).any(dim=-1)
    assert stats_mask.sum() >= valid.sum() // 2, "masking the target's tokens should leave most tokens counted"
    batch_list = [(input_ids, attention_mask, stats_mask.view_as(attention_mask))]
    ours = observe(model, batch_list, True)
    expected = table_oracle("qwen3_moe", model, batch_list, True)
    for layer in expected:
        assert_metrics_close(ours[layer], expected[layer], context=f"layer {layer}")
    first_stats = ours[first.layer_index]
    assert int(first_stats["expert_frequency"][target]) == 0
    assert float(first_stats["ean_sum"][target]) == 0.0 and float(first_stats["reap"][target]) == 0.0
    assert float(first_stats["max_activations"][target]) == 0.0  # upstream's running maximum starts at 0
    assert int(first_stats["total_tokens"]) == int(stats_mask.sum())
    assert int(first_stats["expert_frequency"].sum()) == 2 * int(stats_mask.sum())


# --- hand values: 2 experts, 3 tokens ---------------------------------------------------------------------
#
# Router logits chosen so the softmax is exact: t0 [ln 3, 0] -> p = (.75, .25); t1 [0, ln 4] -> (.2, .8);
# t2 [ln 9, 0] -> (.9, .1). Top-1 picks e0, e1, e0. Expert outputs (3-4-5 triangles):
# y(t0, e0) = (3, 4), |y| = 5;  y(t1, e1) = (5, 12), |y| = 13;  y(t2, e0) = (6, 8), |y| = 10.
#   raw g:           e0: freq 2, ean_sum 15, weighted .75*5 + .9*10 = 12.75, g sum 1.65, reap 6.375, max 8
#                    e1: freq 1, ean_sum 13, weighted .8*13 = 10.4, g sum .8, reap 10.4, max 12
#   renormalised g:  every top-1 g is 1: weighted (15, 13), g sum (2, 1), reap (7.5, 13)
#   top-2 (k = E):   renormalising changes nothing (the two probabilities already sum to 1).

HAND_LOGITS = torch.log(torch.tensor([[3.0, 1.0], [1.0, 4.0], [9.0, 1.0]]))


def hand_router():
    """A 2-expert router whose logits for the 3 one-hot tokens are HAND_LOGITS."""
    router = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        router.weight.copy_(HAND_LOGITS.T)
    return router


@pytest.mark.parametrize("renormalize, g", [(False, [0.75, 0.8, 0.9]), (True, [1.0, 1.0, 1.0])])
def test_hand_values_two_experts_three_tokens(renormalize, g):
    from reap_fast.models import get_adapter
    from reap_fast.models.base import MoELayer

    config = tiny_family_config("mixtral", num_experts=2, top_k=1)  # mixtral: the router always renormalises
    layer = MoELayer(0, "model.layers.0.mlp", torch.nn.Module(), torch.nn.Module(), hand_router())
    gate_fn = get_adapter(config).gate_function(layer, config, renormalize)
    tokens = torch.eye(3)
    index = torch.tensor([[0], [1], [0]])
    gates = gate_fn(tokens, index, torch.ones(3, 1))
    torch.testing.assert_close(gates.double().flatten(), torch.tensor(g, dtype=torch.float64), rtol=1e-6, atol=0)

    y = torch.tensor([[3.0, 4.0], [6.0, 8.0], [5.0, 12.0]])  # rows sorted by expert: (t0,e0), (t2,e0), (t1,e1)
    sorted_gates = gates.flatten()[[0, 2, 1]]
    stats = expert_statistics(y, torch.tensor([0, 0, 1]), sorted_gates, torch.ones(3, dtype=torch.bool), 2,
                              torch.tensor(3))
    accumulator = LayerAccumulator(2)
    accumulator.add(stats)
    metrics = accumulator.to_upstream()
    weighted = [0.75 * 5 + 0.9 * 10, 0.8 * 13] if not renormalize else [15.0, 13.0]
    expected = {
        "total_tokens": 3,
        "expert_frequency": [2, 1],
        "pairwise_expert_frequency": [[4, 3], [3, 2]],
        "ean_sum": [15.0, 13.0],
        "ean_mean": [7.5, 13.0],
        "weighted_ean_sum": weighted,
        "reap": [weighted[0] / 2, weighted[1]],
        "weighted_expert_frequency_sum": [1.65, 0.8] if not renormalize else [2.0, 1.0],
        "max_activations": [8.0, 12.0],
    }
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key].double(), torch.tensor(value, dtype=torch.float64), rtol=1e-6, atol=0,
                                   msg=key)


def test_hand_values_top_k_equals_experts():
    """k = E = 2: renormalised and raw g coincide (each token's two probabilities sum to 1)."""
    from reap_fast.models import get_adapter
    from reap_fast.models.base import MoELayer

    config = tiny_family_config("mixtral", num_experts=2, top_k=2)
    layer = MoELayer(0, "model.layers.0.mlp", torch.nn.Module(), torch.nn.Module(), hand_router())
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])
    expected = torch.tensor([[0.75, 0.25], [0.8, 0.2], [0.9, 0.1]], dtype=torch.float64)
    for renormalize in (True, False):
        gates = get_adapter(config).gate_function(layer, config, renormalize)(torch.eye(3), index, torch.ones(3, 2))
        torch.testing.assert_close(gates.double(), expected, rtol=1e-6, atol=0)


def test_hand_values_sigmoid_gate_divides_out_the_scale():
    """DeepSeek-V3: the model's weights are sigmoid scores (renormalised) times 2.5; g leaves out the 2.5."""
    from reap_fast.models import get_adapter
    from reap_fast.models.base import MoELayer

    for norm, weights, g in ((True, [[1.5, 1.0]], [[0.6, 0.4]]), (False, [[1.5, 1.0]], [[0.6, 0.4]]),
                             (False, [[0.5, 1.25]], [[0.2, 0.5]])):
        config = tiny_family_config("deepseek_v3", num_experts=8, top_k=2)
        config.norm_topk_prob, config.routed_scaling_factor = norm, 2.5
        layer = MoELayer(1, "model.layers.1.mlp", torch.nn.Module(), torch.nn.Module(), torch.nn.Module())
        for flag in (True, False):
            renormalise = renormalised(NATIVE_RENORMALISED, "deepseek_v3", config, flag)  # the hand-written table
            gates = get_adapter(config).gate_function(layer, config, renormalise)(torch.zeros(1, 64), torch.tensor([[0, 1]]),
                                                                           torch.tensor(weights))
            torch.testing.assert_close(gates.double(), torch.tensor(g, dtype=torch.float64), rtol=1e-6, atol=0)

