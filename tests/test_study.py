"""Training, the quality study and the benchmark report, on minuscule settings (seconds each)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reap_fast.config import ConfigError
from reap_lab.train import TrainConfig, routing_statistics, split_documents, switch_aux_loss, train_tiny_moe

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    num_experts=4,
)
TRAIN = dict(batch_size=4, seq_len=32, config_overrides=TINY, eval_max_rows=4, log_every=5)


def tiny_documents() -> dict[str, list[str]]:
    prose = [
        f"Return the {w} of the {o}. The {o} must be a sequence; an empty {o} raises ValueError number {i}."
        for i, (w, o) in enumerate([("sum", "list"), ("mean", "data"), ("median", "values"), ("mode", "items")] * 6)
    ]
    code = [f"def f_{i}(x, y={i}):\n    if x > y:\n        return x - y\n    return [x] * {i}\n" for i in range(24)]
    return {"docs": prose, "code": code}


@pytest.fixture
def one_thread():
    """Single-threaded torch (reproducible and fastest on a shared 2-core box); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_split_is_by_document_and_disjoint():
    docs = {"a": [f"doc a{i}" for i in range(30)], "b": [f"doc b{i}" for i in range(10)]}
    splits = split_documents(docs, seed=3)
    for category, texts in docs.items():
        parts = [splits[s][category] for s in ("train", "calibration", "eval")]
        assert sorted(sum(parts, [])) == sorted(texts)  # every document exactly once
        assert all(parts)
    assert len(splits["train"]["a"]) == 24 and len(splits["eval"]["a"]) == 3
    assert split_documents(docs, seed=3) == splits
    assert split_documents(docs, seed=4) != splits


def test_switch_aux_loss_is_one_when_balanced():
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 5.0  # every expert first choice of 2 tokens
    balanced = switch_aux_loss([logits], top_k=1)
    collapsed = switch_aux_loss([torch.tensor([[5.0, 0, 0, 0]] * 8)], top_k=1)
    assert balanced.item() == pytest.approx(1.0, abs=0.05)
    assert collapsed.item() > 3.0


def test_training_reduces_loss_and_is_deterministic(tmp_path, one_thread):
    documents = tiny_documents()
    first = train_tiny_moe(tmp_path / "a", TrainConfig(steps=15, seed=1, **TRAIN), documents=documents)
    second = train_tiny_moe(tmp_path / "b", TrainConfig(steps=15, seed=1, **TRAIN), documents=documents)
    info = json.loads((first / "train_info.json").read_text())
    history = info["history"]
    assert history[-1]["lm_loss"] < history[0]["lm_loss"] - 0.5
    assert info["after"]["eval"]["docs"]["perplexity"] < info["before"]["eval"]["docs"]["perplexity"]
    routing = info["after"]["routing"]
    assert len(routing["layers"]) == 2 and routing["tokens"] > 0
    for layer in routing["layers"]:
        assert sum(layer["usage_share"]) == pytest.approx(1.0, abs=1e-4)
        assert 0 <= layer["usage_entropy"] <= 1 and 0 <= layer["token_entropy"] <= 1
        assert 0 <= layer["category_js_bits"] <= 1
    # same seed -> same weights and same loss curve
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    other = json.loads((second / "train_info.json").read_text())
    assert [h["lm_loss"] for h in other["history"]] == [h["lm_loss"] for h in history]
    # a usable Hugging Face checkpoint with its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(first)
    assert AutoTokenizer.from_pretrained(first).eos_token_id == 256
    assert model.config.num_experts == 4 and model.config.output_router_logits is False


def test_train_config_refuses_bad_settings_before_work(tmp_path):
    for bad in (dict(steps=0), dict(batch_size=0), dict(lr=0.0), dict(grad_clip=-1.0), dict(eval_max_rows=0),
                dict(warmup_steps=-1), dict(threads=0), dict(seed=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            train_tiny_moe(tmp_path / "never", TrainConfig(**bad), documents=tiny_documents())
    assert not (tmp_path / "never").exists()


def test_train_config_values():
    assert TrainConfig(steps=50).warmup == 5 and TrainConfig(steps=5000).warmup == 100
    assert TrainConfig(steps=50, warmup_steps=7).warmup == 7 and TrainConfig(warmup_steps=0).warmup == 0
    overrides = {"num_experts": 4}
    config = TrainConfig(config_overrides=overrides)
    overrides["num_experts"] = 8  # the config keeps what it was given, read-only
    assert dict(config.config_overrides) == {"num_experts": 4}
    with pytest.raises(TypeError):
        config.config_overrides["num_experts"] = 2
    assert dict(TrainConfig().config_overrides) == {} and TrainConfig() == TrainConfig(config_overrides=None)


def test_study_builds_the_train_config_and_refuses_bad_train_options():
    config = study_config(steps=12, seq_len=32, threads=1)
    train = config.train_config(5)
    assert (train.steps, train.seed, train.seq_len, train.threads) == (12, 5, 32, 1)
    assert (train.batch_size, train.eval_max_rows, train.log_every) == (4, 4, 5)  # from train_options
    assert dict(train.config_overrides) == TINY
    with pytest.raises(ConfigError, match="may not set steps"):
        study_config(train_options={"steps": 3})
    with pytest.raises(ConfigError, match="unknown TrainConfig setting.*warmup"):
        study_config(train_options={"warmup": 3})
    with pytest.raises(ConfigError, match="lr"):
        study_config(train_options={"lr": -1.0})


def test_routing_statistics_counts_only_document_tokens(one_thread):
    from reap_fast.evaluate import EvalRows
    from reap_lab.tiny import build_model, tiny_qwen3_moe_config

    model = build_model(tiny_qwen3_moe_config(num_hidden_layers=1, num_experts=4), seed=0)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = torch.ones(2, 8, dtype=torch.bool)
    stats[1, 4:] = False
    report = routing_statistics(model, {"x": EvalRows(ids, torch.ones_like(ids), stats)})
    assert report["tokens"] == 12
    layer = report["layers"][0]
    assert layer["usage_cv"] >= 0 and layer["max_min_ratio"] >= 1
    assert "category_js_bits" not in layer  # one category only


def study_config(**changes):
    from reap_lab.study import StudyConfig

    options = dict(train_seeds=2, seeds=2, steps=10, seq_len=32, batch_size=4, calib_samples=2, eval_rows=None,
                   train_options={k: v for k, v in TRAIN.items() if k != "seq_len"})
    options.update(changes)
    return StudyConfig(**options)


def test_study_end_to_end_and_resume(tmp_path, one_thread, monkeypatch):
    from reap_lab import study as study_module
    from reap_lab.study import DEFAULT_METHODS, run_study
    from reap_fast.evaluate import perplexity

    out, work = tmp_path / "out", tmp_path / "work"
    config = study_config()
    results = run_study(config, out, work, documents=tiny_documents())
    for name in ("results.json", "results.md", "quality.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 2 * 2 * len(DEFAULT_METHODS) * 2  # models x calibration seeds x methods x ratios
    base = saved["baseline"]["0"]
    assert math.isfinite(base["perplexity"]) and base["tokens"] > 0
    assert set(base["by_category"]) == {"code", "docs"}
    for run in saved["runs"]:
        assert math.isfinite(run["perplexity"]) and 0 <= run["next_token_accuracy"] <= 1
        assert run["experts_kept"] == {0.25: 3, 0.5: 2}[run["compression_ratio"]]
        assert all(len(kept) == run["experts_kept"] for kept in run["kept"].values())
        assert run["tokens"] == base["tokens"]
        assert 0.0 <= run["removed_traffic_share"] <= 1.0
        # frequency pruning removes the least-used experts: the least routed traffic of all methods
        frequency = next(r for r in saved["runs"] if r["method"] == "frequency" and r["seed"] == run["seed"]
                         and r["train_seed"] == run["train_seed"] and r["compression_ratio"] == run["compression_ratio"])
        assert frequency["removed_traffic_share"] <= run["removed_traffic_share"] + 1e-12
    # the unpruned score equals a direct perplexity call on the stored checkpoint (all eval documents)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reap_lab.train import split_documents

    checkpoint = Path(saved["training"]["1"]["checkpoint"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    splits = split_documents(tiny_documents(), seed=0)
    direct = {c: perplexity(model, tokenizer, splits["eval"][c], seq_len=32, batch_size=4) for c in ("code", "docs")}
    nll = sum(d["mean_nll"] * d["tokens"] for d in direct.values()) / sum(d["tokens"] for d in direct.values())
    assert saved["baseline"]["1"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-9)
    summary = saved["summary"]
    assert summary["models"] == 2 and summary["methods"]["0.5"]["reap"]["jaccard_with_reap"] == pytest.approx(1.0)
    # the per-model mean averages that model's calibration seeds
    reap = [r["perplexity"] for r in saved["runs"] if r["method"] == "reap" and r["compression_ratio"] == 0.5
            and r["train_seed"] == 1]
    assert summary["methods"]["0.5"]["reap"]["perplexity_by_model"]["1"] == pytest.approx(sum(reap) / 2)
    assert len(summary["comparisons"]) == 2 * len(DEFAULT_METHODS) * (len(DEFAULT_METHODS) - 1) // 2
    # every method's overlap with REAP, recomputed by hand from the kept sets of the same model and seed
    for ratio, methods in summary["methods"].items():
        for method, entry in methods.items():
            per_run = []
            for run in saved["runs"]:
                if run["method"] != method or f"{run['compression_ratio']:g}" != ratio:
                    continue
                reap_run = next(r for r in saved["runs"] if r["method"] == "reap" and r["seed"] == run["seed"]
                                and r["train_seed"] == run["train_seed"]
                                and r["compression_ratio"] == run["compression_ratio"])
                layers = [(set(run["kept"][layer]), set(reap_run["kept"][layer])) for layer in run["kept"]]
                per_run.append(sum(len(a & b) / len(a | b) for a, b in layers) / len(layers))
            assert entry["jaccard_with_reap"] == pytest.approx(sum(per_run) / len(per_run)), (ratio, method)
    assert any(entry["jaccard_with_reap"] < 1.0 for entry in summary["methods"]["0.5"].values())
    markdown = (out / "results.md").read_text()
    assert "| reap |" in markdown and "| random |" in markdown and "unpruned" in markdown
    assert "Expected spread of `--quick`" in markdown and saved["environment"]["cpu"]["model_name"]

    # an interrupted run resumes: drop two stored evaluations, the rerun redoes exactly those
    record_path = work / "results" / "train1.json"
    record = json.loads(record_path.read_text())
    dropped = sorted(record["runs"])[:2]
    for key in dropped:
        del record["runs"][key]
    record_path.write_text(json.dumps(record))
    evaluated = []
    real_evaluate = study_module._evaluate

    def counting_evaluate(model, rows, batch_size):
        evaluated.append(model)
        return real_evaluate(model, rows, batch_size)

    monkeypatch.setattr(study_module, "_evaluate", counting_evaluate)
    again = run_study(config, out, work, documents=tiny_documents(), plot=False)
    assert len(evaluated) == 2
    assert all(t["reused_checkpoint"] for t in again["training"].values())
    key = lambda r: (r["train_seed"], r["seed"], r["method"], r["compression_ratio"])  # noqa: E731
    assert {key(r): r["perplexity"] for r in again["runs"]} == \
        pytest.approx({key(r): r["perplexity"] for r in saved["runs"]}, rel=1e-12)
    # other evaluation settings are not mixed with stored ones
    evaluated.clear()
    run_study(study_config(train_seeds=1, seeds=1, methods=("reap",), ratios=(0.5,), eval_rows=1), out, work,
              documents=tiny_documents(), plot=False)
    assert len(evaluated) == 2  # baseline and the one run, on the reused checkpoint


def test_quick_comparison_against_committed_spread(tmp_path, one_thread):
    from reap_lab.study import QUICK_METHODS, run_study
    from reap_lab.study_report import compare_with, comparison_markdown

    work = tmp_path / "work"
    committed = run_study(study_config(train_seeds=3, seeds=1, methods=QUICK_METHODS), tmp_path / "full", work,
                          documents=tiny_documents(), plot=False)
    quick = run_study(study_config(train_seeds=1, seeds=1, methods=QUICK_METHODS), tmp_path / "quick",
                      tmp_path / "quick-work", documents=tiny_documents(), plot=False)
    # same seed, threads and machine: the retrained model and its scores are identical
    comparison = compare_with(quick, committed)
    assert comparison["total"] == 1 + 2 * len(QUICK_METHODS)
    assert comparison["same_processor_and_torch"] is True
    for cell in comparison["cells"]:
        assert cell["perplexity"] == cell["committed_same_seed"]
        assert cell["inside_range"]
    assert comparison["inside_range"] == comparison["total"]
    spread = committed["summary"]["methods"]["0.5"]["reap"]["quick_spread"]
    values = [r["perplexity"] for r in committed["runs"] if r["method"] == "reap" and r["compression_ratio"] == 0.5]
    assert (spread["min"], spread["max"]) == (min(values), max(values))
    assert "inside the committed range" in comparison_markdown(comparison)
    # a model the committed study never trained has no same-seed figure; the settings name its seed
    other = run_study(study_config(train_seeds=1, first_train_seed=7, seeds=1, methods=("reap",), ratios=(0.5,)),
                      tmp_path / "other", tmp_path / "quick-work", documents=tiny_documents(), plot=False)
    assert other["settings"]["train_seeds"] == [7] and set(other["baseline"]) == {"7"}
    assert all(c["committed_same_seed"] is None for c in compare_with(other, committed)["cells"])
    # a value outside the committed spread is flagged
    moved = json.loads(json.dumps(quick))
    moved["runs"][0]["perplexity"] = 1e6
    assert compare_with(moved, committed)["inside_range"] == comparison["total"] - 1


def test_study_command_line_rejects_bad_settings(capsys):
    from reap_lab.study import main

    assert main(["--methods", "reap", "no_such_method", "--work", "/nonexistent/never"]) == 2
    assert "unknown or no methods" in capsys.readouterr().err
    assert main(["--ratios", "1.5"]) == 2
    assert main(["--train-seeds", "-1"]) == 2
    assert main(["--quick", "--compare", "/nonexistent/results.json"]) == 2
    assert "no results to compare with" in capsys.readouterr().err
    assert main(["--from-json", "/nonexistent/results.json"]) == 2
    assert "no results.json at" in capsys.readouterr().err


def test_reference_without_spread_is_refused_before_work(tmp_path, capsys):
    from reap_lab.study import main
    from reap_lab.study_report import RESULTS_FORMAT

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": 1, "runs": []}))
    assert main(["--quick", "--compare", str(old), "--work", str(tmp_path / "never")]) == 2
    assert "format" in capsys.readouterr().err
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"format": RESULTS_FORMAT, "summary": {"models": 1}}))
    assert main(["--quick", "--compare", str(one), "--work", str(tmp_path / "never")]) == 2
    assert "fewer than two" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()



def test_quick_run_finds_the_committed_study():
    """``--quick`` compares with bench/quality/results.json of the repository (the lab lives two floors down)."""
    from reap_lab.study import COMMITTED_RESULTS
    from reap_lab.study_report import RESULTS_FORMAT

    assert COMMITTED_RESULTS == REPO / "bench" / "quality" / "results.json"
    assert json.loads(COMMITTED_RESULTS.read_text())["format"] == RESULTS_FORMAT

# --- bench/report.py ----------------------------------------------------------------------------------------


def load_report_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_benchmark_json(device, medians):
    benchmarks = []
    for (variant, tokens), median in medians.items():
        benchmarks.append({
            "name": f"test_moe_layer[{variant}-{tokens}]",
            "group": f"moe_layer T={tokens}",
            "params": {"variant": variant, "num_tokens": tokens},
            "stats": {"median": median, "min": median * 0.9, "mean": median, "rounds": 5},
            "extra_info": {"variant": variant, "T": tokens, "E": 128, "k": 8, "H": 2048, "I": 768, "dtype": "bfloat16",
                           "device": device, "hf_impl": "grouped_mm"},
        })
    return {
        "machine_info": {"node": "x", "reap_fast": {"device": device, "torch": "2.11.0", "triton": "3.6.0",
                                                    "transformers": "5.17.0", "triton_interpret": False}},
        "benchmarks": benchmarks,
    }


def test_report_tables_and_plot(tmp_path):
    report = load_report_module()
    medians = {("upstream_hook", 2048): 0.040, ("triton_stats", 2048): 0.010, ("hf_fastest", 2048): 0.008,
               ("upstream_hook", 8192): 0.160, ("triton_stats", 8192): 0.020, ("hf_fastest", 8192): 0.016}
    (tmp_path / "h100.json").write_text(json.dumps(pytest_benchmark_json("NVIDIA H100 80GB HBM3", medians)))
    # the fallback format, missing versions and shape fields
    (tmp_path / "cpu.json").write_text(json.dumps({
        "machine_info": {"reap_fast": {"device": "cpu", "triton_interpret": True}},
        "results": [{"variant": "upstream_hook", "T": 64, "median_s": 0.5},
                    {"variant": "triton_stats", "T": 64, "median_s": 2.0},
                    {"variant": "no_baseline_here", "T": 128, "median_s": 1.0}],
    }))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "bare.json").write_text(json.dumps({"benchmarks": [{"name": "test_x", "stats": {"median": 0.1}}]}))
    files = sorted(str(p) for p in tmp_path.glob("*.json"))
    rows = report.add_speedups(report.load_measurements(files))
    h100 = {(r["variant"], r["tokens"]): r for r in rows if r["device"].startswith("NVIDIA")}
    assert h100[("triton_stats", 2048)]["speedup"] == pytest.approx(4.0)
    assert h100[("triton_stats", 8192)]["speedup"] == pytest.approx(8.0)
    assert h100[("upstream_hook", 8192)]["speedup"] == pytest.approx(1.0)
    cpu = {(r["variant"], r["tokens"]): r for r in rows if r["device"] == "cpu"}
    assert cpu[("triton_stats", 64)]["speedup"] == pytest.approx(0.25)
    assert cpu[("no_baseline_here", 128)]["speedup"] is None
    text = report.markdown(rows)
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.11.0" in text and "(8.00x)" in text
    assert "not speed measurements" in text  # the interpreter run is flagged
    png = tmp_path / "speedup.png"
    assert report.main(files + ["--plot", str(png)]) == 0
    assert png.is_file() and png.stat().st_size > 0
    assert report.main(files + ["--plot", "", "--write-readme"]) == 0
    assert report.markdown([]).startswith("_No benchmark results")
