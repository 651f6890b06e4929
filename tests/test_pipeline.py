"""`reap-fast run`: all stages end to end on the tiny model, resume from checksummed outputs, refusals."""

import json
from importlib.util import find_spec

import pytest
from transformers import AutoConfig

from reap_fast.cli import main
from reap_lab.corpus import write_jsonl
from reap_fast.pipeline import Pipeline, PipelineConfig, PipelineError
from reap_fast.quantize import is_complete_output
from reap_lab.tiny import make_tiny_checkpoint

QUANTIZABLE = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, head_dim=32,
                   num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model = make_tiny_checkpoint(root / "model", seed=0, **QUANTIZABLE)
    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # a line of code\n" * 6 for i in range(40)]
    calib = write_jsonl(texts[:30], root / "calib.jsonl")
    heldout = write_jsonl(texts[30:], root / "heldout.jsonl")
    return root, model, calib, heldout


def _config(inputs, output, **overrides):
    root, model, calib, heldout = inputs
    settings = dict(model=str(model), dataset=f"{calib}:6", output=str(root / output), compression_ratio=0.5,
                    model_max_length=128, batch_size=3, progress=False)
    settings.update(overrides)
    return PipelineConfig(**settings)


@pytest.mark.skipif(find_spec("auto_round") is None, reason="auto-round not installed (extra 'quant')")
def test_run_cli_all_stages_then_resume_skips_everything(inputs, capsys):
    root, model, calib, heldout = inputs
    argv = ["run", "--model", str(model), "--dataset", f"{calib}:6", "--model-max-length", "128",
            "--batch-size", "3", "--compression-ratio", "0.5", "--quantize", "w4a16", "--iters", "0",
            "--nsamples", "4", "--seqlen", "64", "--eval-dataset", f"{heldout}:4", "--eval-samples", "4",
            "--eval-max-length", "64", "--output", str(root / "full")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "experts kept per layer: 0:4, 1:4" in out and "w4a16" in out and "perplexity" in out
    full = root / "full"
    state = json.loads((full / "pipeline.json").read_text())
    assert sorted(state["stages"]) == ["eval", "observe", "prune", "quantize"]
    assert is_complete_output(full / "w4a16")
    evaluation = json.loads((full / "eval.json").read_text())
    assert set(evaluation) == {"original", "pruned", "w4a16"}
    assert all(values["perplexity"] > 1 for values in evaluation.values())
    assert AutoConfig.from_pretrained(full / "pruned").num_experts == 4

    assert main(argv) == 0  # second run: every stage verified by checksum and skipped
    again = json.loads((full / "pipeline.json").read_text())
    assert again == state


def test_corrupted_output_reruns_that_stage_and_the_ones_after(inputs, monkeypatch):
    config = _config(inputs, "resume")
    first = Pipeline(config)
    first.run()
    recorded = json.loads(first.state_path.read_text())["stages"]
    weights = first.pruned / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)  # damaged, but the folder is still there

    ran = []
    second = Pipeline(config)
    for stage in ("observe", "prune"):
        original = getattr(second, f"_{stage}")
        monkeypatch.setattr(second, f"_{stage}", lambda original=original, stage=stage: ran.append(stage) or original())
    second.run()
    assert ran == ["prune"]  # the observation was intact; the damaged pruned model was rebuilt
    rebuilt = json.loads(second.state_path.read_text())["stages"]
    assert rebuilt["prune"]["outputs"] == recorded["prune"]["outputs"]  # same bytes as the first time


def test_other_settings_in_the_same_output_are_refused(inputs):
    Pipeline(_config(inputs, "refuse")).run()
    with pytest.raises(PipelineError, match="other settings \\(compression_ratio\\)"):
        Pipeline(_config(inputs, "refuse", compression_ratio=0.25))
    redone = Pipeline(_config(inputs, "refuse", compression_ratio=0.25, overwrite=True)).run()
    assert set(redone["experts_kept"].values()) == {6}


@pytest.mark.parametrize("overrides, message", [
    (dict(compression_ratio=1.5), "compression-ratio"),
    (dict(quantize="w8a8"), "w4a16"),
    (dict(batch_size=0), "batch-size"),
])
def test_bad_settings_fail_before_any_work(inputs, overrides, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline(_config(inputs, "bad", **overrides))


def test_non_empty_foreign_output_is_refused(inputs):
    root = inputs[0]
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a pipeline")
    with pytest.raises(PipelineError, match="not empty"):
        Pipeline(_config(inputs, "foreign"))


def test_eval_without_held_out_text_is_refused(inputs, capsys):
    root, model, calib, _ = inputs
    code = main(["run", "--model", str(model), "--dataset", str(calib), "--eval", "--output", str(root / "noeval")])
    assert code == 2
    assert "--eval needs --eval-dataset" in capsys.readouterr().err
    assert not (root / "noeval").exists()
