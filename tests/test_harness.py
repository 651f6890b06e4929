"""lm-evaluation-harness evaluation (reap-fast eval, run --eval-tasks) and the pruning picture.

Offline: the tasks are defined here (YAML over local jsonl files: one multiple-choice, one generation
task) and run on the tiny model; lm-eval's "json" dataset loader reads them without any download.
"""

import json
import os
import struct
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from reap_fast.evaluate import harness
from reap_fast.cli import main
from reap_lab.corpus import write_jsonl
from reap_fast.evaluate import HarnessError, HarnessSettings, comparison_rows, format_table
from reap_fast.picture import draw, layer_pictures, picture_path
from reap_lab.tiny import make_tiny_checkpoint

needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None, reason="lm-eval not installed (extra 'eval')")

QUANTIZABLE = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, head_dim=32,
                   num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
TASKS = "tiny_mc,tiny_gen"
LIMIT = 6

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
metadata:
  version: 1.0
"""

# exact_match is lm-eval's own; generated_chars (the mean length of the generations) is defined in
# utils.py: on a random tiny model exact_match is 0 everywhere, and the length still moves with any
# change in what the model generates.
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
process_results: !function utils.process_results
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: generated_chars
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_UTILS = '''
def process_results(doc, results):
    output = results[0]
    return {"exact_match": float(output.strip() == doc["answer"].strip()), "generated_chars": float(len(output))}
'''

DIRECT = """
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
model, tasks, include, limit = sys.argv[1:5]
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},device=cpu", tasks=tasks.split(","),
                              limit=int(limit), task_manager=TaskManager(include_path=include, include_defaults=False),
                              log_samples=False)
print(json.dumps(out["results"], default=float))
"""


def write_tasks(folder: Path) -> Path:
    """The two offline tasks under ``folder/tasks``; returns that folder."""
    pairs = [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4), (6, 3), (2, 5)]
    mc = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), str(a * b + 2)], "label": i % 3}
          for i, (a, b) in enumerate(pairs)]
    gen = [{"prompt": f"def add_{i}(x):\n    return", "answer": f" x + {i}"} for i in range(8)]
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    for name, docs in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=folder / "mc.jsonl"))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=folder / "gen.jsonl"))
    (tasks / "utils.py").write_text(GEN_UTILS)
    return tasks


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model = make_tiny_checkpoint(root / "model", seed=3, **QUANTIZABLE)
    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # a line of code\n" * 6 for i in range(30)]
    calibration = write_jsonl(texts, root / "calib.jsonl")
    return root, model, write_tasks(root), calibration


@pytest.fixture(scope="module")
def direct(setup):
    """lm-eval's own numbers for the original folder, computed in a fresh process by lm_eval itself."""
    root, model, tasks, _ = setup
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    completed = subprocess.run([sys.executable, "-c", DIRECT, str(model), TASKS, str(tasks), str(LIMIT)],
                               capture_output=True, text=True, env=env, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if k not in ("alias", "name")} for task, values in results.items()}


# --- the comparison table (hand-made results) --------------------------------------------------------


def test_comparison_rows_ratios_and_table():
    results = {
        "original": {"results": {"arc": {"alias": "arc", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.4},
                                 "gen": {"exact_match,strict-match": 0.0}}},
        "pruned": {"results": {"arc": {"acc,none": 0.45, "acc_norm,none": 0.3},
                               "gen": {"exact_match,strict-match": 0.2}}},
        "w4a16": {"results": {"arc": {"acc,none": 0.25, "acc_norm,none": 0.4}}},
    }
    rows = comparison_rows(results)
    assert [(row["task"], row["metric"]) for row in rows] == [
        ("arc", "acc"), ("arc", "acc_norm"), ("gen", "exact_match,strict-match")]
    assert rows[0]["values"] == {"original": 0.5, "pruned": 0.45, "w4a16": 0.25}
    assert rows[0]["recovery"] == {"pruned": pytest.approx(0.9), "w4a16": pytest.approx(0.5)}
    assert rows[1]["recovery"] == {"pruned": pytest.approx(0.75), "w4a16": pytest.approx(1.0)}
    assert rows[2]["recovery"] == {"pruned": None, "w4a16": None}  # original 0; w4a16 missing
    table = format_table(rows, ["original", "pruned", "w4a16"]).splitlines()
    assert table[0].split() == ["task", "metric", "original", "pruned", "w4a16", "pruned/original", "w4a16/original"]
    assert table[2].split() == ["arc", "acc", "0.5000", "0.4500", "0.2500", "0.9000", "0.5000"]
    assert table[4].split() == ["gen", "exact_match,strict-match", "0.0000", "0.2000", "n/a", "n/a", "n/a"]


@pytest.mark.parametrize("overrides, message", [
    (dict(tasks=" , "), "no lm-eval task"),
    (dict(limit=0), "--limit"),
    (dict(num_fewshot=-1), "--num-fewshot"),
    (dict(batch_size="big"), "--batch-size"),
    (dict(include_path="/nonexistent/tasks"), "--include-path"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    settings = dict(tasks="a")
    settings.update(overrides)
    with pytest.raises(HarnessError, match=message):
        HarnessSettings(**settings)


def test_settings_accept_lm_eval_spellings():
    settings = HarnessSettings(tasks=["a,b", "c"], batch_size="auto:4", limit=0.5)
    assert settings.tasks == ["a", "b", "c"] and settings.batch_size == "auto:4"
    assert "device" not in settings.fingerprint()


# --- the picture --------------------------------------------------------------------------------------


def test_layer_pictures_sort_scores_and_count_removed_tokens(tmp_path):
    metrics = {
        0: {"reap": torch.tensor([0.5, 2.0, 0.1, 1.0]), "expert_frequency": torch.tensor([10, 30, 5, 15])},
        1: {"reap": torch.tensor([3.0, 3.0, 0.0, 1.0]), "expert_frequency": torch.tensor([8, 8, 0, 4])},
    }
    pictures = layer_pictures(metrics, {0: [0, 2], 1: [2]})
    assert pictures[0].scores == [2.0, 1.0, 0.5, pytest.approx(0.1)]
    assert pictures[0].removed == [False, False, True, True]
    assert pictures[0].removed_token_share == pytest.approx(15 / 60)
    assert pictures[0].removed_expert_share == 0.5
    assert pictures[1].scores == [3.0, 3.0, 1.0, 0.0] and pictures[1].removed == [False, False, False, True]
    assert pictures[1].removed_token_share == 0.0
    path = draw(pictures, "test", picture_path(tmp_path / "pruned"))
    assert path == tmp_path / "pruned.png"
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 400 and height > 300
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


# --- lm-eval on the tiny model --------------------------------------------------------------------------


@needs_lm_eval
def test_eval_command_reports_lm_evals_own_numbers(setup, direct, capsys):
    root, model, tasks, _ = setup
    output = root / "eval.json"
    code = main(["eval", "--model", str(model), "--tasks", TASKS, "--include_path", str(tasks),
                 "--limit", str(LIMIT), "--device", "cpu", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "brier_score" in printed and "generated_chars" in printed
    report = json.loads(output.read_text())
    ours = report["results"]["model"]["results"]
    assert _metrics(ours) == _metrics(direct)
    assert ours["tiny_gen"]["generated_chars,none"] > 0  # the generations were scored
    assert report["results"]["model"]["n-samples"]["tiny_mc"]["effective"] == LIMIT


@needs_lm_eval
@pytest.mark.skipif(find_spec("auto_round") is None, reason="auto-round not installed (extra 'quant')")
def test_run_with_eval_tasks_compares_three_models_and_resumes(setup, direct, capsys, monkeypatch):
    root, model, tasks, calibration = setup
    output = root / "run"
    argv = ["run", "--model", str(model), "--dataset", f"{calibration}:6", "--model-max-length", "128",
            "--batch-size", "3", "--compression-ratio", "0.5", "--quantize", "w4a16", "--iters", "0",
            "--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--output", str(output),
            "--eval-tasks", TASKS, "--eval-include-path", str(tasks), "--eval-limit", str(LIMIT)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "original", "pruned", "w4a16", "pruned/original", "w4a16/original"]
    assert f"picture of the pruning: {output / 'pruned.png'}" in printed
    report = json.loads((output / "lm_eval.json").read_text())
    assert list(report["results"]) == ["original", "pruned", "w4a16"]
    assert _metrics(report["results"]["original"]["results"]) == _metrics(direct)
    acc = next(row for row in report["comparison"] if row["task"] == "tiny_mc" and row["metric"] == "brier_score")
    values = acc["values"]
    assert acc["recovery"]["pruned"] == pytest.approx(values["pruned"] / values["original"])
    state = json.loads((output / "pipeline.json").read_text())
    assert "lm_eval.json" in state["stages"]["lm_eval"]["outputs"]

    def no_child(*args, **kwargs):
        raise AssertionError("a model was evaluated again")

    monkeypatch.setattr(harness, "evaluate_in_child", no_child)
    assert main(argv) == 0  # every stage verified by checksum and skipped
    assert json.loads((output / "pipeline.json").read_text()) == state
    (output / "lm_eval.json").unlink()  # interrupted after the models were evaluated: their files are reused
    assert main(argv) == 0
    assert json.loads((output / "lm_eval.json").read_text()) == report
    capsys.readouterr()

    # reap-fast prune draws the same picture beside its own output
    assert main(["prune", "--model", str(model), "--metrics", str(output / "observation.pt"), "--output",
                 str(root / "pruned-cli"), "--device", "cpu"]) == 0
    assert f"picture of the pruning: {root / 'pruned-cli.png'}" in capsys.readouterr().out
    assert (root / "pruned-cli.png").read_bytes() == (output / "pruned.png").read_bytes()


@needs_lm_eval
def test_unknown_task_is_one_line_before_any_work(setup, capsys, monkeypatch):
    root, model, tasks, _ = setup
    from lm_eval.tasks import TaskManager

    # lm-eval's own 14,000 task files take seconds to index; the local folder stands in for them here.
    monkeypatch.setattr(harness, "task_manager", lambda settings: TaskManager(include_path=str(tasks),
                                                                              include_defaults=False))
    assert main(["eval", "--model", str(model), "--tasks", "tiny_mc,no_such_task", "--include-path", str(tasks),
                 "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"reap-fast eval: error: unknown lm-eval task(s) no_such_task (searched lm-eval's tasks and "
                     f"{tasks}); `lm_eval ls tasks` lists them"]


def test_without_lm_eval_the_eval_command_says_how_to_install(setup):
    root, model, tasks, _ = setup
    hide = "import sys; sys.modules['lm_eval'] = None; from reap_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    completed = subprocess.run([sys.executable, "-c", hide, "eval", "--model", str(model), "--tasks", TASKS],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip() == "reap-fast eval: error: lm-eval is not installed (pip install 'reap-fast[eval]')"


@needs_lm_eval
def test_a_failed_evaluation_is_one_line_naming_the_model(setup, tmp_path, capsys):
    root, model, tasks, _ = setup
    task = tmp_path / "lost.yaml"  # a task named by its YAML file, whose data file is gone
    task.write_text(MC_YAML.replace("task: tiny_mc", "task: lost_mc").format(data=tmp_path / "missing.jsonl"))
    # the command finds the missing data before any model is evaluated (issue 24) ...
    assert main(["eval", "--model", str(model), "--tasks", str(task), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"reap-fast eval: error: the data of lm-eval task(s) {task} cannot be loaded")
    assert "missing.jsonl" in error
    # ... and an evaluation that fails in its child is one line naming the model
    with pytest.raises(HarnessError) as failed:
        harness.evaluate_in_child(model, HarnessSettings(tasks=[str(task)], device="cpu"))
    assert str(failed.value).startswith(f"lm-eval on {model} failed: ") and "\n" not in str(failed.value)


# --- the drop-in's --do_eval ---------------------------------------------------------------------------


@needs_lm_eval
def test_dropin_do_eval_skips_without_lm_eval_and_evaluates_with_it(setup, capsys):
    from reap_fast.upstream.main import main as dropin_main

    root, model, tasks, calibration = setup
    artifacts = root / "artifacts"
    argv = ["--model_name", str(model), "--dataset_name", str(calibration), "--batches_per_category", "4",
            "--model_max_length", "128", "--compression_ratio", "0.5", "--prune_method", "reap", "--device", "cpu",
            "--artifacts_dir", str(artifacts), "--lm_eval_tasks", str(tasks / "tiny_mc.yaml")]
    hide = ("import sys; sys.modules['lm_eval'] = None; from reap_fast.upstream.main import main; "
            "sys.exit(main(sys.argv[1:]))")
    completed = subprocess.run([sys.executable, "-c", hide, *argv], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]
    skipped = [line for line in completed.stdout.splitlines() if "evaluation skipped" in line]
    assert skipped == [f"evaluation skipped: lm-eval is not installed (pip install 'reap-fast[eval]'); tasks asked "
                       f"for: {tasks / 'tiny_mc.yaml'} (--do_eval false silences this line)"]
    assert not list(artifacts.rglob("lm_eval_results.json"))

    assert dropin_main(argv) == 0  # the observation and the pruned model are reused; now it evaluates
    printed = capsys.readouterr().out
    results = list(artifacts.rglob("eval/lm_eval_results.json"))
    assert len(results) == 1 and results[0].parent.parent.name.startswith("reap-")
    report = json.loads(results[0].read_text())
    assert report["settings"]["num_fewshot"] == 0 and report["settings"]["seed"] == 42  # upstream's choices
    assert list(report["results"]) == ["pruned"] and "tiny_mc" in report["results"]["pruned"]["results"]
    assert "tiny_mc" in printed and f"lm-eval results written to {results[0]}" in printed
