"""The memory plan: sizes from the safetensors headers, in memory vs streamed chosen before loading ('auto'),
an explicit choice that cannot fit refused in one line, the same on a GPU; free memory injected."""

import json
import logging

import pytest
import torch
from reap_fast.cli import main as cli_main
from reap_fast.config import ObserveConfig
from reap_lab.tiny import make_tiny_checkpoint, tiny_qwen3_moe_config
from reap_fast.memory import GiB, MemoryBudget
from reap_fast.models.loading import load_config
from reap_fast.models.memory_plan import (
    HEADROOM,
    BatchShape,
    CheckpointSizes,
    MemoryPlanError,
    checkpoint_sizes,
    choose_path,
    observation_peaks,
)
from reap_fast.observe import planning
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("plan") / "tiny", seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 4) for i in range(8)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def test_sizes_come_from_the_headers(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    state = model.state_dict()
    sizes = checkpoint_sizes(checkpoint)
    tied = model.config.tie_word_embeddings
    assert sizes.model == sum(t.numel() * 4 for name, t in state.items() if not (tied and name == "lm_head.weight"))
    layer0 = sum(t.numel() * 4 for name, t in state.items() if name.startswith("model.layers.0."))
    assert sizes.layer == layer0
    assert sizes.embed == state["model.embed_tokens.weight"].numel() * 4
    assert checkpoint_sizes(checkpoint, torch.bfloat16).model == sizes.model // 2
    assert checkpoint_sizes(checkpoint.parent / "missing") is None


def _budget_between(peaks) -> MemoryBudget:
    """Free host memory where the streamed path fits and the in-memory one does not (by the headroom)."""
    return MemoryBudget(host_free=int(peaks["in memory"].host / (1 - HEADROOM)) - 1)


def test_auto_streams_only_when_the_model_does_not_fit(checkpoint):
    config = load_config(str(checkpoint))
    peaks = observation_peaks(checkpoint_sizes(checkpoint), config, BatchShape(2, 64), "cpu", 4)
    assert peaks["streamed"].host < peaks["in memory"].host
    assert choose_path(peaks, "auto", MemoryBudget(host_free=100 * GiB)).layerwise is False
    tight = _budget_between(peaks)
    plan = choose_path(peaks, "auto", tight)
    assert plan.layerwise is True and "layer streaming" in plan.reason and "more than fits" in plan.reason
    assert choose_path(peaks, True, MemoryBudget(host_free=100 * GiB)).layerwise is True
    with pytest.raises(MemoryPlanError, match=r"--no-layerwise.*drop --no-layerwise") as refused:
        choose_path(peaks, False, tight)
    assert "\n" not in str(refused.value)
    with pytest.raises(MemoryPlanError, match="even for layer streaming"):
        choose_path(peaks, "auto", MemoryBudget(host_free=peaks["streamed"].host - 1))
    with pytest.raises(MemoryPlanError, match="cannot read it: family says no"):
        choose_path(peaks, "auto", tight, stream_refusal="family says no")


def test_a_gpu_smaller_than_the_model_streams_to_it():
    """Qwen3-30B-A3B in bf16 (57 GiB) on a 24 GiB card: streamed without asking; --no-layerwise refused."""
    config = tiny_qwen3_moe_config(num_hidden_layers=48, hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                   num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    sizes = CheckpointSizes(model=57 * GiB, layer=int(1.2 * GiB), embed=int(0.6 * GiB), shard=4 * GiB)
    peaks = observation_peaks(sizes, config, BatchShape(1, 2048), "cuda:0", 2)
    card = MemoryBudget(device_free=24 * GiB, host_free=200 * GiB)
    assert peaks["in memory"].device > 57 * GiB and peaks["in memory"].host < 4 * GiB
    plan = choose_path(peaks, "auto", card)
    assert plan.layerwise and "accelerator memory" in plan.reason
    with pytest.raises(MemoryPlanError, match="accelerator memory"):
        choose_path(peaks, False, card)
    assert choose_path(peaks, "auto", MemoryBudget(device_free=80 * GiB, host_free=200 * GiB)).layerwise is False


def test_observe_cli_streams_by_itself_and_refuses_no_layerwise(checkpoint, dataset, tmp_path, monkeypatch, caplog,
                                                                 capsys):
    config = load_config(str(checkpoint))
    peaks = observation_peaks(checkpoint_sizes(checkpoint), config, BatchShape(2, 64), "cpu", 4)
    monkeypatch.setattr(planning, "free_memory", lambda device: _budget_between(peaks))
    argv = ["observe", "--model", str(checkpoint), "--dataset", f"{dataset}:3", "--model-max-length", "64",
            "--batch-size", "2", "--dtype", "float32", "--device", "cpu"]
    loaded = []
    monkeypatch.setattr("reap_fast.observe.runner.load_model", lambda *a, **k: loaded.append(a))
    with caplog.at_level(logging.INFO, logger="reap_fast"):
        assert cli_main(argv + ["--output", str(tmp_path / "auto.pt")]) == 0
    assert any("memory plan: layer streaming" in record.getMessage() for record in caplog.records)
    assert not loaded and (tmp_path / "auto.pt").is_file()
    capsys.readouterr()
    assert cli_main(argv + ["--output", str(tmp_path / "no.pt"), "--no-layerwise"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load the whole model (--no-layerwise)" in err
    assert not loaded and not (tmp_path / "no.pt").exists()


def test_plan_keeps_an_explicit_choice_and_a_hub_name(checkpoint):
    settings = ObserveConfig(device="cpu", dtype="float32", layerwise=False)
    roomy = MemoryBudget(host_free=100 * GiB)
    assert planning.plan_observation(checkpoint, load_config(str(checkpoint)), settings, roomy).layerwise is False
    assert ObserveConfig().layerwise == "auto"


def test_the_drop_in_prune_entry_follows_the_plan(checkpoint, dataset, tmp_path, monkeypatch, caplog):
    """``python -m reap_fast.prune`` (upstream's in-memory script) streams a model that does not fit, and the same
    kept experts come out as in memory; ``layerwise_prune`` always streams."""
    from reap_fast.prune.__main__ import main as prune_main

    argv = ["--model_name", str(checkpoint), "--dataset_name", str(dataset), "--prune_method", "reap",
            "--compression_ratio", "0.25", "--seed", "7", "--batches_per_category", "2", "--model_max_length", "32",
            "--batch_size", "2", "--record_pruning_metrics_only", "true", "--output_file_name", "obs.pt",
            "--do_eval", "false", "--dtype", "float32", "--device", "cpu"]
    config = load_config(str(checkpoint))
    peaks = observation_peaks(checkpoint_sizes(checkpoint), config, BatchShape(2, 32), "cpu", 4)
    kept = {}
    for name, budget in (("roomy", MemoryBudget(host_free=100 * GiB)), ("tight", _budget_between(peaks))):
        monkeypatch.setattr(planning, "free_memory", lambda device, budget=budget: budget)
        cwd = tmp_path / name
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="reap_fast"):
            assert prune_main(argv) == 0
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan:")]
        assert len(lines) == 1 and ("layer streaming" in lines[0]) == (name == "tight"), lines
        folder = next((cwd / "artifacts").rglob("pruned_experts.json"))
        kept[name] = json.loads(folder.read_text())["layers"]
    assert kept["roomy"] == kept["tight"]


def test_prune_refuses_a_peak_that_cannot_fit_before_loading(checkpoint, tmp_path, monkeypatch):
    """Pruning from the source's shards needs R + one shard; with less free memory it stops in one line, writing
    nothing; a prune that fits is unaffected."""
    from reap_fast.models.memory_plan import RUNTIME_BYTES
    from reap_fast.prune import PruneConfig, prune_checkpoint
    from test_disk_estimates import _moe_layers, _observation

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    metrics = _observation(tmp_path / "obs.pt", _moe_layers(model))
    monkeypatch.setattr("reap_fast.memory.free_memory", lambda device: MemoryBudget(host_free=RUNTIME_BYTES))
    with pytest.raises(MemoryPlanError, match="pruning from the source's shards needs about .* not enough memory"):
        prune_checkpoint(checkpoint, metrics, tmp_path / "out", PruneConfig(compression_ratio=0.5))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    monkeypatch.setattr("reap_fast.memory.free_memory", lambda device: MemoryBudget(host_free=100 * GiB))
    assert (prune_checkpoint(checkpoint, metrics, tmp_path / "out",
                             PruneConfig(compression_ratio=0.5)) / "config.json").is_file()
