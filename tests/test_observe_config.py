"""ObserveConfig: its checks, the one entry point refusing bad settings before reading anything, the
per-process resolution of 'auto', the checkpoint fingerprint (format 1, so older checkpoints resume),
and the CLI taking its defaults from the config."""

import dataclasses

import pytest
import torch
from reap_fast.cli import build_parser
from reap_fast.config import DEFAULT_MODEL_MAX_LENGTH, ConfigError, ObserveConfig
from reap_fast.data import DEFAULT_MODEL_MAX_LENGTH as DATA_DEFAULT_LENGTH
from reap_lab.tiny import tiny_qwen3_moe_config
from reap_fast.observe import observe_checkpoint
from reap_fast.observe.checkpointing import run_fingerprint
from reap_fast.observe.settings import process_settings


@pytest.mark.parametrize("settings, message", [
    (dict(batch_size=0), r"^batch_size must be in \[1, inf\), got 0$"),
    (dict(engine="gpu"), "^engine must be one of 'auto', 'reference', 'triton'; got 'gpu'$"),
    (dict(dtype="float64"), "^dtype must be one of"),
    (dict(renormalize="sometimes"), "^renormalize must be one of True, False, 'always'"),
    (dict(checkpoint_every=-1.0), r"^checkpoint_every must be in \[0, inf\)"),
    (dict(resume=True), "^resume needs .*checkpoint_dir"),
    (dict(samples_per_category=0), r"^samples_per_category must be in \[1, inf\)"),
    (dict(model_max_length=2.5), "^model_max_length must be an integer"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        ObserveConfig(**settings)


def test_defaults_are_upstreams_and_defined_once():
    config = ObserveConfig()
    assert (config.model_max_length, config.batch_size, config.seed) == (2048, 1, 42)
    assert DATA_DEFAULT_LENGTH is DEFAULT_MODEL_MAX_LENGTH == 2048
    assert ObserveConfig(renormalize="always", resume=True, checkpoint_dir="x").renormalize == "always"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 2


def test_entry_point_refuses_settings_before_reading_the_model(tmp_path):
    missing = str(tmp_path / "no-model")  # would fail with ModelLoadError if it were read first
    with pytest.raises(ConfigError, match="batch.size"):  # "batch size" or, named as the API's field, "batch_size"
        observe_checkpoint(missing, "data.jsonl", None, ObserveConfig(batch_size=0))
    with pytest.raises(ConfigError, match="batch.size"):
        observe_checkpoint(missing, "data.jsonl", None, dataclasses.replace(ObserveConfig(batch_size=2), batch_size=0))
    with pytest.raises(ConfigError, match="output must be a file path"):
        observe_checkpoint(missing, "data.jsonl", 64)  # a number where the output file goes
    with pytest.raises(ConfigError, match="output must be a file path.*settings go in the ObserveConfig"):
        observe_checkpoint(missing, "data.jsonl", ObserveConfig(batch_size=2))  # the config one place early


def test_process_settings_resolve_auto_and_are_idempotent():
    model_config = tiny_qwen3_moe_config()
    model_config.dtype = torch.bfloat16
    resolved = process_settings(ObserveConfig(device="cpu"), model_config)
    assert (resolved.device, resolved.dtype, resolved.engine) == ("cpu", "bfloat16", "reference")
    assert process_settings(resolved, model_config) == resolved
    explicit = process_settings(ObserveConfig(device="cpu", dtype="float16", engine="triton"), model_config)
    assert (explicit.dtype, explicit.engine) == ("float16", "triton")


def test_fingerprint_keeps_format_1(tmp_path):
    """The dict older reap-fast versions wrote into state.pt, written out by hand: equal, so they resume."""
    settings = ObserveConfig(samples_per_category=6, model_max_length=48, batch_size=2, seed=5, engine="reference",
                             device="cpu", dtype="float32", layerwise=True, renormalize="always")
    fingerprint = run_fingerprint(str(tmp_path), "docs.jsonl", settings, None, rank=1, world_size=2)
    assert fingerprint == {
        "model": str(tmp_path.resolve()), "dataset": "docs.jsonl", "samples_per_category": 6,
        "model_max_length": 48, "batch_size": 2, "seed": 5, "engine": "reference", "renormalize": "always",
        "dtype": "torch.float32", "layerwise": True, "rank": 1, "world_size": 2, "calibration": None,
    }
    assert run_fingerprint("org/name", "d", dataclasses.replace(settings, renormalize=False))["model"] == "org/name"


def test_cli_defaults_come_from_the_config():
    for command in ("observe", "run"):
        args = build_parser().parse_args([command, "--model", "m", "--dataset", "d", "--output", "o.pt"])
        assert args.setting_flags.build(args, ObserveConfig) == ObserveConfig()
    args = build_parser().parse_args(["observe", "--model", "m", "--dataset", "d", "--output", "o.pt",
                                      "--no-layerwise", "--renormalize-router-weights", "false"])
    built = args.setting_flags.build(args, ObserveConfig)
    assert (built.layerwise, built.renormalize) == (False, False)


def test_output_written_and_distributed_false_ignores_torchrun(tmp_path, monkeypatch):
    """The entry point writes what it returns (with the model's identity); distributed=False observes the whole
    set in this process even where torchrun's variables are set (else it would try to join a process group)."""
    from reap_lab.tiny import make_tiny_checkpoint
    from reap_fast.metrics import METRIC_DTYPES, load_metrics

    checkpoint = str(make_tiny_checkpoint(tmp_path / "tiny", seed=4, num_hidden_layers=2))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "line {i}: the quick brown fox jumps over the lazy dog"}}\n' for i in range(6)))
    settings = ObserveConfig(samples_per_category=3, model_max_length=32, engine="reference", device="cpu",
                             dtype="float32", progress=False)
    output = tmp_path / "obs.pt"
    single = observe_checkpoint(checkpoint, str(data), output, settings)
    saved = load_metrics(output)
    assert saved.identity["model"] == str((tmp_path / "tiny").resolve())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    alone = observe_checkpoint(checkpoint, str(data), None, dataclasses.replace(settings, distributed=False))
    assert not torch.distributed.is_initialized()
    assert sorted(single) == sorted(saved) == sorted(alone) and len(single) == 2
    for layer in single:
        for key in METRIC_DTYPES:
            assert torch.equal(single[layer][key], saved[layer][key]), (layer, key)
            assert torch.equal(single[layer][key], alone[layer][key]), (layer, key)
    assert int(single[0]["expert_frequency"].sum()) > 0
