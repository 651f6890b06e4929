"""The quantize stage's settings (reap_fast.config.QuantConfig): defaults, range checks, and that the CLI,
the pipeline and the stage functions refuse bad settings with one line (exit 2) before any work."""

from __future__ import annotations

import dataclasses

import pytest

from reap_fast.cli import build_parser, main
from reap_fast.config import ConfigError, QuantConfig
from reap_fast.pipeline import Pipeline, PipelineConfig
from reap_fast.quantize import quantize_w4a16, run_quantize_subprocess


def test_defaults_are_the_documented_ones():
    # README "W4A16 quantization": 4 bits, symmetric, group size 128; --iters/--nsamples/--seqlen help.
    assert dataclasses.asdict(QuantConfig()) == {
        "bits": 4, "group_size": 128, "sym": True, "iters": 200, "nsamples": 128, "seqlen": 512, "batch_size": 8,
        "device": "auto", "dtype": "auto", "seed": 42, "min_samples": 1, "overwrite": False,
    }
    QuantConfig(group_size=-1, iters=0, bits=8)  # -1 (one scale per row) and RTN are valid


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bits": 5}, "bits must be one of 2, 3, 4, 8; got 5"),
        ({"group_size": 0}, "group_size must be positive or -1, got 0"),
        ({"group_size": -2}, "group_size must be positive or -1, got -2"),
        ({"iters": -1}, "iters must be in [0, inf), got -1"),
        ({"nsamples": 0}, "nsamples must be in [1, inf), got 0"),
        ({"seqlen": 0}, "seqlen must be in [1, inf), got 0"),
        ({"batch_size": 0}, "batch_size must be in [1, inf), got 0"),
        ({"min_samples": 0}, "min_samples must be in [1, inf), got 0"),
        ({"iters": 1.5}, "iters must be an integer, got 1.5"),
        ({"nsamples": True}, "nsamples must be an integer, got True"),
    ],
)
def test_bad_settings_are_refused_with_one_line(settings, message):
    with pytest.raises(ConfigError) as caught:
        QuantConfig(**settings)
    assert str(caught.value) == message and caught.value.exit_code == 2


def test_bad_settings_are_refused_before_any_work(tmp_path):
    # Neither the model folder nor the texts are looked at: the config refuses when it is built or replaced.
    with pytest.raises(ConfigError, match=r"iters must be in \[0, inf\), got -1"):
        quantize_w4a16(tmp_path / "missing", tmp_path / "out", ["text"], QuantConfig(iters=-1))
    with pytest.raises(ConfigError, match=r"seqlen must be in \[1, inf\), got 0"):
        run_quantize_subprocess(tmp_path / "missing", tmp_path / "out", ["text"],
                                dataclasses.replace(QuantConfig(), seqlen=0))
    assert sorted(tmp_path.iterdir()) == []


def test_cli_and_pipeline_take_their_defaults_from_the_config(tmp_path):
    quantize = build_parser().parse_args(["quantize", "--model", "m", "--output", "o", "--dataset", "d"])
    run = build_parser().parse_args(["run", "--model", "m", "--output", "o", "--dataset", "d", "--quantize", "w4a16"])
    expected = QuantConfig()
    for args in (quantize, run):
        assert args.setting_flags.build(args, QuantConfig) == expected
        # --nsamples left out: QuantConfig's 128, or all the texts the data holds when it holds fewer
        assert "nsamples" not in args.setting_flags.given(args, QuantConfig)
    typed = build_parser().parse_args(["quantize", "--model", "m", "--output", "o", "--dataset", "d", "--nsamples", "9"])
    assert typed.setting_flags.given(typed, QuantConfig) == {"nsamples": 9}
    assert f"default: {expected.nsamples}" in build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    pipeline = Pipeline(PipelineConfig(model="m", dataset="d", output=str(tmp_path / "o"), quantize=QuantConfig()))
    assert dataclasses.replace(pipeline.quant_settings(), overwrite=False) == expected


@pytest.mark.parametrize("command, flag", [("quantize", "--nsamples"), ("run", "--nsamples"),
                                           ("quantize", "--batch-size"), ("run", "--quant-batch-size")])
def test_cli_refuses_bad_settings_in_one_line_naming_the_flag_before_reading_anything(tmp_path, capsys, command, flag):
    argv = [command, "--model", str(tmp_path / "missing"), "--dataset", str(tmp_path / "none.jsonl"),
            "--output", str(tmp_path / "out"), flag, "0"]
    if command == "run":
        argv += ["--quantize", "w4a16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reap-fast {command}: error: {flag} must be in [1, inf), got 0"
    assert not (tmp_path / "out").exists()


def test_quantize_dtype_is_a_choice_of_the_config_and_the_cli():
    from reap_fast.config.quantize import QUANT_DTYPE_CHOICES

    assert QuantConfig().dtype == "auto"
    with pytest.raises(ConfigError, match="dtype must be one of"):
        QuantConfig(dtype="int8")
    for choice in QUANT_DTYPE_CHOICES:
        args = build_parser().parse_args(["quantize", "--model", "m", "--output", "o", "--dataset", "d", "--dtype", choice])
        assert args.setting_flags.build(args, QuantConfig).dtype == choice
