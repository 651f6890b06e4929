"""Key decisions end to end through the command lines, checked on the files they write.

* group-limited routing (``topk_group < n_group``, an unbalanced correction bias): every group loses the
  same number of experts, the pruned checkpoint's router rows and logits are the kept ones;
* super experts survive pruning (native ``--preserve-super-experts`` and the drop-in's
  ``--perserve_super_experts``) while they are removed without the flag;
* ``--renormalize_router_weights`` in the drop-in changes g where the model renormalises;
* ``--global`` is refused in one line before any work;
* ``kill -9`` after a periodic checkpoint, then ``--resume``, gives the uninterrupted run's numbers.

Expected selections are computed here by hand from the observation files (plain Python sorting).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from reap_fast.cli import main as cli_main
from reap_lab.families_tiny import tiny_family_config
from reap_fast.metrics import METRIC_DTYPES, load_metrics
from reap_fast.prune.__main__ import main as dropin_main
from reap_lab.tiny import build_model, byte_tokenizer, save_checkpoint

NUM_GROUPS, GROUP_SIZE = 4, 4
OBSERVE = ["--model-max-length", "64", "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--engine",
           "reference"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [f"Entry {i}: " + "sphinx of black quartz, judge my vow; " * (2 + i % 3) + str(i * 13) for i in range(16)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """The loaded model's parameters and buffers (fused expert tensors, whatever the file layout)."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def soften_routers(model, generator: torch.Generator, scale: float = 0.2) -> None:
    """Small router logits: the softmax is spread, so renormalising visibly changes g."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.gate"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * scale)


def kept_by_layer(folder: Path) -> dict[int, list[int]]:
    report = json.loads((Path(folder) / "pruned_experts.json").read_text())
    return {int(layer): entry["kept"] for layer, entry in report["layers"].items()}


def lowest_first(scores: list[float], indices: list[int]) -> list[int]:
    """``indices`` ordered for removal: lowest score first; equal scores -> the higher index goes first."""
    return sorted(indices, key=lambda i: (scores[i], -i))


# --- group-limited routing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grouped_checkpoint(tmp_path_factory):
    """DeepSeek-V3, 16 experts in 4 groups, 2 groups routed per token; group 3's correction bias keeps it idle."""
    config = tiny_family_config("deepseek_v3", num_experts=16, top_k=2)
    config.n_group, config.topk_group = NUM_GROUPS, 2
    model = build_model(config, seed=11)
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(module, "e_score_correction_bias"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2)
                bias = torch.randn(16, generator=generator) * 0.1
                bias[12:] = -1.0  # group 3 can never be among the 2 best groups
                module.e_score_correction_bias.copy_(bias)
    return save_checkpoint(model, byte_tokenizer(), tmp_path_factory.mktemp("grouped") / "model")


def expected_group_keep(metrics, per_group: int) -> dict[int, list[int]]:
    keep = {}
    for layer, values in metrics.items():
        scores = values["reap"].tolist()
        kept = []
        for group in range(NUM_GROUPS):
            members = list(range(group * GROUP_SIZE, (group + 1) * GROUP_SIZE))
            kept += sorted(lowest_first(scores, members)[per_group:])
        keep[layer] = sorted(kept)
    return keep


def check_grouped_pruning(checkpoint: Path, pruned: Path, metrics) -> None:
    kept = kept_by_layer(pruned)
    assert kept == expected_group_keep(metrics, 1)
    for layer, values in metrics.items():
        ungrouped = sorted(lowest_first(values["reap"].tolist(), list(range(16)))[4:])
        assert ungrouped != kept[layer], "precondition: ignoring the groups would choose other experts"
        assert [sum(1 for e in kept[layer] if e // GROUP_SIZE == g) for g in range(NUM_GROUPS)] == [3, 3, 3, 3]
    original, sliced = weights_of(checkpoint), weights_of(pruned)
    for layer, experts in kept.items():
        for name in ("weight", "e_score_correction_bias"):
            key = f"model.layers.{layer}.mlp.gate.{name}"
            assert torch.equal(sliced[key], original[key][experts]), key
    config = json.loads((pruned / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (12, NUM_GROUPS, 2)
    # the pruned model's router logits are the original's at the kept experts (first MoE layer: same input)
    first = min(kept)
    logits = {}
    for name, folder in (("original", checkpoint), ("pruned", pruned)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        router = model.model.layers[first].mlp.gate
        handle = router.register_forward_hook(lambda module, args, out, name=name: logits.__setitem__(name, out[0]))
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 80, 101, 33, 7, 240]]))
        handle.remove()
    torch.testing.assert_close(logits["pruned"], logits["original"][:, kept[first]], rtol=0, atol=0)


def test_native_cli_prunes_every_routing_group_alike(grouped_checkpoint, dataset, tmp_path):
    obs = tmp_path / "obs.pt"
    assert cli_main(["observe", "--model", str(grouped_checkpoint), "--dataset", f"{dataset}:4", *OBSERVE,
                     "--output", str(obs)]) == 0
    metrics = load_metrics(obs)
    for values in metrics.values():
        assert values["expert_frequency"][12:].sum() == 0  # group 3 idle
    pruned = tmp_path / "pruned"
    assert cli_main(["prune", "--model", str(grouped_checkpoint), "--metrics", str(obs), "--output", str(pruned),
                     "--n-experts-to-prune", "4", "--method", "reap"]) == 0
    check_grouped_pruning(grouped_checkpoint, pruned, metrics)


def dropin_argv(checkpoint, dataset, *extra):
    return ["--model_name", str(checkpoint), "--dataset_name", dataset, "--seed", "7", "--batches_per_category", "2",
            "--model_max_length", "32", "--batch_size", "2", "--record_pruning_metrics_only", "true",
            "--output_file_name", "obs.pt", "--do_eval", "false", *extra]


def only(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def test_dropin_prunes_every_routing_group_alike(grouped_checkpoint, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = dropin_argv(grouped_checkpoint, dataset, "--prune_method", "reap", "--n_experts_to_prune", "4")
    assert dropin_main(argv) == 0
    metrics = load_metrics(only("artifacts/*/*/all/obs.pt", tmp_path))
    check_grouped_pruning(grouped_checkpoint, only("artifacts/*/*/pruned_models/*", tmp_path), metrics)


# --- super experts -------------------------------------------------------------------------------------------

SUPER_LAYER, SUPER_EXPERT = 0, 5


@pytest.fixture(scope="module")
def super_checkpoint(tmp_path_factory):
    """Qwen3-MoE whose layer-0 expert 5 writes huge activations (a super expert) but is rarely routed."""
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=2), seed=21)
    soften_routers(model, torch.Generator().manual_seed(22))
    with torch.no_grad():
        mlp = model.model.layers[SUPER_LAYER].mlp
        mlp.experts.down_proj[SUPER_EXPERT] *= 40.0
        mlp.gate.weight[SUPER_EXPERT] *= 0.3  # logits near 0 while the others spread: chosen less often
    return save_checkpoint(model, byte_tokenizer(), tmp_path_factory.mktemp("super") / "model")


def super_experts_by_hand(metrics) -> set[tuple[int, int]]:
    """Upstream's rule: max_activations above max(99.5th percentile, max / 10); the last quarter of layers exempt."""
    layers = sorted(metrics)
    values = torch.stack([metrics[layer]["max_activations"].double() for layer in layers])
    flat = sorted(values.flatten().tolist())
    position = 0.995 * (len(flat) - 1)  # linear interpolation, as numpy / torch quantile
    low = int(position)
    quantile = flat[low] + (flat[min(low + 1, len(flat) - 1)] - flat[low]) * (position - low)
    threshold = max(quantile, flat[-1] / 10)
    eligible = layers[: int(len(layers) * 0.75)]
    return {(layer, e) for row, layer in enumerate(layers) if layer in eligible
            for e, value in enumerate(values[row].tolist()) if value > threshold}


def check_super_expert_kept(checkpoint: Path, metrics, with_flag: Path, without_flag: Path) -> None:
    assert (SUPER_LAYER, SUPER_EXPERT) in super_experts_by_hand(metrics)
    scores = metrics[SUPER_LAYER]["weighted_expert_frequency_sum"].tolist()
    assert SUPER_EXPERT in lowest_first(scores, list(range(8)))[:4], "precondition: its score alone would remove it"
    assert SUPER_EXPERT not in kept_by_layer(without_flag)[SUPER_LAYER]
    kept = kept_by_layer(with_flag)[SUPER_LAYER]
    assert SUPER_EXPERT in kept and len(kept) == 4
    original, pruned = weights_of(checkpoint), weights_of(with_flag)
    row = kept.index(SUPER_EXPERT)
    for name in ("experts.down_proj", "experts.gate_up_proj", "gate.weight"):
        key = f"model.layers.{SUPER_LAYER}.mlp.{name}"
        assert torch.equal(pruned[key][row], original[key][SUPER_EXPERT]), key


def test_native_cli_keeps_super_experts(super_checkpoint, dataset, tmp_path):
    obs = tmp_path / "obs.pt"
    assert cli_main(["observe", "--model", str(super_checkpoint), "--dataset", f"{dataset}:4", *OBSERVE,
                     "--output", str(obs)]) == 0
    common = ["prune", "--model", str(super_checkpoint), "--metrics", str(obs), "--compression-ratio", "0.5",
              "--method", "weighted_frequency_sum"]
    assert cli_main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert cli_main([*common, "--output", str(tmp_path / "kept"), "--preserve-super-experts"]) == 0
    check_super_expert_kept(super_checkpoint, load_metrics(obs), tmp_path / "kept", tmp_path / "plain")


def test_dropin_keeps_super_experts(super_checkpoint, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = dropin_argv(super_checkpoint, dataset, "--prune_method", "weighted_frequency_sum", "--compression_ratio", "0.5")
    assert dropin_main(argv) == 0
    assert dropin_main([*argv, "--perserve_super_experts", "true"]) == 0
    metrics = load_metrics(only("artifacts/*/*/all/obs.pt", tmp_path))
    check_super_expert_kept(super_checkpoint, metrics, only("artifacts/*/*/pruned_models/*perserve_super*", tmp_path),
                            only("artifacts/*/*/pruned_models/weighted_frequency_sum-renorm*", tmp_path))


# --- renormalisation flag in the drop-in ---------------------------------------------------------------------


def gate_total(metrics) -> dict[int, tuple[float, int]]:
    """Per layer: (sum of g over all counted pairs, counted tokens). Equal when every token's g sums to 1."""
    return {layer: (float(v["weighted_expert_frequency_sum"].sum()), int(v["total_tokens"])) for layer, v in metrics.items()}


def dropin_observation(checkpoint, dataset, folder: Path, flag: str, monkeypatch):
    folder.mkdir()
    monkeypatch.chdir(folder)
    argv = dropin_argv(checkpoint, dataset, "--prune_method", "reap", "--run_observer_only", "true",
                       "--renormalize_router_weights", flag)
    assert dropin_main(argv) == 0
    return load_metrics(only("artifacts/*/*/all/obs.pt", folder))


@pytest.fixture(scope="module")
def renormalising_checkpoint(tmp_path_factory):
    model = build_model(tiny_family_config("qwen3_moe", num_experts=8, top_k=2), seed=31)
    soften_routers(model, torch.Generator().manual_seed(32))
    assert model.config.norm_topk_prob is True
    return save_checkpoint(model, byte_tokenizer(), tmp_path_factory.mktemp("renorm") / "model")


def test_dropin_renormalize_false_changes_the_observation(renormalising_checkpoint, dataset, tmp_path, monkeypatch):
    on = dropin_observation(renormalising_checkpoint, dataset, tmp_path / "on", "true", monkeypatch)
    off = dropin_observation(renormalising_checkpoint, dataset, tmp_path / "off", "false", monkeypatch)
    for layer in on:
        assert torch.equal(on[layer]["expert_frequency"], off[layer]["expert_frequency"])
        torch.testing.assert_close(on[layer]["ean_sum"], off[layer]["ean_sum"], rtol=1e-6, atol=0)
        g_on, tokens = gate_total(on)[layer]
        g_off, _ = gate_total(off)[layer]
        assert g_on == pytest.approx(tokens, rel=1e-5)  # renormalised: each token's two g sum to 1
        assert g_off < 0.9 * tokens  # the raw softmax of 2 of 8 experts
        assert (off[layer]["reap"] <= on[layer]["reap"] + 1e-6).all() and (off[layer]["reap"] < on[layer]["reap"]).any()


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_dropin_follows_upstreams_renormalisation_rule(family, dataset, tmp_path, monkeypatch):
    """Upstream reads only config.norm_topk_prob: Mixtral (no such key) and OLMoE (False) get the raw softmax."""
    from gate_table import UPSTREAM_RENORMALISED, renormalised

    model = build_model(tiny_family_config(family, num_experts=8, top_k=2), seed=41)
    soften_routers(model, torch.Generator().manual_seed(42))
    checkpoint = save_checkpoint(model, byte_tokenizer(), tmp_path / "model")
    metrics = dropin_observation(checkpoint, dataset, tmp_path / "run", "true", monkeypatch)
    expect_renormalised = renormalised(UPSTREAM_RENORMALISED, family, model.config, True)
    assert expect_renormalised is False
    for g_sum, tokens in gate_total(metrics).values():
        assert g_sum < 0.9 * tokens, f"{family}: g was renormalised ({g_sum:.3f} over {tokens} tokens)"


# --- global ranking ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    return save_checkpoint(build_model(tiny_family_config("qwen3_moe"), seed=51), byte_tokenizer(),
                           tmp_path_factory.mktemp("plain") / "model")


def test_global_ranking_is_refused_in_one_line_before_any_work(plain_checkpoint, dataset, tmp_path, capsys,
                                                               monkeypatch):
    missing_metrics = tmp_path / "never-read.pt"  # refused before the observation file is even opened
    assert cli_main(["prune", "--model", str(plain_checkpoint), "--metrics", str(missing_metrics), "--output",
                     str(tmp_path / "pruned"), "--global", "--compression-ratio", "0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "global ranking" in err and "drop --global" in err
    assert not (tmp_path / "pruned").exists()

    assert cli_main(["run", "--model", str(plain_checkpoint), "--dataset", f"{dataset}:4", *OBSERVE, "--output",
                     str(tmp_path / "run"), "--global"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "global ranking" in err
    assert not list((tmp_path / "run").rglob("*.pt"))  # no calibration work was done

    monkeypatch.chdir(tmp_path)
    assert dropin_main(dropin_argv(plain_checkpoint, dataset, "--global_ranking", "true")) == 1
    assert "global ranking" in capsys.readouterr().err
    assert not list(tmp_path.glob("artifacts/**/*.pt"))


def test_run_honours_min_experts_per_layer_before_any_work(plain_checkpoint, dataset, tmp_path, capsys):
    """`run --min-experts-per-layer` was accepted and ignored; 50 % of 8 leaves 4 < 5: refused at once."""
    assert cli_main(["run", "--model", str(plain_checkpoint), "--dataset", f"{dataset}:4", *OBSERVE, "--output",
                     str(tmp_path / "run"), "--compression-ratio", "0.5", "--min-experts-per-layer", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "min_experts_per_layer=5" in err
    assert not list((tmp_path / "run").rglob("*.pt"))


# --- kill -9 after a periodic checkpoint -----------------------------------------------------------------------

# Runs `reap-fast observe` in a child that announces each periodic checkpoint and stalls after the second
# one, so that the parent can SIGKILL it at a known point (nothing of the child gets to clean up).
KILLABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from reap_fast.observe import checkpointing
    from reap_fast.cli import main

    marker = Path(sys.argv[1])
    original = checkpointing.ObservationCheckpointer.save

    def save(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        marker.write_text(str(self.saves))
        if self.saves == 2:
            time.sleep(600)  # killed here, in the middle of the run
        return path

    checkpointing.ObservationCheckpointer.save = save
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("layerwise", [False, True], ids=["in_memory", "layerwise"])
def test_kill_9_after_periodic_checkpoint_then_resume(plain_checkpoint, dataset, tmp_path, layerwise):
    argv = ["observe", "--model", str(plain_checkpoint), "--dataset", f"{dataset}:8", *OBSERVE, "--seed", "3"]
    argv += ["--layerwise"] if layerwise else []
    reference = tmp_path / "reference.pt"
    assert cli_main([*argv, "--output", str(reference)]) == 0

    output, marker = tmp_path / "obs.pt", tmp_path / "saves.txt"
    child = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), *argv, "--output", str(output),
                              "--checkpoint-every", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (marker.is_file() and marker.read_text() == "2"):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never wrote its second checkpoint"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    partial = Path(f"{output}.partial")
    assert (partial / "state.pt").is_file() and not output.exists()
    assert cli_main([*argv, "--output", str(output), "--resume"]) == 0
    resumed, expected = load_metrics(output), load_metrics(reference)
    assert sorted(resumed) == sorted(expected)
    for layer in expected:
        for key in METRIC_DTYPES:
            assert torch.equal(resumed[layer][key], expected[layer][key]), (layer, key)
    assert not partial.exists()
