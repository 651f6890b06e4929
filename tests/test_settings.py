"""One declaration per setting: every flag of `reap-fast <stage>`, `reap-fast run` and the drop-in is generated from
the stage configs' field declarations, reaches the config, and a config error names the flag the user typed."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest
from transformers import HfArgumentParser

from reap_fast.cli import build_parser, main
from reap_fast.config import ConfigError, EvalConfig, HarnessSettings, ObserveConfig, PruneConfig, QuantConfig
from reap_fast.config.declare import declared, setting
from reap_fast.config.flags import SettingFlags, flag_type
from reap_fast.upstream import args as dropin_args
from reap_fast.upstream.main import main as dropin_main

STAGE_COMMANDS = {ObserveConfig: "observe", PruneConfig: "prune", QuantConfig: "quantize", HarnessSettings: "eval"}
RUN_CONFIGS = (ObserveConfig, PruneConfig, QuantConfig, EvalConfig, HarnessSettings)
REQUIRED = {"observe": ["--model", "m", "--dataset", "d", "--output", "o.pt"],
            "prune": ["--model", "m", "--metrics", "o.pt", "--output", "o"],
            "quantize": ["--model", "m", "--dataset", "d", "--output", "o"],
            "eval": ["--model", "m", "--tasks", "t"],
            "run": ["--model", "m", "--dataset", "d", "--output", "o"]}
FIXED = {HarnessSettings: {"tasks": "t"}}


def _other_value(config_type: type, field: dataclasses.Field, tmp_path) -> tuple[list[str], object]:
    """A valid value other than the default, as typed after the flag (empty: a switch) and as the config holds it."""
    spec = field.metadata["reap_fast.setting"]
    default = field.default
    if spec.negatable:
        return ["--no-" + spec.cli[0][2:]], False
    if spec.parse is not None and spec.metavar == "{true,false}":
        return ["false"], False
    choices = spec.flag_choices or spec.choices
    if choices is not None:
        value = next(choice for choice in choices if choice != default)
        return [str(value)], value
    if field.name == "include_path":
        return [str(tmp_path)], str(tmp_path)
    if default is False:
        return [], True
    if field.name == "compression_ratio":
        return ["0.25"], 0.25
    if field.name == "device":
        return ["cpu"], "cpu"
    if isinstance(default, str) or flag_type(config_type, field.name) is str:  # lm-eval's batch size, a path
        return ["3"], "3"
    if isinstance(default, float) or field.name == "limit":
        return ["7.5"], 7.5
    number = 3 if default is None else default + 1
    return [str(number)], number


def _cases():
    for config_type, command in STAGE_COMMANDS.items():
        for field, spec in declared(config_type):
            if spec.flags(command):
                yield pytest.param(config_type, command, field.name, id=f"{command}-{field.name}")
    for config_type in RUN_CONFIGS:
        for field, spec in declared(config_type):
            if spec.flags("run"):
                yield pytest.param(config_type, "run", field.name, id=f"run-{config_type.__name__}-{field.name}")


@pytest.mark.parametrize("config_type, command, name", list(_cases()))
def test_every_declared_flag_reaches_its_config(config_type, command, name, tmp_path):
    field = next(item for item, _ in declared(config_type) if item.name == name)
    typed, expected = _other_value(config_type, field, tmp_path)
    flag = field.metadata["reap_fast.setting"].flags(command)[0]
    if typed and typed[0].startswith("--no-"):
        flag, typed = typed[0], []
    args = build_parser().parse_args([command, *REQUIRED[command], flag, *typed])
    fixed = {"checkpoint_dir": "c"} if name == "resume" else FIXED.get(config_type, {})  # resume needs its folder
    built = args.setting_flags.build(args, config_type, **fixed)
    assert getattr(built, name) == expected
    assert expected != field.default


def test_every_dropin_setting_reaches_its_stage_config():
    names = [(config_type, item, spec) for config_type in dropin_args.STAGE_CONFIGS
             for item, spec in declared(config_type) if spec.upstream or spec.dropin]
    assert {spec.dropin for _, _, spec in names if spec.dropin} == {
        "engine", "device", "dtype", "checkpoint_every", "min_experts_per_layer"}
    parsed, ignored = dropin_args.parse_args(["--model_name", "m", "--engine", "reference", "--device", "cpu",
                                              "--dtype", "float16", "--checkpoint_every", "9", "--batch_size", "3",
                                              "--min_experts_per_layer", "2", "--prune_method", "reap",
                                              "--perserve_outliers", "true", "--seed", "5"])
    assert ignored == []
    observe = dropin_args.stage_config(ObserveConfig, parsed)
    prune = dropin_args.stage_config(PruneConfig, parsed)
    assert (observe.engine, observe.device, observe.dtype, observe.checkpoint_every, observe.batch_size, observe.seed) \
        == ("reference", "cpu", "float16", 9.0, 3, 5)
    assert (prune.min_experts_per_layer, prune.method, prune.preserve_outliers, prune.device, prune.seed) == (
        2, "reap", True, "cpu", 5)
    for _, _, spec in names:  # every upstream name it reads is honoured (not warned about as ignored)
        assert (spec.upstream or spec.dropin) in dropin_args.HONOURED | {f.name for f in dataclasses.fields(
            dropin_args.ReapFastArgs)}


def test_a_new_setting_is_declared_once_and_every_cli_exposes_it(tmp_path):
    """What adding an observe setting takes: one field in the config; the flags of observe, run and the drop-in
    come from it, and its range check names the flag of whichever CLI the user typed."""

    @dataclass(frozen=True)
    class WithKnob(ObserveConfig):
        knob: int = setting(4, "a new knob", cli="--knob", dropin="knob", integer=True, low=1)

    for command, configs in (("observe", (WithKnob,)), ("run", (WithKnob, PruneConfig, QuantConfig, EvalConfig))):
        parser = argparse.ArgumentParser(prog=command)
        flags = SettingFlags(parser, command, configs)
        assert flags.build(parser.parse_args(["--knob", "6"]), WithKnob).knob == 6
        assert flags.build(parser.parse_args([]), WithKnob) == WithKnob()
        with pytest.raises(ConfigError) as refused:
            flags.build(parser.parse_args(["--knob", "0"]), WithKnob)
        assert str(refused.value) == "knob must be in [1, inf), got 0"  # the Python API: the field's name
        spelled = refused.value.spelled(lambda owner, name: flags.spell(owner, name, ["--knob", "0"]))
        assert spelled == "--knob must be in [1, inf), got 0"
    generated = dropin_args.reap_fast_args_class((WithKnob, PruneConfig))
    (parsed,) = HfArgumentParser([generated]).parse_args_into_dataclasses(["--knob", "5"])
    assert parsed.knob == 5 and parsed.engine == "auto"
    assert "knob" in {f.name for f in dataclasses.fields(generated)}


@pytest.mark.parametrize("argv, message", [
    (["observe", *REQUIRED["observe"], "--batch-size", "0"], "--batch-size must be in [1, inf), got 0"),
    (["observe", *REQUIRED["observe"], "--checkpoint-every", "-1"], "--checkpoint-every must be in [0, inf), got -1.0"),
    (["prune", *REQUIRED["prune"], "--n-experts-to-prune", "0"], "--n-experts-to-prune must be in [1, inf), got 0"),
    (["eval", *REQUIRED["eval"], "--num_fewshot", "-1"], "--num_fewshot must be in [0, inf), got -1"),
    (["eval", *REQUIRED["eval"], "--num-fewshot", "-1"], "--num-fewshot must be in [0, inf), got -1"),
    (["run", *REQUIRED["run"], "--eval-tasks", "t", "--eval-limit", "0"], "--eval-limit must be in (0, inf), got 0.0"),
])
def test_native_errors_name_the_flag_typed(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"reap-fast {argv[0]}: error: {message}"


@pytest.mark.parametrize("typed, message", [
    (["--batch_size", "0"], "--batch_size must be in [1, inf), got 0"),
    (["--batch-size", "0"], "--batch-size must be in [1, inf), got 0"),
    (["--checkpoint_every", "-2"], "--checkpoint_every must be in [0, inf), got -2.0"),
    (["--perserve_super_experts", "--perserve_outliers", "true"],
     "only one of --perserve_super_experts or --perserve_outliers can be set"),
    (["--min_experts_per_layer", "0"], "--min_experts_per_layer must be in [1, inf), got 0"),
])
def test_dropin_errors_name_the_flag_typed(tiny_checkpoint_dir, typed, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dropin_main(["--model_name", str(tiny_checkpoint_dir), "--do_eval", "false", *typed]) == 1
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").rglob("*.pt"))


@pytest.fixture(scope="module")
def tiny_checkpoint_dir(tmp_path_factory):
    from reap_lab.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=3, num_hidden_layers=1)
