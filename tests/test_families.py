"""Architecture coverage: every family through the Triton engine, and the safety checks that run before
any calibration work (budget vs top-k and routing groups, unsupported families)."""

import logging

import pytest
from oracle import assert_metrics_close
from test_reference import _batch, _observe, _oracle

from reap_lab.families_tiny import TINY_CONFIGS, tiny_family_config
from reap_fast.config import ObserveConfig
from reap_fast.models import UnsupportedModelError
from reap_fast.pipeline import Pipeline, PipelineConfig
from reap_fast.prune import PruneConfig, SelectionError, check_prune_budget
from reap_lab.tiny import build_model, byte_tokenizer, save_checkpoint


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_triton_engine_matches_float64_oracle_on_every_family(family):
    model = build_model(tiny_family_config(family, num_experts=8, top_k=2), seed=4)
    batches = [_batch(0, batch=2, length=9, pad_last=3)]
    ours = _observe(model, batches, renormalize=True, engine="triton")
    oracle = _oracle(model, batches, renormalize=True)
    for layer in oracle:
        # fp32 tiles in the kernels sum in another order than the float64 loops: 1e-4 relative covers it
        assert_metrics_close(ours[layer], oracle[layer], rtol=1e-4, atol=1e-5, context=f"{family} layer {layer}")


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_budget_leaving_fewer_experts_than_top_k_is_refused(family):
    config = tiny_family_config(family, num_experts=8, top_k=2)
    assert check_prune_budget(config, PruneConfig(compression_ratio=0.5)) == 4
    if family in ("deepseek_v3", "deepseek_v2"):  # two routing groups: 6 of 8 would leave one expert per group
        for count in (7, 6):  # the range named is the range the group rule accepts
            with pytest.raises(SelectionError, match="must be between 2 and 4: with 2 routing groups every group "
                                                     "must keep at least 2 experts"):
                check_prune_budget(config, PruneConfig(n_experts_to_prune=count))
        assert check_prune_budget(config, PruneConfig(n_experts_to_prune=4)) == 4
        with pytest.raises(SelectionError, match="at least 2 experts per group"):  # a ratio's count: the group rule
            check_prune_budget(config, PruneConfig(compression_ratio=0.75))
    else:
        with pytest.raises(SelectionError,
                           match="must be between 1 and 6: pruning more leaves fewer than the model's top-k of 2"):
            check_prune_budget(config, PruneConfig(n_experts_to_prune=7))


def test_group_limited_routing_rounds_to_whole_groups(caplog):
    config = tiny_family_config("deepseek_v3", num_experts=8, top_k=2)  # n_group=2, topk_group=2
    with caplog.at_level(logging.WARNING):
        assert check_prune_budget(config, PruneConfig(n_experts_to_prune=3)) == 2
    assert "every group loses the same number" in caplog.text
    with pytest.raises(SelectionError, match="must be between 2 and 4"):
        check_prune_budget(config, PruneConfig(n_experts_to_prune=6))
    with pytest.raises(SelectionError, match="at least 2 experts per group"):
        check_prune_budget(config, PruneConfig(compression_ratio=0.75))


def _save(tmp_path, config, name):
    return save_checkpoint(build_model(config, seed=0), byte_tokenizer(), tmp_path / name)


def test_pipeline_checks_budget_and_family_before_observing(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("observation started before the inputs were checked")

    monkeypatch.setattr("reap_fast.observe.observe_checkpoint", never)
    model = _save(tmp_path, tiny_family_config("qwen3_moe", num_experts=8, top_k=2), "moe")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    config = PipelineConfig(model=str(model), dataset=str(data), output=str(tmp_path / "out"),
                            observe=ObserveConfig(progress=False), prune=PruneConfig(compression_ratio=0.9))
    with pytest.raises(SelectionError, match="fewer than the model's top-k"):
        Pipeline(config).run()

    from transformers import Qwen3Config

    dense = _save(tmp_path, Qwen3Config(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16), "dense")
    config = PipelineConfig(model=str(dense), dataset=str(data), output=str(tmp_path / "out2"),
                            observe=ObserveConfig(progress=False))
    with pytest.raises(UnsupportedModelError, match="supported: .*qwen3_moe.*Adding a model family"):
        Pipeline(config).run()


def test_drop_in_cli_checks_budget_before_observing(tmp_path, monkeypatch, capsys):
    from reap_fast.upstream.main import main

    monkeypatch.setattr("reap_fast.observe.runner.observe_checkpoint", lambda *a, **k: pytest.fail("observed"))
    model = _save(tmp_path, tiny_family_config("qwen3_moe", num_experts=8, top_k=2), "moe")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    code = main(["--model_name", str(model), "--dataset_name", str(data), "--n_experts_to_prune", "7",
                 "--artifacts_dir", str(tmp_path / "artifacts")])
    assert code != 0
    assert "fewer than the model's top-k of 2" in capsys.readouterr().err
