"""PipelineConfig: composed of the stage configs, built the same from `reap-fast run`'s flags; its fingerprint is
every stage config's non-volatile fields with a format version, and a run folder of another format is refused."""

import json

import pytest

from reap_fast.cli import build_parser
from reap_fast.config import EvalConfig, HarnessSettings, ObserveConfig, PruneConfig, QuantConfig
from reap_fast.pipeline import FINGERPRINT_FORMAT, Pipeline, PipelineConfig, PipelineError, changed_settings

OBSERVE_RESULT = {"samples_per_category": None, "model_max_length": 2048, "batch_size": 1, "seed": 42,
                  "renormalize": True, "dtype": "auto", "merging_statistics": False}
PRUNE_RESULT = {"method": "reap", "compression_ratio": 0.5, "n_experts_to_prune": None, "seed": 42,
                "min_experts_per_layer": None, "preserve_super_experts": False, "preserve_outliers": False,
                "dtype": "auto"}


def _from_flags(*flags: str) -> PipelineConfig:
    """The PipelineConfig `reap-fast run` builds (cmd_run without running the pipeline)."""
    import reap_fast.pipeline as pipeline
    from reap_fast import cli

    built = []

    class Stop(Exception):
        pass

    def capture(config):
        built.append(config)
        raise Stop

    args = build_parser().parse_args(["run", "--model", "m", "--dataset", "d", "--output", "o", *flags])
    original = pipeline.Pipeline
    pipeline.Pipeline = capture
    try:
        with pytest.raises(Stop):
            cli.cmd_run(args)
    finally:
        pipeline.Pipeline = original
    return built[0]


def test_fingerprint_of_a_default_run_is_every_stage_setting_that_changes_a_result():
    expected = {"format": FINGERPRINT_FORMAT, "model": "m", "dataset": "d", "observe": OBSERVE_RESULT,
                "prune": PRUNE_RESULT, "quantize": None, "evaluate": None}
    assert _from_flags().fingerprint() == expected
    assert PipelineConfig("m", "d", "o").fingerprint() == expected
    # engine, device, layerwise, checkpoints, progress, overwrite: where or how fast, not what
    fast = PipelineConfig("m", "d", "o", ObserveConfig(engine="reference", device="cpu", layerwise=True,
                                                      checkpoint_every=5, progress=False),
                          PruneConfig(device="cpu", overwrite=True), overwrite=True)
    assert fast.fingerprint() == expected


def test_flags_and_stage_configs_build_the_same_config():
    flags = _from_flags("--n-experts-to-prune", "3", "--seed", "7", "--batch-size", "2", "--quantize", "w4a16",
                        "--iters", "0", "--quant-batch-size", "4", "--eval-dataset", "h.jsonl", "--eval-samples", "5",
                        "--eval-tasks", "a,b", "--eval-limit", "3", "--device", "cpu", "--dtype", "float32",
                        "--overwrite")
    composed = PipelineConfig(
        "m", "d", "o", ObserveConfig(batch_size=2, seed=7, device="cpu", dtype="float32"),
        PruneConfig(n_experts_to_prune=3, seed=7, device="cpu", dtype="float32"),
        QuantConfig(iters=0, batch_size=4, seed=7, device="cpu", dtype="float32"),
        EvalConfig(dataset="h.jsonl", samples=5,
                   harness=HarnessSettings(tasks="a,b", limit=3, device="cpu", dtype="float32")),
        overwrite=True,
    )
    assert flags == composed
    assert flags.stages() == ["observe", "prune", "quantize", "eval", "lm_eval"]
    fingerprint = flags.fingerprint()
    assert fingerprint["quantize"]["iters"] == 0 and fingerprint["quantize"]["batch_size"] == 4
    assert fingerprint["evaluate"] == {"dataset": "h.jsonl", "samples": 5, "max_length": 512, "batch_size": 8}
    assert "harness" not in fingerprint["evaluate"]  # the lm_eval stage checks its own settings


def test_changed_settings_name_the_stage_and_field():
    base = PipelineConfig("m", "d", "o", quantize=QuantConfig())
    changed = PipelineConfig("m", "d", "o", prune=PruneConfig(seed=3, preserve_outliers=True),
                             quantize=QuantConfig(group_size=64), evaluate=EvalConfig(dataset="h", batch_size=2))
    assert changed_settings(base.fingerprint(), changed.fingerprint()) == [
        "evaluate", "prune.preserve_outliers", "prune.seed", "quantize.group_size"]
    assert changed_settings(base.fingerprint(), base.fingerprint()) == []


def test_settings_of_a_stage_that_is_off_in_both_runs_do_not_block_a_resume():
    earlier = _from_flags("--iters", "50", "--eval-samples", "4").fingerprint()  # no --quantize, no --eval-dataset
    assert changed_settings(earlier, PipelineConfig("m", "d", "o").fingerprint()) == []
    quantized = _from_flags("--quantize", "w4a16").fingerprint()
    assert changed_settings(earlier, quantized) == ["quantize"]


def _write_run_folder(folder, settings) -> None:
    folder.mkdir()
    (folder / "pipeline.json").write_text(json.dumps({"settings": settings, "stages": {}}))


def test_a_run_folder_of_the_earlier_format_is_refused_in_one_line(tmp_path):
    earlier = {"model": "m", "dataset": "d", "compression_ratio": 0.5, "seed": 42, "quantize": None}  # format 1
    folder = tmp_path / "run"
    _write_run_folder(folder, earlier)
    with pytest.raises(PipelineError) as refused:
        Pipeline(PipelineConfig("m", "d", str(folder)))
    message = str(refused.value)
    assert "\n" not in message and "earlier reap-fast (run-folder format 1" in message
    assert "start a new --output folder" in message
    assert Pipeline(PipelineConfig("m", "d", str(folder), overwrite=True)).state["settings"]["format"] == 2


def test_a_run_folder_with_other_settings_names_them(tmp_path):
    folder = tmp_path / "run"
    _write_run_folder(folder, PipelineConfig("m", "d", str(folder)).fingerprint())
    Pipeline(PipelineConfig("m", "d", str(folder)))  # same settings: resumes
    with pytest.raises(PipelineError, match=r"other settings \(prune\.seed\)"):
        Pipeline(PipelineConfig("m", "d", str(folder), prune=PruneConfig(seed=1)))


@pytest.mark.parametrize("stages, message", [
    ({"quantize": "w4a16"}, "quantize must be QuantConfig, got str"),
    ({"observe": None}, "observe must be ObserveConfig, got NoneType"),
    ({"evaluate": {"dataset": "h"}}, "evaluate must be EvalConfig, got dict"),
])
def test_stage_configs_must_be_config_objects(stages, message):
    with pytest.raises(PipelineError) as raised:
        PipelineConfig("m", "d", "o", **stages)
    assert str(raised.value) == message
