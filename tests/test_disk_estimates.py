"""Disk estimates of what is really written: the pruned folder (kept fraction of every expert tensor, the rest
untouched) and its W4A16 form (bits and group size), within a few percent, not the source's size."""

import collections
import shutil

import pytest
import torch
from reap_fast.fileio import size_on_disk
from reap_lab.families_tiny import tiny_family_config
from reap_lab.tiny import build_model, byte_tokenizer, make_tiny_checkpoint, random_observation, save_checkpoint
from reap_fast.metrics import save_metrics
from reap_fast.models.disk_estimate import HEADER_BYTES, side_files_bytes, written_bytes
from reap_fast.models.loading import load_config
from reap_fast.preflight import weights_bytes
from reap_fast.prune import PruneConfig, prune_checkpoint, pruned_size

SHAPE = dict(hidden_size=128, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _observation(path, counts: dict[int, int]):
    save_metrics(random_observation(counts), path)
    return path


def _moe_layers(model) -> dict[int, int]:
    from reap_fast.prune import expert_counts

    return expert_counts(model)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_pruned_estimate_is_what_is_written(family, tmp_path):
    """Per-expert (Qwen3, Mixtral), fused (gpt-oss) and dense-first-layer (DeepSeek-V3) checkpoints: the estimate
    is at least the pruned folder's weights and side files and at most 5 % more; the source is far larger."""
    config = tiny_family_config(family, layers=2) if family != "qwen3_moe" else None
    model = build_model(config, seed=0) if config is not None else None
    if model is None:
        source = make_tiny_checkpoint(tmp_path / "source", seed=0, **SHAPE)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source)
    else:
        source = save_checkpoint(model, byte_tokenizer(), tmp_path / "source")
    counts = _moe_layers(model)
    experts = next(iter(counts.values()))
    removed = experts // 2
    metrics = _observation(tmp_path / "obs.pt", counts)
    estimate = pruned_size(source, load_config(str(source)), removed)
    out = prune_checkpoint(source, metrics, tmp_path / "out", PruneConfig(n_experts_to_prune=removed))
    written = sum(path.stat().st_size for path in out.iterdir() if path.name not in ("pruned_experts.json",
                                                                                      "reap_args.yaml"))
    assert written <= estimate <= 1.05 * written + 4096, (estimate, written)
    assert estimate < 0.9 * size_on_disk(source)


def test_prune_runs_where_the_source_size_would_not_fit(tmp_path, monkeypatch):
    """The drop-in's refusal of the issue: room for the pruned model but not for a second copy of the source."""
    source = make_tiny_checkpoint(tmp_path / "source", seed=0, **SHAPE)
    from transformers import AutoModelForCausalLM

    counts = _moe_layers(AutoModelForCausalLM.from_pretrained(source))
    estimate = pruned_size(source, load_config(str(source)), 6)
    assert estimate < 0.6 * weights_bytes(source)
    usage = collections.namedtuple("usage", "total used free")
    free = estimate + (64 << 20) + 1024
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))
    metrics = _observation(tmp_path / "obs.pt", counts)
    assert (prune_checkpoint(source, metrics, tmp_path / "out",
                             PruneConfig(n_experts_to_prune=6)) / "config.json").is_file()


def test_quantized_estimate_formula(tmp_path):
    """4 bits per quantized weight plus a 16-bit scale and a 4-bit zero per group of 128 inputs; norms, routers,
    embeddings at their own size."""
    source = make_tiny_checkpoint(tmp_path / "source", seed=0, **SHAPE)
    full = written_bytes(source)
    quantized = written_bytes(source, quantization=(4, 128))
    from safetensors import safe_open

    expected = 0
    with safe_open(str(source / "model.safetensors"), "pt") as handle:
        for name in handle.keys():
            tensor = handle.get_slice(name)
            shape = tensor.get_shape()
            numel = int(torch.tensor(shape).prod()) if shape else 1
            matrix = ".layers." in name and len(shape) >= 2 and "norm" not in name and not name.endswith("mlp.gate.weight")
            expected += numel // 2 + numel // 128 * 2.5 + 3 * HEADER_BYTES if matrix else numel * 4 + HEADER_BYTES
    assert quantized == int(expected * 1.02) + side_files_bytes(source)
    assert quantized < full / 3
