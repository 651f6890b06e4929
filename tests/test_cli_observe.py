"""`reap-fast observe` end to end on the tiny model, and its one-line errors on bad input."""

import json

import pytest
import torch
from reap_fast.cli import main
from reap_fast.metrics import METRIC_DTYPES, load_metrics
from reap_lab.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 4) for i in range(12)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def _observe(checkpoint, dataset, output, *extra):
    return main(["observe", "--model", str(checkpoint), "--dataset", f"{dataset}:3", "--model-max-length", "64",
                 "--batch-size", "2", "--output", str(output), *extra])


def test_observe_cli_writes_metrics_and_prints_table(checkpoint, dataset, tmp_path, capsys):
    output = tmp_path / "obs.pt"
    assert _observe(checkpoint, dataset, output) == 0
    metrics = load_metrics(output)
    assert sorted(metrics) == [0, 1]
    for values in metrics.values():
        assert {key: values[key].dtype for key in METRIC_DTYPES} == METRIC_DTYPES
        assert int(values["total_tokens"]) > 0
        assert int(values["expert_frequency"].sum()) == 2 * int(values["total_tokens"])
    out = capsys.readouterr().out
    assert "top experts" in out and "saved 2 layers" in out


def test_observe_cli_is_deterministic_and_seed_sensitive(checkpoint, dataset, tmp_path):
    assert _observe(checkpoint, dataset, tmp_path / "a.pt") == 0
    assert _observe(checkpoint, dataset, tmp_path / "b.pt") == 0
    assert _observe(checkpoint, dataset, tmp_path / "c.pt", "--seed", "7") == 0
    a, b, c = (load_metrics(tmp_path / name) for name in ("a.pt", "b.pt", "c.pt"))
    for layer in a:
        for key in METRIC_DTYPES:
            assert torch.equal(a[layer][key], b[layer][key]), key
    assert any(not torch.equal(a[layer]["ean_sum"], c[layer]["ean_sum"]) for layer in a)


def test_observe_cli_refuses_to_overwrite(checkpoint, dataset, tmp_path, capsys):
    output = tmp_path / "obs.pt"
    output.write_bytes(b"keep me")
    assert _observe(checkpoint, dataset, output) == 2
    assert output.read_bytes() == b"keep me"
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "model folder not found"),
        ("not_a_model", "has no config.json"),
        ("dense_model", "not a supported MoE family"),
        ("missing_data", "no such file"),
        ("bad_spec", "spec"),
        ("bad_engine_device", "no CUDA device"),
        ("bad_device_name", "device must be"),
        ("bad_batch", "batch size"),
    ],
)
def test_observe_cli_bad_input_gives_one_line_error(case, message, checkpoint, dataset, tmp_path, capsys):
    model, data, extra = str(checkpoint), f"{dataset}:3", []
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "dense_model":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16))
        dense.save_pretrained(tmp_path / "dense")
        model = str(tmp_path / "dense")
    elif case == "missing_data":
        data = str(tmp_path / "absent.jsonl")
    elif case == "bad_spec":
        data = f"{dataset}:abc"
    elif case == "bad_engine_device":
        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
        extra = ["--device", "cuda"]
    elif case == "bad_device_name":
        extra = ["--device", "gpu0"]
    elif case == "bad_batch":
        extra = ["--batch-size", "0"]
    code = main(["observe", "--model", model, "--dataset", data, "--model-max-length", "64",
                 "--output", str(tmp_path / "o.pt"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert message in err.splitlines()[-1], err
    assert not (tmp_path / "o.pt").exists()
