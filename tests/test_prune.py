"""The pruner: selection (every method, ties, budgets, groups, super experts), slicing of
every tiny family, saving, loading upstream observation files, and bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from fixtures.make_upstream_metrics import upstream_metrics
from reap_lab.families_tiny import TINY_CONFIGS, tiny_family_config
from reap_fast.metrics import METRIC_DTYPES, load_metrics, save_metrics
from reap_fast.models import find_moe_layers, get_adapter, text_config
from reap_fast.models.base import router_tensor
from reap_fast.prune.select import experts_to_prune
from reap_fast.prune import (
    KeepIndexError,
    MetricsMismatchError,
    OutputExistsError,
    PruneConfig,
    SelectionError,
    UnevenPruningError,
    UnknownMethodError,
    expert_counts,
    prune_checkpoint,
    prune_model,
    select_experts,
    super_expert_mask,
)
from reap_lab.tiny import build_model, byte_tokenizer, save_checkpoint

E = 8


# --- hand-made metrics ----------------------------------------------------------------------------


def hand_metrics(scores: dict[str, list[list[float]]], num_experts: int = E, layers: list[int] | None = None):
    """Valid metrics whose keys named in ``scores`` hold the given per-layer values (others: ones)."""
    num_layers = len(next(iter(scores.values())))
    layers = list(range(num_layers)) if layers is None else layers
    metrics = {}
    for row, layer in enumerate(layers):
        entry = {}
        for key, dtype in METRIC_DTYPES.items():
            if key == "total_tokens":
                entry[key] = torch.tensor(1000, dtype=dtype)
            elif key == "pairwise_expert_frequency":
                entry[key] = torch.ones(num_experts, num_experts, dtype=dtype)
            elif key in scores:
                entry[key] = torch.tensor(scores[key][row], dtype=torch.float64).to(dtype)
            else:
                entry[key] = torch.ones(num_experts, dtype=dtype)
        # A valid file: each per-token mean equals its sum / frequency, and unused experts have zero sums.
        frequency = entry["expert_frequency"].to(torch.float64)
        for mean_key, sum_key in (("ean_mean", "ean_sum"), ("reap", "weighted_ean_sum")):
            if sum_key in scores:
                entry[mean_key] = torch.where(frequency > 0, entry[sum_key] / frequency.clamp(min=1), 0.0).float()
            else:
                entry[mean_key] = torch.where(frequency > 0, entry[mean_key], 0.0).to(entry[mean_key].dtype)
                entry[sum_key] = entry[mean_key].to(torch.float64) * frequency
        entry["weighted_expert_frequency_sum"] = torch.where(frequency > 0, entry["weighted_expert_frequency_sum"], 0.0)
        metrics[layer] = entry
    return metrics


def argsort_reference(row: list[float], n: int) -> list[int]:
    """Kept experts by a plain per-layer sort: remove the n lowest, ties -> keep the lowest index."""
    order = sorted(range(len(row)), key=lambda i: (row[i], -i))
    removed = set(order[:n])
    return [i for i in range(len(row)) if i not in removed]


TIED_ROWS = [
    [3, 1, 1, 2, 0, 0, 5, 1],
    [2, 2, 2, 2, 2, 2, 2, 2],
    [7, 6, 5, 4, 3, 2, 1, 0],
]

METHOD_KEYS = {
    "reap": "reap",
    "frequency": "expert_frequency",
    "expert_frequency": "expert_frequency",
    "ean_sum": "ean_sum",
    "ean_mean": "ean_mean",
    "weighted_ean_sum": "weighted_ean_sum",
    "weighted_frequency_sum": "weighted_expert_frequency_sum",
    "weighted_expert_frequency_sum": "weighted_expert_frequency_sum",
    "max_activations": "max_activations",
}


@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
@pytest.mark.parametrize("n", [1, 3, 5])
def test_selection_matches_per_layer_argsort_with_ties(method, n):
    metrics = hand_metrics({METHOD_KEYS[method]: TIED_ROWS})
    keep = select_experts(metrics, PruneConfig(method=method, n_experts_to_prune=n))
    assert sorted(keep) == [0, 1, 2]
    for layer, row in enumerate(TIED_ROWS):
        assert keep[layer].dtype == torch.int64
        assert keep[layer].tolist() == argsort_reference(row, n)


def test_tie_rule_keeps_lowest_index():
    metrics = hand_metrics({"reap": [[1.0] * E]})
    assert select_experts(metrics, PruneConfig(compression_ratio=0.5))[0].tolist() == [0, 1, 2, 3]


def test_ratio_budget_is_int_e_times_r():
    metrics = hand_metrics({"reap": [list(range(E))]})
    assert select_experts(metrics, PruneConfig(compression_ratio=0.3))[0].numel() == E - int(E * 0.3)  # int(2.4) = 2
    assert select_experts(metrics, PruneConfig(compression_ratio=0.99))[0].tolist() == [7]


def test_expert_proba_and_random():
    metrics = hand_metrics({"expert_frequency": TIED_ROWS})
    by_proba = select_experts(metrics, PruneConfig(method="expert_proba", n_experts_to_prune=3))
    by_frequency = select_experts(metrics, PruneConfig(method="frequency", n_experts_to_prune=3))
    assert all(torch.equal(by_proba[layer], by_frequency[layer]) for layer in by_frequency)
    first = select_experts(metrics, PruneConfig(method="random", n_experts_to_prune=4, seed=7))
    again = select_experts(metrics, PruneConfig(method="random", n_experts_to_prune=4, seed=7))
    other = select_experts(metrics, PruneConfig(method="random", n_experts_to_prune=4, seed=8))
    assert all(torch.equal(first[layer], again[layer]) for layer in first)
    assert any(not torch.equal(first[layer], other[layer]) for layer in first)
    assert all(first[layer].numel() == 4 for layer in first)
    # seeded uniform scores, removed lowest first
    scores = torch.rand((3, E), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for layer in first:
        assert first[layer].tolist() == argsort_reference(scores[layer].tolist(), 4)


def test_generic_key_and_ean_ca_from_upstream_file():
    metrics = upstream_metrics([0, 1], E, seed=3)
    metrics[0]["reap_l2"] = torch.arange(E, dtype=torch.float32)
    metrics[1]["reap_l2"] = torch.arange(E, 0, -1, dtype=torch.float32)
    keep = select_experts(metrics, PruneConfig(method="reap_l2", n_experts_to_prune=2))
    assert keep[0].tolist() == [2, 3, 4, 5, 6, 7] and keep[1].tolist() == [0, 1, 2, 3, 4, 5]
    keep = select_experts(metrics, PruneConfig(method="ean_ca", n_experts_to_prune=3))
    for layer in (0, 1):
        norms = metrics[layer]["routed_characteristic_activation"].norm(dim=-1).tolist()
        assert keep[layer].tolist() == argsort_reference(norms, 3)
    with pytest.raises(UnknownMethodError, match="unknown prune method 'nope'"):
        select_experts(metrics, PruneConfig(method="nope", n_experts_to_prune=1))
    with pytest.raises(UnknownMethodError, match="routed_characteristic_activation"):
        select_experts(hand_metrics({"reap": TIED_ROWS}), PruneConfig(method="ean_ca", n_experts_to_prune=1))


# --- budgets and bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(SelectionError, match="outside \\(0, 1\\)"):
        select_experts(hand_metrics({"reap": TIED_ROWS}), PruneConfig(compression_ratio=ratio))


def test_count_out_of_range_and_top_k():
    metrics = hand_metrics({"reap": TIED_ROWS})
    with pytest.raises(SelectionError, match="n_experts_to_prune=8 is out of range: the model has 8 experts"):
        select_experts(metrics, PruneConfig(n_experts_to_prune=8))
    with pytest.raises(SelectionError, match="n_experts_to_prune=7 is out of range.*must be between 1 and 6"):
        select_experts(metrics, PruneConfig(n_experts_to_prune=7), top_k=2)
    with pytest.raises(SelectionError, match="leaves 1 per layer, fewer than the model's top-k of 2"):
        select_experts(metrics, PruneConfig(compression_ratio=0.875), top_k=2)  # int(8 * 0.875) = 7
    with pytest.raises(SelectionError, match="leaves 2 per layer, fewer than min_experts_per_layer=3"):
        select_experts(metrics, PruneConfig(n_experts_to_prune=6, min_experts_per_layer=3))
    with pytest.raises(SelectionError, match="not both"):
        select_experts(metrics, PruneConfig(compression_ratio=0.5, n_experts_to_prune=2))
    assert select_experts(metrics, PruneConfig())[0].numel() == E // 2  # the config's default ratio, 0.5
    assert select_experts(metrics, PruneConfig(n_experts_to_prune=6), top_k=2)[0].numel() == 2


# --- group-limited routing ------------------------------------------------------------------------


def test_groups_remove_the_same_number_per_group(caplog):
    rows = [[5, 1, 2, 3, 9, 8, 7, 0.5], [1, 1, 1, 1, 0, 0, 0, 0]]
    metrics = hand_metrics({"reap": rows})
    keep = select_experts(metrics, PruneConfig(n_experts_to_prune=4), groups=(2, 2), top_k=2)
    # group 0 = experts 0-3, group 1 = experts 4-7: the two lowest of each group go
    assert keep[0].tolist() == [0, 3, 4, 5]
    assert keep[1].tolist() == [0, 1, 4, 5]
    with caplog.at_level(logging.WARNING):
        keep = select_experts(metrics, PruneConfig(n_experts_to_prune=3), groups=(2, 2), top_k=2)
    assert "instead of 3" in caplog.text
    assert keep[0].tolist() == [0, 2, 3, 4, 5, 6]  # 2 removed: one per group
    with pytest.raises(SelectionError, match="must be between 2 and 4: with 2 routing groups"):
        select_experts(metrics, PruneConfig(n_experts_to_prune=6), groups=(2, 2), top_k=1)


@pytest.mark.parametrize("num_experts, top_k, groups", [
    (8, 2, None), (8, 2, (2, 2)), (8, 2, (2, 1)), (16, 4, (4, 2)), (16, 8, (4, 1)), (64, 6, (8, 3)), (6, 6, None),
])
def test_the_count_range_named_is_the_range_accepted(num_experts, top_k, groups):
    """Every count the refusal names as allowed passes the group and top-k rules, and the counts just outside are
    refused: a user who follows the message is never refused again."""
    from reap_fast.prune.select import uniform_prune_count

    accepted, message = [], ""
    for count in range(1, num_experts + 2):
        try:
            experts_to_prune(num_experts, PruneConfig(n_experts_to_prune=count), top_k, groups)
            uniform_prune_count(num_experts, count, top_k, groups)
        except SelectionError as refused:
            assert "out of range" in str(refused), refused  # only the range check refuses a count
            message = str(refused)
            continue
        accepted.append(count)
    if not accepted:
        assert "none (it cannot be pruned)" in message
        return
    assert accepted == list(range(accepted[0], accepted[-1] + 1))  # one interval
    assert f"must be between {accepted[0]} and {accepted[-1]}" in message


# --- super experts ---------------------------------------------------------------------------------


def test_super_experts_match_upstream_definition():
    experts = 64  # upstream's 99.5 % quantile needs a few hundred values to single out two outliers
    rows = [[1.0] * experts for _ in range(4)]
    rows[0][5] = 500.0  # outlier in the first 75 % of the layers
    rows[3][6] = 400.0  # outlier in the last 25 %
    reap = [[float(e) for e in range(experts)] for _ in range(4)]
    metrics = hand_metrics({"max_activations": rows, "reap": reap}, num_experts=experts)
    values = torch.tensor(rows).flatten()
    threshold = max(torch.quantile(values, 0.995).item(), values.max().item() / 10)
    assert 1.0 < threshold < 400.0
    assert super_expert_mask(metrics).nonzero().tolist() == [[0, 5]]
    assert super_expert_mask(metrics, include_last_layers=True).nonzero().tolist() == [[0, 5], [3, 6]]
    plain = select_experts(metrics, PruneConfig(n_experts_to_prune=8))
    assert 5 not in plain[0].tolist() and 6 not in plain[3].tolist()
    kept = select_experts(metrics, PruneConfig(n_experts_to_prune=8, preserve_super_experts=True))
    assert 5 in kept[0].tolist() and 6 not in kept[3].tolist() and kept[0].numel() == 56
    kept = select_experts(metrics, PruneConfig(n_experts_to_prune=8, preserve_outliers=True))
    assert 5 in kept[0].tolist() and 6 in kept[3].tolist()
    with pytest.raises(SelectionError, match="only one"):
        select_experts(metrics, PruneConfig(n_experts_to_prune=3, preserve_outliers=True, preserve_super_experts=True))


# --- slicing every family --------------------------------------------------------------------------


def _removed_for(position: int, ratio: float = 0.5) -> list[int]:
    # the same number from each half, so that DeepSeek's two routing groups lose the same number
    if ratio == 0.25:
        return [1, 6] if position % 2 == 0 else [2, 5]
    return [1, 3, 4, 6] if position % 2 == 0 else [0, 2, 5, 7]


def make_unroutable(model, removed: dict[int, list[int]]) -> None:
    """Make the experts ``removed[layer]`` impossible to route to, for every token.

    * Routers with a bias (sigmoid routers' ``e_score_correction_bias``, which only selects experts;
      gpt-oss's router ``bias``, whose softmax runs over the chosen logits): the bias of those experts
      is set to -1e4, so they never enter the top-k and never enter any weight.
    * Softmax routers without a bias: a constant, positive hidden channel ``c`` is built: every
      embedding gets ``h_c = 10`` and every module writing to the residual stream (each Linear with
      ``hidden_size`` outputs, and the experts' ``down_proj`` rows) writes 0 there, so ``h_c`` stays 10
      and the normed router input ``x_c = 10 / rms(h)`` is positive (about 8, as the other channels are
      small). The removed experts' router rows become ``-100 * e_c``: logits of about -800, whose
      softmax probability is exactly 0 in fp32 (so even non-renormalising routers such as OLMoE's are
      unchanged); the kept rows get 0 at ``c`` so they still route on the token content.
    """
    adapter = get_adapter(model.config)
    layers = find_moe_layers(model)
    bias_name = next((n for n in ("e_score_correction_bias", "bias") if n in adapter.router_tensors), None)
    with torch.no_grad():
        if bias_name is not None:
            for layer in layers:
                getattr(layer.router, bias_name)[removed[layer.layer_index]] = -1e4
            return
        hidden, channel = model.config.get_text_config().hidden_size, 0
        model.get_input_embeddings().weight[:, channel] = 10.0
        for module in model.model.layers.modules():
            if isinstance(module, nn.Linear) and module.out_features == hidden:
                module.weight[channel] = 0
                if module.bias is not None:
                    module.bias[channel] = 0
        for layer in layers:
            down = layer.experts.down_proj  # (E, hidden, intermediate); Llama-4: (E, intermediate, hidden)
            assert down.shape[1] != down.shape[2], "ambiguous down_proj layout"
            if down.shape[1] == hidden:
                down[:, channel, :] = 0
            else:
                down[:, :, channel] = 0
            weight = layer.router.weight
            weight[:, channel] = 0
            weight[removed[layer.layer_index]] = 0
            weight[removed[layer.layer_index], channel] = -100.0


def metrics_removing(removed: dict[int, list[int]]) -> dict:
    """Metrics whose reap score is lowest for the experts ``removed`` (and varied for the others)."""
    rows, layers = [], sorted(removed)
    for layer in layers:
        row = [2.0 + 0.1 * e for e in range(E)]
        for e in removed[layer]:
            row[e] = 0.01 * (e + 1)
        rows.append(row)
    return hand_metrics({"reap": rows}, layers=layers)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_pruned_family_loads_generates_and_matches(family, ratio, tmp_path):
    model = build_model(tiny_family_config(family, num_experts=E, top_k=2), seed=1)
    layers = [layer.layer_index for layer in find_moe_layers(model)]
    removed = {layer: _removed_for(pos, ratio) for pos, layer in enumerate(layers)}
    make_unroutable(model, removed)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11, 64, 128]])
    with torch.no_grad():
        reference = model(ids).logits
    save_checkpoint(model, byte_tokenizer(), tmp_path / "orig")
    save_metrics(metrics_removing(removed), tmp_path / "obs.pt")

    out = prune_checkpoint(tmp_path / "orig", tmp_path / "obs.pt", tmp_path / "pruned",
                           PruneConfig(compression_ratio=ratio))
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference, rtol=1e-5, atol=1e-5)
        generated = pruned.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)

    adapter = get_adapter(pruned.config)
    text = text_config(pruned.config)
    kept = E - len(removed[layers[0]])
    assert getattr(text, adapter.num_experts_key) == kept
    assert getattr(text, adapter.top_k_key) == 2
    for layer in find_moe_layers(pruned):
        assert layer.num_experts == kept and layer.experts.num_experts == kept
        assert layer.router.weight.shape[0] == kept and layer.router.num_experts == kept
        for name in adapter.router_tensors:
            shape = tuple(router_tensor(layer.router, name).shape)
            assert shape[0] == kept or shape == (1, kept), (name, shape)  # ERNIE's moe_statics bias is (1, E)
    report = json.loads((out / "pruned_experts.json").read_text())
    assert report["method"] == "reap" and report["compression_ratio"] == ratio
    assert {int(k): v["removed"] for k, v in report["layers"].items()} == removed
    assert (out / "reap_args.yaml").is_file() and (out / "tokenizer.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_router_tensor_in_the_checkpoints_own_spelling_is_sliced(tmp_path, caplog):
    """ERNIE-4.5 checkpoints on the Hub keep the correction bias at ``mlp.moe_statics.*`` (transformers moves
    it under ``mlp.gate`` at load time): the writer slices it there, keeps that spelling, and the pruned
    folder loads to the same logits as the source with the removed experts unroutable (written from the
    source's own files, without falling back to loading the weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = build_model(tiny_family_config("ernie4_5_moe", num_experts=E, top_k=2), seed=3)
    layers = [layer.layer_index for layer in find_moe_layers(model)]
    removed = {layer: _removed_for(pos) for pos, layer in enumerate(layers)}
    make_unroutable(model, removed)
    with torch.no_grad():
        for layer in find_moe_layers(model):  # a bias that differs per expert, so a wrong slice shows;
            bias = torch.linspace(0.0, 0.07, E)  # the removed experts' stays out of every top-k
            bias[removed[layer.layer_index]] = -1.0
            router_tensor(layer.router, "moe_statics.e_score_correction_bias").copy_(bias[None])
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11]])
    with torch.no_grad():
        reference = model(ids).logits
    source = save_checkpoint(model, byte_tokenizer(), tmp_path / "orig")
    hub_names = {}  # transformers saves the Hub spelling back (its load-time rename is undone on save)
    for shard in sorted(source.glob("*.safetensors")):
        hub_names.update({name: t for name, t in load_file(shard).items() if ".mlp.moe_statics." in name})
    assert len(hub_names) == len(layers)
    save_metrics(metrics_removing(removed), tmp_path / "obs.pt")

    with caplog.at_level(logging.WARNING):
        out = prune_checkpoint(source, tmp_path / "obs.pt", tmp_path / "pruned", PruneConfig(compression_ratio=0.5))
    assert "save_pretrained" not in caplog.text  # written from the source's own files, no weight loaded
    written = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            written.update({name: handle.get_tensor(name) for name in handle.keys() if name in hub_names})
    assert sorted(written) == sorted(hub_names)
    for name, original in hub_names.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        kept = [e for e in range(E) if e not in removed[layer]]
        torch.testing.assert_close(written[name], original[:, kept], rtol=0, atol=0)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference, rtol=1e-5, atol=1e-5)


def test_prune_to_top_k_keeps_config_consistent():
    model = build_model(tiny_family_config("mixtral", num_experts=E, top_k=2), seed=0)
    keep = {layer.layer_index: torch.tensor([3, 6]) for layer in find_moe_layers(model)}
    prune_model(model, keep)
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    assert all(layer.block.top_k == 2 for layer in find_moe_layers(model))
    model(torch.tensor([[1, 2, 3]]))


def test_slicing_gathers_the_kept_rows():
    model = build_model(tiny_family_config("gpt_oss", num_experts=E, top_k=2), seed=0)
    layer = find_moe_layers(model)[0]
    before = {n: t.detach().clone() for n, t in list(layer.experts.named_parameters()) + list(layer.router.named_parameters())}
    keep = {l.layer_index: torch.tensor([6, 1, 4]) for l in find_moe_layers(model)}
    prune_model(model, keep)
    index = torch.tensor([1, 4, 6])
    for name, tensor in list(layer.experts.named_parameters()) + list(layer.router.named_parameters()):
        assert torch.equal(tensor, before[name][index]), name


def test_bad_keep_indices_and_uneven_counts():
    model = build_model(tiny_family_config("qwen3_moe", num_experts=E, top_k=2), seed=0)
    with pytest.raises(KeepIndexError, match="layers \\[0\\], but the model's MoE layers are \\[0, 1\\]"):
        prune_model(model, {0: torch.tensor([0, 1])})
    with pytest.raises(KeepIndexError, match="fewer than the model's top-k of 2"):
        prune_model(model, {0: torch.tensor([0]), 1: torch.tensor([0])})
    with pytest.raises(KeepIndexError, match="in \\[0, 8\\)"):
        prune_model(model, {0: torch.tensor([0, 8]), 1: torch.tensor([0, 1])})
    with pytest.raises(UnevenPruningError, match="could not be loaded again"):
        prune_model(model, {0: torch.tensor([0, 1, 2]), 1: torch.tensor([0, 1])})
    assert expert_counts(model) == {0: E, 1: E}  # refused before any layer was sliced


# --- checkpoints, upstream files, bad input --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model = build_model(tiny_family_config("qwen3_moe", num_experts=E, top_k=2), seed=0)
    return save_checkpoint(model, byte_tokenizer(), folder)


def test_prunes_from_upstream_observation_file(tiny_checkpoint, tmp_path):
    data = upstream_metrics([0, 1], E, seed=5)  # with upstream's extra merging keys
    torch.save(data, tmp_path / "observations_1024_cosine.pt")
    out = prune_checkpoint(tiny_checkpoint, tmp_path / "observations_1024_cosine.pt", tmp_path / "out",
                           PruneConfig(method="reap", n_experts_to_prune=3))
    report = json.loads((out / "pruned_experts.json").read_text())
    for layer in (0, 1):
        expected = argsort_reference(data[layer]["reap"].tolist(), 3)
        assert report["layers"][str(layer)]["kept"] == expected
    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == 5


def test_upstream_pruning_code_reads_our_file(tmp_path):
    """Upstream ``prune.prune`` does ``torch.load`` then ``torch.topk(data[layer][key], n, largest=False)``."""
    ours = upstream_metrics([0, 1, 2], E, seed=9, merging_keys=False)
    save_metrics(ours, tmp_path / "obs.pt")
    data = torch.load(tmp_path / "obs.pt", weights_only=False)
    assert set(data) == {0, 1, 2}
    for method, key in (("reap", "reap"), ("frequency", "expert_frequency"), ("ean_sum", "ean_sum")):
        keep = select_experts(load_metrics(tmp_path / "obs.pt"), PruneConfig(method=method, n_experts_to_prune=3))
        for layer in data:
            data[layer]["expert_proba"] = data[layer]["expert_frequency"] / data[layer]["total_tokens"]
            values = data[layer][key]
            _, pruned = torch.topk(values, 3, largest=False)
            if torch.unique(values).numel() == values.numel():  # upstream's choice among ties is unspecified
                assert sorted(set(range(E)) - set(pruned.tolist())) == keep[layer].tolist()


def test_metrics_of_another_model(tiny_checkpoint, tmp_path):
    save_metrics(hand_metrics({"reap": TIED_ROWS}), tmp_path / "layers.pt")  # layers 0, 1, 2
    with pytest.raises(MetricsMismatchError, match="metrics file of another model: it has MoE layers \\[0, 1, 2\\], the model has \\[0, 1\\]"):
        prune_checkpoint(tiny_checkpoint, tmp_path / "layers.pt", tmp_path / "out", PruneConfig(compression_ratio=0.5))
    save_metrics(hand_metrics({"reap": [[1.0] * 16] * 2}, num_experts=16), tmp_path / "experts.pt")
    with pytest.raises(MetricsMismatchError, match="layer 0: 16 in the file vs 8 in the model"):
        prune_checkpoint(tiny_checkpoint, tmp_path / "experts.pt", tmp_path / "out", PruneConfig(compression_ratio=0.5))
    assert not (tmp_path / "out").exists()


def test_prune_checkpoint_reads_the_model_config_once(tiny_checkpoint, tmp_path, monkeypatch):
    from reap_fast.models import loading

    read, real = [], loading.load_config
    monkeypatch.setattr(loading, "load_config", lambda path: read.append(str(path)) or real(path))
    save_metrics(hand_metrics({"reap": TIED_ROWS[:2]}), tmp_path / "obs.pt")
    out = prune_checkpoint(tiny_checkpoint, tmp_path / "obs.pt", tmp_path / "out", PruneConfig(compression_ratio=0.25))
    assert read == [str(tiny_checkpoint)]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == 6


def test_output_directory_holding_a_model(tiny_checkpoint, tmp_path):
    save_metrics(hand_metrics({"reap": TIED_ROWS[:2]}), tmp_path / "obs.pt")
    out = prune_checkpoint(tiny_checkpoint, tmp_path / "obs.pt", tmp_path / "out", PruneConfig(compression_ratio=0.25))
    with pytest.raises(OutputExistsError, match="already holds a model"):
        prune_checkpoint(tiny_checkpoint, tmp_path / "obs.pt", out, PruneConfig(compression_ratio=0.5))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        prune_checkpoint(tiny_checkpoint, tmp_path / "obs.pt", tmp_path / "busy", PruneConfig(compression_ratio=0.5))
    out = prune_checkpoint(tiny_checkpoint, tmp_path / "obs.pt", out,
                           PruneConfig(compression_ratio=0.5, overwrite=True))
    assert json.loads((out / "pruned_experts.json").read_text())["compression_ratio"] == 0.5
    assert AutoModelForCausalLM.from_pretrained(out).config.num_experts == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "obs.pt", "out"]


def test_equality_check_detects_routed_experts():
    """Negative control for the test above: without the construction, removing the same experts changes the logits."""
    model = build_model(tiny_family_config("olmoe", num_experts=E, top_k=2), seed=1)
    removed = {layer.layer_index: _removed_for(pos) for pos, layer in enumerate(find_moe_layers(model))}
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11, 64, 128]])
    with torch.no_grad():
        reference = model(ids).logits
        prune_model(model, {layer: torch.tensor(sorted(set(range(E)) - set(r))) for layer, r in removed.items()})
        assert (model(ids).logits - reference).abs().max() > 1e-3
