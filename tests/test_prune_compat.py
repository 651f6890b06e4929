"""Drop-in command lines: upstream flag spellings, defaults, layout, reuse, ignored and unknown flags."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import reap_fast.observe.runner as runner
from reap_fast import layerwise_prune
from reap_fast.metrics import load_metrics, save_metrics
from reap_fast.prune.__main__ import main as prune_main
from reap_fast.upstream.args import ClusterArgs, PruneArgs, parse_args
from reap_fast.upstream.layout import is_composite, observation_path, pruned_model_name, results_directory
from reap_lab.tiny import make_tiny_checkpoint

PRUNED = Path("artifacts/model/data.jsonl/pruned_models/reap-renorm_true-seed_7-0.25")
OBSERVATION = Path("artifacts/model/data.jsonl/all/obs.pt")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    checkpoint = make_tiny_checkpoint(root / "model")
    data = root / "data.jsonl"
    with open(data, "w") as handle:
        for i in range(24):
            handle.write(json.dumps({"text": f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}."}) + "\n")
    return str(checkpoint), str(data)


def underscore_argv(inputs):
    checkpoint, data = inputs
    return [
        "--model_name", checkpoint, "--dataset_name", data, "--prune_method", "reap", "--compression_ratio", "0.25",
        "--seed", "7", "--batches_per_category", "4", "--model_max_length", "32", "--batch_size", "2",
        "--record_pruning_metrics_only", "true", "--renormalize_router_weights", "true", "--output_file_name", "obs.pt",
        "--do_eval", "false",
    ]


def dash_argv(inputs):
    checkpoint, data = inputs
    return [
        "--model-name", checkpoint, "--dataset-name", data, "--prune-method", "reap", "--compression-ratio=0.25",
        "--seed", "7", "--batches-per-category", "4", "--model-max-length", "32", "--batch-size", "2",
        "--record-pruning-metrics-only", "--renormalize-router-weights", "True", "--output-file-name", "obs.pt",
        "--do-eval", "false",
    ]


@pytest.fixture(scope="module")
def underscore_run(inputs, tmp_path_factory):
    """One full run (observe + prune) with underscore flags, in its own working directory."""
    cwd = tmp_path_factory.mktemp("underscore")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        assert prune_main(underscore_argv(inputs)) == 0
    return cwd


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_both_spellings_give_the_same_directories_and_files(inputs, underscore_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prune_main(dash_argv(inputs)) == 0
    ours, theirs = tree(underscore_run / "artifacts"), tree(tmp_path / "artifacts")
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs  # byte for byte: same observation, same selection, same weights and metadata
    files = {p.name for p in (underscore_run / PRUNED).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "reap_args.yaml", "pruned_experts.json"} <= files
    assert (underscore_run / OBSERVATION).is_file()
    load_metrics(underscore_run / OBSERVATION)  # valid observation file
    config = json.loads((underscore_run / PRUNED / "config.json").read_text())
    assert config.get("num_experts", config.get("num_local_experts")) == 6


def test_reap_args_yaml_has_upstream_sections(underscore_run, inputs):
    import yaml

    args = yaml.safe_load((underscore_run / PRUNED / "reap_args.yaml").read_text())
    for section in ("reap_args", "ds_args", "obs_args", "model_args", "eval_args", "prune_args", "cluster_args"):
        assert section in args
    assert args["prune_args"]["prune_method"] == "reap"
    assert args["cluster_args"]["compression_ratio"] == 0.25
    assert args["obs_args"]["batches_per_category"] == 4
    assert args["model_args"]["model_name"] == inputs[0]


def test_existing_observation_is_reused_and_pruned_model_skipped(inputs, underscore_run, monkeypatch, caplog):
    monkeypatch.chdir(underscore_run)

    def no_observation(*args, **kwargs):
        raise AssertionError("the observation should have been reused")

    monkeypatch.setattr(runner, "observe_checkpoint", no_observation)
    weights = underscore_run / PRUNED / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="reap_fast"):
        assert prune_main(underscore_argv(inputs)) == 0
    assert "skipping pruning" in caplog.text and weights.stat().st_mtime_ns == stamp
    assert prune_main(underscore_argv(inputs) + ["--overwrite_pruned_model"]) == 0
    assert weights.stat().st_mtime_ns != stamp

    class Called(Exception):
        pass

    def observed(*args, **kwargs):
        raise Called

    monkeypatch.setattr(runner, "observe_checkpoint", observed)
    with pytest.raises(Called):
        prune_main(underscore_argv(inputs) + ["--overwrite_observations", "true"])


def test_layerwise_uses_its_prefix_and_observation_path(inputs, underscore_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = Path("artifacts/model/data.jsonl/layerwise/obs.pt")
    target.parent.mkdir(parents=True)
    shutil.copy(underscore_run / OBSERVATION, target)
    monkeypatch.setattr(runner, "observe_checkpoint", lambda *a, **k: pytest.fail("observation not reused"))
    assert layerwise_prune.main(underscore_argv(inputs) + ["--batch_group_size", "2"]) == 0
    layerwise_dir = Path("artifacts/model/data.jsonl/pruned_models/layerwise_reap-renorm_true-seed_7-0.25")
    assert (layerwise_dir / "model.safetensors").is_file()
    ours = json.loads((layerwise_dir / "pruned_experts.json").read_text())["layers"]
    plain = json.loads((underscore_run / PRUNED / "pruned_experts.json").read_text())["layers"]
    assert ours == plain
    import yaml

    assert "layerwise_args" in yaml.safe_load((layerwise_dir / "reap_args.yaml").read_text())


def test_ignored_flags_give_one_warning(inputs, underscore_run, monkeypatch, caplog):
    monkeypatch.chdir(underscore_run)
    argv = underscore_argv(inputs) + [
        "--do_eval", "false", "--smoke-test", "false", "--merge_method", "ties", "--distance_measure", "cosine",
        "--lm_eval_tasks", "mmlu", "boolq", "--no_frequency_penalty", "--run_observer_only",
    ]
    _, ignored = parse_args(argv)
    assert ignored == sorted(
        ["--smoke-test", "--merge_method", "--distance_measure", "--no_frequency_penalty"]
    )
    with caplog.at_level(logging.WARNING, logger="reap_fast"):
        assert prune_main(argv) == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("reap_fast")]
    assert len(warnings) == 1
    assert "--smoke-test" in warnings[0].getMessage() and "--merge_method" in warnings[0].getMessage()
    assert parse_args(underscore_argv(inputs))[1] == []


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prune_main(["--model_name", "x", "--bogus_flag", "1"])
    assert exit_info.value.code == 2
    assert "--bogus_flag" in capsys.readouterr().err


def test_defaults_are_upstreams():
    parsed, ignored = parse_args([])
    assert ignored == []
    assert parsed["PruneArgs"].prune_method == "frequency"
    assert parsed["ClusterArgs"].compression_ratio == 0.5
    assert parsed["ReapArgs"].seed == 42
    assert parsed["ObserverArgs"].batches_per_category == 1024
    assert parsed["ObserverArgs"].batch_size == 8
    assert parsed["ReapArgs"].do_eval is True
    assert parsed["ObserverArgs"].model_max_length == 2048
    assert parsed["ObserverArgs"].output_file_name == "observations_1024_cosine.pt"
    assert parsed["ObserverArgs"].renormalize_router_weights is True
    assert parsed["ModelArgs"].model_name == "Qwen/Qwen3-30B-A3B"
    assert parsed["DatasetArgs"].dataset_name == "theblackcat102/evol-codealpaca-v1"
    assert parsed["ReapFastArgs"].engine == "auto"
    extra = parsed["ReapFastArgs"]  # reap-fast's alternatives are off: upstream's behaviour by default
    assert (extra.packing_separator, extra.dedupe_bos, extra.strict_samples) == ("masked", False, False)
    assert (extra.renormalize_rule, extra.super_experts_all_methods, extra.dtype) == ("upstream", False, "auto")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--perserve_super_experts"], True),
        (["--perserve_super_experts", "true"], True),
        (["--perserve-super-experts=True"], True),
        (["--perserve_super_experts", "no"], False),
        ([], False),
    ],
)
def test_boolean_forms(argv, expected):
    assert parse_args(argv)[0]["PruneArgs"].perserve_super_experts is expected


def test_negative_boolean_and_directory_names():
    for argv in (["--no_renormalize_router_weights"], ["--renormalize-router-weights", "false"]):
        assert parse_args(argv)[0]["ObserverArgs"].renormalize_router_weights is False
    args = PruneArgs(prune_method="reap")
    assert pruned_model_name(args, 64, 128, 42, True, False) == "reap-renorm_true-seed_42-0.50"
    assert pruned_model_name(args, 32, 128, 1, False, True) == "layerwise_reap-seed_1-0.25"
    args = PruneArgs(prune_method="frequency", perserve_super_experts=True)
    assert pruned_model_name(args, 3, 8, 42, True, False) == "frequency-perserve_super-renorm_true-seed_42-0.38"
    args = PruneArgs(prune_method="ean_sum", perserve_outliers=True)
    assert pruned_model_name(args, 4, 8, 0, False, False) == "ean_sum-perserve_outlier-seed_0-0.50"
    spec = "theblackcat102/evol-codealpaca-v1:4096,open-r1/Mixture-of-Thoughts[code]:4096"
    digest = hashlib.md5(spec.encode()).hexdigest()[:8]
    assert results_directory("artifacts", "Qwen/Qwen3-30B-A3B", spec) == Path(f"artifacts/Qwen3-30B-A3B/composite_{digest}")
    assert results_directory("artifacts", "org/M", "a/b c(d)") == Path("artifacts/M/b_c_d_")
    assert is_composite(spec) and is_composite("x:12") and not is_composite("theblackcat102/evol-codealpaca-v1")
    root = Path("r")
    assert observation_path(root, "ds", "o.pt", layerwise=False) == Path("r/all/o.pt")
    assert observation_path(root, "ds", "o.pt", layerwise=True) == Path("r/layerwise/o.pt")
    assert observation_path(root, "ds:10", "o.pt", layerwise=True) == Path("r/all/o.pt")
    assert ClusterArgs().compression_ratio == 0.5


def test_cli_bad_input(inputs, underscore_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint, data = inputs
    base = ["--model_name", checkpoint, "--dataset_name", data, "--output_file_name", "obs.pt", "--seed", "7",
            "--do_eval", "false"]
    assert prune_main(base + ["--compression_ratio", "1.5"]) == 1
    assert "outside (0, 1)" in capsys.readouterr().err
    # an observation of another model (16 experts) where the observation file is expected
    metrics = load_metrics(underscore_run / OBSERVATION)
    other = {layer: {k: v for k, v in entry.items()} for layer, entry in metrics.items()}
    for entry in other.values():
        for key, value in entry.items():
            if value.dim() == 1:
                entry[key] = torch.cat([value, value])
            elif value.dim() == 2:
                entry[key] = value.repeat(2, 2)
    save_metrics(other, OBSERVATION)
    assert prune_main(base) == 1
    err = capsys.readouterr().err
    assert "metrics file of another model" in err and "16 in the file vs 8 in the model" in err
    assert "--overwrite_observations" in err
    OBSERVATION.write_bytes(b"not a torch file")
    assert prune_main(base) == 1
    err = capsys.readouterr().err
    assert "cannot read observation file" in err and "--overwrite_observations" in err
    shutil.copy(underscore_run / OBSERVATION, OBSERVATION)
    assert prune_main(base + ["--n_experts_to_prune", "8"]) == 1
    assert "n_experts_to_prune=8 is out of range" in capsys.readouterr().err
    assert prune_main(base + ["--n_experts_to_prune", "7"]) == 1
    assert "fewer than the model's top-k of 2" in capsys.readouterr().err
    assert prune_main(base + ["--prune_method", "random", "--n_experts_to_prune", "2"]) == 0
    assert Path("artifacts/model/data.jsonl/pruned_models/random-renorm_true-seed_7-0.25/model.safetensors").is_file()


def test_help_lists_upstream_and_extra_flags(capsys):
    for entry in (prune_main, layerwise_prune.main):
        with pytest.raises(SystemExit) as exit_info:
            entry(["--help"])
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--perserve_super_experts", "--packing_separator", "--engine", "--batch_group_size", "--no_do_eval"):
        assert flag in out
