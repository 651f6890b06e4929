"""PipelineConfig: composed of the stage configs, built the same from flags, from the stage configs and from
the flat keywords of earlier versions; its fingerprint keeps the keys and values earlier runs recorded."""

import pytest

from reap_fast.cli import build_parser
from reap_fast.config import EvalConfig, HarnessSettings, ObserveConfig, PruneConfig, QuantConfig
from reap_fast.pipeline import PipelineConfig, PipelineError, changed_settings

# pipeline.json "settings" of a run made before the stage configs (`reap-fast run --model m --dataset d
# --output o`), written out by hand.
EARLIER_DEFAULT_RUN = {
    "model": "m", "dataset": "d", "compression_ratio": 0.5, "n_experts_to_prune": None, "method": "reap",
    "samples_per_category": None, "model_max_length": 2048, "batch_size": 1, "seed": 42, "renormalize": True,
    "global_ranking": False, "min_experts_per_layer": None, "preserve_super_experts": False, "dtype": "auto",
    "quantize": None, "quant_iters": 200, "quant_nsamples": 128, "quant_seqlen": 512, "quant_batch_size": 8,
    "eval_dataset": None, "eval_samples": 16, "eval_max_length": 512,
}


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


def test_fingerprint_of_a_default_run_is_the_one_earlier_versions_recorded():
    assert _from_flags().fingerprint() == EARLIER_DEFAULT_RUN
    assert PipelineConfig("m", "d", "o").fingerprint() == EARLIER_DEFAULT_RUN


def test_flags_stage_configs_and_flat_keywords_build_the_same_config():
    flags = _from_flags("--n-experts-to-prune", "3", "--seed", "7", "--batch-size", "2", "--quantize", "w4a16",
                        "--iters", "0", "--quant-batch-size", "4", "--eval-dataset", "h.jsonl", "--eval-samples", "5",
                        "--eval-tasks", "a,b", "--eval-limit", "3", "--device", "cpu", "--overwrite")
    composed = PipelineConfig(
        "m", "d", "o", ObserveConfig(batch_size=2, seed=7, device="cpu"),
        PruneConfig(n_experts_to_prune=3, seed=7, device="cpu"), QuantConfig(iters=0, batch_size=4, seed=7, device="cpu"),
        EvalConfig(dataset="h.jsonl", samples=5, harness=HarnessSettings(tasks="a,b", limit=3, device="cpu")),
        overwrite=True,
    )
    flat = PipelineConfig(model="m", dataset="d", output="o", n_experts_to_prune=3, seed=7,
                          batch_size=2, quantize="w4a16", quant_iters=0, quant_batch_size=4, eval_dataset="h.jsonl",
                          eval_samples=5, lm_eval=HarnessSettings(tasks="a,b", limit=3, device="cpu"), device="cpu",
                          overwrite=True)
    assert flags == composed == flat
    assert flags.stages() == ["observe", "prune", "quantize", "eval", "lm_eval"]
    expected = dict(EARLIER_DEFAULT_RUN, compression_ratio=None, n_experts_to_prune=3, seed=7, batch_size=2,
                    quantize="w4a16", quant_iters=0, quant_batch_size=4, eval_dataset="h.jsonl", eval_samples=5)
    assert flat.fingerprint() == expected  # device and the lm-eval tasks are not part of it
    assert (flat.compression_ratio, flat.quant_iters, flat.eval_samples, flat.seed) == (None, 0, 5, 7)  # flat reads


def test_settings_outside_the_earlier_names_count_only_when_they_are_not_the_defaults():
    base = PipelineConfig("m", "d", "o", quantize=QuantConfig())
    assert "quantize.bits" not in base.fingerprint()
    changed = PipelineConfig("m", "d", "o", prune=PruneConfig(seed=3, preserve_outliers=True),
                             quantize=QuantConfig(group_size=64), evaluate=EvalConfig(dataset="h", batch_size=2))
    extra = {key: value for key, value in changed.fingerprint().items() if "." in key}
    assert extra == {"prune.seed": 3, "prune.preserve_outliers": True, "quantize.group_size": 64,
                     "evaluate.batch_size": 2}
    assert changed_settings(base.fingerprint(), changed.fingerprint()) == [
        "eval_dataset", "evaluate.batch_size", "prune.preserve_outliers", "prune.seed", "quantize.group_size"]


def test_settings_of_a_stage_that_is_off_in_both_runs_do_not_block_a_resume():
    recorded = dict(EARLIER_DEFAULT_RUN, quant_iters=50, eval_samples=4)  # `run --iters 50 --eval-samples 4`
    assert changed_settings(recorded, PipelineConfig("m", "d", "o").fingerprint()) == []
    quantized = PipelineConfig("m", "d", "o", quantize="w4a16").fingerprint()
    assert changed_settings(recorded, quantized) == ["quant_iters", "quantize"]
    assert changed_settings(recorded, dict(EARLIER_DEFAULT_RUN, seed=1)) == ["seed"]


@pytest.mark.parametrize("settings, message", [
    (dict(quantize="w8a8"), "--quantize supports only w4a16, got 'w8a8'"),
    (dict(quant_nsamples=0, quantize="w4a16"), "nsamples must be in [1, inf), got 0"),
    (dict(eval_dataset="h", eval_max_length=1), "--eval-max-length must be in [2, inf), got 1"),
    (dict(no_such_setting=1), "unknown PipelineConfig setting(s) no_such_setting"),
])
def test_bad_flat_settings_are_one_line_pipeline_errors(settings, message):
    with pytest.raises(PipelineError) as raised:
        PipelineConfig("m", "d", "o", **settings)
    assert str(raised.value) == message
