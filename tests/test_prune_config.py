"""PruneConfig: the prune stage's one set of defaults and checks, and every entry point taking them from it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reap_fast.cli import build_parser
from reap_fast.config import ConfigError, PruneConfig, SelectionError
from reap_fast.config.prune import DEFAULT_COMPRESSION_RATIO
from reap_fast.prune import select_experts
from reap_fast.prune.select import experts_to_prune
from reap_fast.upstream.args import parse_args
from reap_fast.upstream.main import pruning_settings as dropin_prune_config


RATIO = "is outside (0, 1): it is the fraction of experts removed"


def test_budget_defaults_to_the_ratio_only_when_no_budget_is_given():
    assert DEFAULT_COMPRESSION_RATIO == 0.5
    assert PruneConfig().compression_ratio == 0.5 and PruneConfig().n_experts_to_prune is None
    assert PruneConfig(n_experts_to_prune=3).compression_ratio is None
    assert PruneConfig(compression_ratio=0.25).compression_ratio == 0.25
    # E = 8: int(8 * 0.5) = 4, int(8 * 0.3) = int(2.4) = 2, int(8 * 0.99) = 7; a count is taken as given
    assert [experts_to_prune(8, PruneConfig(compression_ratio=r)) for r in (0.5, 0.3, 0.99)] == [4, 2, 7]
    assert experts_to_prune(8, PruneConfig(n_experts_to_prune=7)) == 7
    with pytest.raises(SelectionError, match="n_experts_to_prune=8 is out of range: the model has 8 experts"):
        experts_to_prune(8, PruneConfig(n_experts_to_prune=8))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compression_ratio": 0.0}, f"compression_ratio=0.0 {RATIO}"),
        ({"compression_ratio": 1.0}, f"compression_ratio=1.0 {RATIO}"),
        ({"compression_ratio": -0.1}, f"compression_ratio=-0.1 {RATIO}"),
        ({"compression_ratio": 0.5, "n_experts_to_prune": 2},
         "give either compression_ratio or n_experts_to_prune, not both"),
        ({"n_experts_to_prune": -1}, "n_experts_to_prune must be in [1, inf), got -1"),
        ({"n_experts_to_prune": 0}, "n_experts_to_prune must be in [1, inf), got 0"),
        ({"n_experts_to_prune": 2.0}, "n_experts_to_prune must be an integer, got 2.0"),
        ({"n_experts_to_prune": True}, "n_experts_to_prune must be an integer, got True"),
        ({"min_experts_per_layer": 0}, "min_experts_per_layer must be in [1, inf), got 0"),
        ({"dtype": "int8"}, "dtype must be one of 'auto', 'bfloat16', 'float16', 'float32'; got 'int8'"),
        ({"preserve_super_experts": True, "preserve_outliers": True},
         "only one of preserve_super_experts or preserve_outliers can be set"),
    ],
)
def test_bad_settings_are_one_line_selection_errors(settings, message):
    with pytest.raises(SelectionError) as caught:
        PruneConfig(**settings)
    text = str(caught.value)
    assert "\n" not in text and caught.value.exit_code == 2
    assert text == message


def test_edges_pass_and_the_config_is_frozen():
    PruneConfig(compression_ratio=1e-9)
    PruneConfig(compression_ratio=1 - 1e-9)
    PruneConfig(min_experts_per_layer=1, preserve_outliers=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PruneConfig().method = "frequency"


def test_native_cli_defaults_come_from_the_config():
    parser = build_parser()
    prune = parser.parse_args(["prune", "--model", "m", "--metrics", "o.pt", "--output", "out"])
    run = parser.parse_args(["run", "--model", "m", "--dataset", "d", "--output", "out"])
    for args in (prune, run):
        assert args.setting_flags.build(args, PruneConfig) == PruneConfig()
    with pytest.raises(SystemExit):  # global ranking was removed: no family can load per-layer expert counts
        parser.parse_args(["prune", "--model", "m", "--metrics", "o.pt", "--output", "out", "--global"])


def test_select_experts_takes_a_config_or_its_fields():
    metrics = {
        layer: {"reap": torch.tensor(row), "expert_frequency": torch.ones(4), "total_tokens": torch.tensor(10)}
        for layer, row in enumerate([[0.3, 0.1, 0.4, 0.2], [1.0, 3.0, 2.0, 0.5]])
    }
    # lowest two reap scores removed: layer 0 drops experts 1 and 3, layer 1 drops 3 and 0
    expected = {0: [0, 2], 1: [1, 2]}
    by_count = select_experts(metrics, PruneConfig(n_experts_to_prune=2))
    by_method = select_experts(metrics, PruneConfig(method="reap", n_experts_to_prune=2))
    by_ratio = select_experts(metrics, PruneConfig())  # the config's default ratio: int(4 * 0.5) = 2
    for keep in (by_count, by_method, by_ratio):
        assert {layer: kept.tolist() for layer, kept in keep.items()} == expected
    # a setting changed on top of a config
    keep = select_experts(metrics, dataclasses.replace(PruneConfig(compression_ratio=0.25), method="frequency"))
    assert {layer: kept.tolist() for layer, kept in keep.items()} == {0: [0, 1, 2], 1: [0, 1, 2]}  # ties: highest index goes


def test_pipeline_refuses_a_bad_budget_before_looking_at_the_output_folder(tmp_path):
    from reap_fast.cli import main

    folder = tmp_path / "never"
    code = main(["run", "--model", str(tmp_path), "--dataset", "d", "--output", str(folder),
                 "--compression-ratio", "1.5"])
    assert code == 2 and not folder.exists()
    code = main(["run", "--model", str(tmp_path), "--dataset", "d", "--output", str(folder),
                 "--min-experts-per-layer", "0"])
    assert code == 2 and not folder.exists()


def test_dropin_keeps_upstream_rules_on_top_of_the_config():
    argv = ["--model_name", "m", "--dataset_name", "d"]
    parsed, _ = parse_args(argv)
    assert dropin_prune_config(parsed) == PruneConfig(method="frequency", compression_ratio=0.5, overwrite=True)
    parsed, _ = parse_args([*argv, "--n_experts_to_prune", "3", "--compression_ratio", "0.25"])
    assert dropin_prune_config(parsed).n_experts_to_prune == 3  # the count wins, as upstream
    assert dropin_prune_config(parsed).compression_ratio is None
    parsed, _ = parse_args([*argv, "--compression_ratio", "1.5"])
    with pytest.raises(SelectionError, match=r"outside \(0, 1\)"):
        dropin_prune_config(parsed)
