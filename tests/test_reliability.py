"""Regression tests for issue 13: users' files are never lost, runs never mix, inputs are checked first.

One test (or a small group) per case of the issue:
1. ``--overwrite`` never deletes an input or a folder reap-fast did not write; one flag name everywhere.
2. one process per output folder (lock), stale locks taken over.
3. child processes die with their parent; their temporary files go with them.
4. statistics files are validated (finite, non-negative, consistent, recorded on this model).
5. disk and model-folder problems are one line before any long work.
6. leftovers of killed runs are cleaned; outputs follow the umask.
7. messages: no hub lookup for paths, jsonl line numbers, one-line pickle refusals, SIGINT, real flags only.
8. no test asserts what one processor does (dtype, backend).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reap_fast.cli import build_parser, main
from reap_fast.identity import attach_identity
from reap_fast.metrics import MetricsFileError, load_metrics, save_metrics
from reap_fast.outputs import MARKER_FILE, OutputInUseError, OutputLock, clean_leftovers, lock_path, write_marker
from reap_fast.lab.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
TEXTS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (3 + i % 4) for i in range(12)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """s/models/a (a tiny checkpoint), s/models/b (another folder), calibration text, an observation of a."""
    root = tmp_path_factory.mktemp("rel")
    model = make_tiny_checkpoint(root / "s" / "models" / "a", seed=0)
    (root / "s" / "models" / "b").mkdir()
    (root / "s" / "models" / "b" / "keep.txt").write_text("b")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    obs = root / "obs.pt"
    assert _observe(model, data, obs) == 0
    return {"root": root, "model": model, "data": data, "obs": obs}


def _observe(model, data, output, *extra):
    return main(["observe", "--model", str(model), "--dataset", f"{data}:3", "--model-max-length", "64",
                 "--batch-size", "2", "--output", str(output), *extra])


def _prune(model, metrics, output, *extra):
    return main(["prune", "--model", str(model), "--metrics", str(metrics), "--output", str(output), *extra])


def _one_line(err: str) -> str:
    """The single message line of a refusal (progress bars aside), with no traceback."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(("reap-fast", "reap_fast"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ 1


def test_case1_overwrite_never_deletes_inputs_or_foreign_folders(setup, tmp_path, capsys):
    model, obs, models = setup["model"], setup["obs"], setup["model"].parent
    before = _tree(models)
    for output in (models, model, model / "pruned"):  # contains / is / is inside the model folder
        assert _prune(model, obs, output, "--overwrite") == 2
        assert "model folder" in _one_line(capsys.readouterr().err)
    assert _tree(models) == before  # a/ and its sibling b/ untouched

    foreign = tmp_path / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "sub" / "more.txt").write_text("mine too")
    assert _prune(model, obs, foreign, "--overwrite") == 2
    assert "not written by reap-fast" in _one_line(capsys.readouterr().err)
    assert _tree(foreign) == {"notes.txt": b"mine", "sub/more.txt": b"mine too"}

    # reap-fast's own output: refused without the flag, which is named as `reap-fast prune` spells it
    out = tmp_path / "pruned"
    assert _prune(model, obs, out, "--compression-ratio", "0.25") == 0
    assert (out / MARKER_FILE).is_file()
    capsys.readouterr()
    assert _prune(model, obs, out) == 2
    line = _one_line(capsys.readouterr().err)
    flags = set(re.findall(r"--[a-z][\w-]*", line))
    assert flags == {"--overwrite"}
    prune_options = {opt for action in _subparser("prune")._actions for opt in action.option_strings}
    assert flags <= prune_options
    assert _prune(model, obs, out, "--compression-ratio", "0.5", "--overwrite") == 0
    assert json.loads((out / "pruned_experts.json").read_text())["compression_ratio"] == 0.5

    # observe --overwrite replaces an observation file, not any file that happens to be there
    precious = tmp_path / "thesis.pt"
    precious.write_bytes(b"years of work")
    assert _observe(model, setup["data"], precious, "--overwrite") == 2
    assert "not an observation file" in _one_line(capsys.readouterr().err)
    assert precious.read_bytes() == b"years of work"

    # quantize: the parent of the model, or a non-model folder, is never replaced either
    for output in (models, foreign):
        code = main(["quantize", "--model", str(model), "--dataset", str(setup["data"]), "--output", str(output),
                     "--overwrite"])
        assert code == 2
        capsys.readouterr()
    assert _tree(models) == before and (foreign / "notes.txt").read_text() == "mine"


def _subparser(name: str):
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    return commands.choices[name]


# ------------------------------------------------------------------------------------------------ 2

HOLD_LOCK = """
import sys, time
from reap_fast.outputs import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_case2_one_process_per_output_and_stale_locks_are_taken_over(setup, tmp_path, capsys):
    output = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["run", "--model", str(setup["model"]), "--dataset", f"{setup['data']}:3", "--model-max-length", "64",
                "--output", str(output)]
        assert main(argv) == 2
        assert f"in use by pid {holder.pid}" in _one_line(capsys.readouterr().err)
        assert not output.exists()  # refused before any stage: nothing observed, nothing written
        for command in (["observe", "--model", str(setup["model"]), "--dataset", str(setup["data"])],
                        ["prune", "--model", str(setup["model"]), "--metrics", str(setup["obs"])]):
            assert main([*command, "--output", str(output)]) == 2
            assert f"in use by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(output).exists()  # a SIGKILL-ed owner leaves its lock file behind ...
    with OutputLock(output) as lock:  # ... which the next process takes over
        assert lock.path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(OutputInUseError, match=f"in use by pid {os.getpid()}"):
            OutputLock(output).acquire()
    assert not lock_path(output).exists()


# ------------------------------------------------------------------------------------------------ 3

# A parent that runs a child through run_child (as the pipeline runs quantization and evaluation).
PARENT = """
import sys
from reap_fast.children import run_child
from reap_fast.cli import _raise_system_exit
import signal
signal.signal(signal.SIGTERM, _raise_system_exit)
run_child([sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)",
           sys.argv[1]])
"""

# A parent that runs the quantization child with a stand-in interpreter that only sleeps.
QUANT_PARENT = """
import signal, sys
from reap_fast.cli import _raise_system_exit
from reap_fast.quantize import run_quantize_subprocess
signal.signal(signal.SIGTERM, _raise_system_exit)  # as the reap-fast CLI does
run_quantize_subprocess(sys.argv[1], sys.argv[2], ["some text"], python=sys.argv[3])
"""


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


@pytest.mark.parametrize("parent_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_case3_children_die_with_their_parent(tmp_path, parent_signal):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pid_file)])
    assert _wait_for(lambda: pid_file.exists() and pid_file.read_text())
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.send_signal(parent_signal)
    parent.wait(timeout=30)
    assert _wait_for(lambda: not _alive(child)), "the child outlived its parent"


@pytest.mark.parametrize("parent_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_case3_quantization_child_and_its_texts_go_with_the_parent(setup, tmp_path, parent_signal):
    fake_python = tmp_path / "fake-python"
    started = tmp_path / "started"
    fake_python.write_text(f"#!/bin/sh\necho $$ > {started}\nexec sleep 120\n")
    fake_python.chmod(0o755)
    output = tmp_path / "out" / "w4a16"
    parent = subprocess.Popen([sys.executable, "-c", QUANT_PARENT, str(setup["model"]), str(output), str(fake_python)])
    assert _wait_for(lambda: started.exists() and started.read_text().strip())
    child = int(started.read_text())
    scratch = [p for p in output.parent.iterdir() if ".scratch-" in p.name]
    assert len(scratch) == 1 and (scratch[0] / "texts.json").is_file()
    parent.send_signal(parent_signal)
    parent.wait(timeout=30)
    assert _wait_for(lambda: not _alive(child)), "the quantization child outlived its parent"
    if parent_signal == signal.SIGKILL:  # nothing ran in the parent: the next run in the folder cleans up
        assert scratch[0].exists()
        assert clean_leftovers(output) == [scratch[0]]
    assert not scratch[0].exists()
    assert not output.exists()


# ------------------------------------------------------------------------------------------------ 4


def _corrupt(setup, tmp_path, name, change):
    metrics = load_metrics(setup["obs"])
    change(metrics[0])
    path = tmp_path / name
    torch.save({layer: dict(values) for layer, values in metrics.items()}, path)
    return path


@pytest.mark.parametrize("name, change, message", [
    ("nan.pt", lambda m: m["reap"].__setitem__(0, float("nan")), "non-finite"),
    ("allnan.pt", lambda m: m["reap"].fill_(float("nan")), "non-finite"),
    ("inf.pt", lambda m: m["weighted_ean_sum"].__setitem__(1, float("inf")), "non-finite"),
    ("negative.pt", lambda m: m["expert_frequency"].__setitem__(2, -5), "negative"),
    ("mean.pt", lambda m: m["ean_mean"].mul_(2), "ean_mean of expert"),
    ("reap.pt", lambda m: m["reap"].add_(0.5), "reap of expert"),
    ("tokens.pt", lambda m: m["total_tokens"].fill_(1), "exceeds total_tokens"),
])
def test_case4_statistics_are_validated_before_use(setup, tmp_path, capsys, name, change, message):
    path = _corrupt(setup, tmp_path, name, change)
    with pytest.raises(MetricsFileError, match=message):
        load_metrics(path)
    assert _prune(setup["model"], path, tmp_path / "out") == 2
    assert message in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_case4_statistics_of_another_model_with_the_same_shapes_are_refused(setup, tmp_path, capsys):
    metrics = load_metrics(setup["obs"])
    assert metrics.identity["model_type"] == "qwen3_moe" and metrics.identity["num_experts"] == 8
    other = dict(metrics.identity, model_type="gpt_oss", model="/models/gpt-oss-tiny")
    save_metrics(attach_identity(metrics, other), tmp_path / "other.pt")
    assert _prune(setup["model"], tmp_path / "other.pt", tmp_path / "out") == 2
    line = _one_line(capsys.readouterr().err)
    assert "observed on another model (/models/gpt-oss-tiny)" in line and "model family" in line
    # same family, same shapes, other architecture config
    save_metrics(attach_identity(metrics, dict(metrics.identity, config_sha256="0" * 64)), tmp_path / "cfg.pt")
    assert _prune(setup["model"], tmp_path / "cfg.pt", tmp_path / "out") == 2
    assert "config differs" in _one_line(capsys.readouterr().err)
    # upstream REAP's files carry no identity: accepted on their shapes and numbers
    plain = tmp_path / "upstream.pt"
    torch.save({layer: dict(values) for layer, values in metrics.items()}, plain)
    assert load_metrics(plain).identity is None
    assert _prune(setup["model"], plain, tmp_path / "out", "--compression-ratio", "0.25") == 0


# ------------------------------------------------------------------------------------------------ 5


def _copy_model(setup, folder: Path, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True)
    for path in setup["model"].iterdir():
        if path.name not in skip:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_case5_model_folder_problems_are_one_line(setup, tmp_path, capsys):
    no_weights = _copy_model(setup, tmp_path / "no_weights", skip=("model.safetensors",))
    truncated = _copy_model(setup, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = _copy_model(setup, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    no_tokenizer = _copy_model(setup, tmp_path / "no_tokenizer", skip=("tokenizer.json", "tokenizer_config.json"))
    cases = [(no_weights, "no weight files"), (truncated, "truncated"), (garbage, "corrupt"),
             (no_tokenizer, "no tokenizer files")]
    for folder, message in cases:
        assert _observe(folder, setup["data"], tmp_path / f"{folder.name}.pt") == 2
        assert message in _one_line(capsys.readouterr().err)
        assert _prune(folder, setup["obs"], tmp_path / f"{folder.name}-pruned") == 2
        assert message in _one_line(capsys.readouterr().err)
        assert not (tmp_path / f"{folder.name}-pruned").exists()  # never a made-up tokenizer, never a model


def test_case5_output_location_problems_stop_before_observation(setup, tmp_path, capsys, monkeypatch):
    import reap_fast.preflight as preflight

    base = ["run", "--model", str(setup["model"]), "--dataset", f"{setup['data']}:3", "--model-max-length", "64"]
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 20))  # a full disk
    assert main([*base, "--output", str(tmp_path / "full")]) == 2
    assert "not enough free space" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    assert main([*base, "--output", str(tmp_path / "readonly")]) == 2
    assert "not writable" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    for path in (tmp_path / "full", tmp_path / "readonly"):
        assert not (path / "observation.pt").exists()

    # run checks quantizability (the tiny model's sizes are not multiples of 128) and held-out text first
    assert main([*base, "--quantize", "w4a16", "--output", str(tmp_path / "q")]) == 2
    assert "group_size 128" in _one_line(capsys.readouterr().err)
    assert main([*base, "--eval-dataset", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "e")]) == 2
    assert "no such file or folder" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "q" / "observation.pt").exists() and not (tmp_path / "e" / "observation.pt").exists()


# ------------------------------------------------------------------------------------------------ 6


def test_case6_leftovers_of_killed_runs_are_cleaned_and_outputs_follow_the_umask(setup, tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    leftovers = [tmp_path / f".pruned.tmp-p{dead}-ab12cd34", tmp_path / f".pruned.partial-p{dead}-x_1",
                 tmp_path / f".pruned.ar-work-p{dead}-y2"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".pruned.tmp-p{dead}-f00.tmp").write_bytes(b"half a file")
    kept = [tmp_path / f".pruned.tmp-p{alive}-live", tmp_path / ".pruned.tmp-nopid", tmp_path / ".git",
            tmp_path / f".other.tmp-p{dead}-zz"]
    for folder in kept:
        folder.mkdir()
    previous = os.umask(0o022)
    try:
        assert _prune(setup["model"], setup["obs"], tmp_path / "pruned", "--compression-ratio", "0.25") == 0
        assert _observe(setup["model"], setup["data"], tmp_path / "obs.pt") == 0
    finally:
        os.umask(previous)
    assert not any(path.exists() for path in leftovers) and not (tmp_path / f".pruned.tmp-p{dead}-f00.tmp").exists()
    assert all(path.exists() for path in kept)  # a live run's work, and names reap-fast did not make
    assert stat.S_IMODE((tmp_path / "pruned").stat().st_mode) == 0o755
    for path in [tmp_path / "obs.pt", *(tmp_path / "pruned").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ------------------------------------------------------------------------------------------------ 7


def test_case7_messages(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(setup["root"])
    # a missing relative path is "model folder not found", never a hub lookup
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError(f"hub lookup for {args[:1]}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for missing in ("s/models/zz", "s/nothing", "./x", "~/no-such-model-folder"):
        assert _observe(missing, setup["data"], tmp_path / "o.pt") == 2
        assert "model folder not found" in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    monkeypatch.chdir(setup["root"])
    # the same for a calibration path (its first folder exists here, so it is not a hub dataset name)
    assert _observe(setup["model"], "s/missing-data", tmp_path / "o.pt") == 2
    assert "no such file or folder 's/missing-data'" in _one_line(capsys.readouterr().err)

    # a malformed jsonl line is reported by its line number
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": broken\n')
    assert _observe(setup["model"], f"{bad}", tmp_path / "o.pt") == 2
    assert "line 3" in _one_line(capsys.readouterr().err)

    # a pickle with Python objects: one line, and no advice to turn the safety off
    pickled = tmp_path / "pickled.pt"
    torch.save({0: {"reap": torch.zeros(8), "payload": Path("/etc/passwd")}}, pickled)
    assert _prune(setup["model"], pickled, tmp_path / "out") == 2
    line = _one_line(capsys.readouterr().err)
    assert "refuses to unpickle" in line and "weights_only=False" not in line

    # the same file under two spellings is one category, not two
    spec = f"{setup['data']}:2,{Path(os.path.relpath(setup['data'], setup['root']))}"
    assert _observe(setup["model"], spec, tmp_path / "o.pt") == 2  # (_observe appends ":3" to the second)
    assert "same file" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "o.pt").exists()


INTERRUPTED = """
import sys, time
import reap_fast.cli as cli
def slow(args):
    print("READY", flush=True)
    time.sleep(60)
cli.COMMANDS["observe"] = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_case7_sigint_ends_with_one_line_and_exit_130(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, "observe", "--model", "m", "--dataset", "d", "--output", "o.pt"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    assert process.stdout.readline().strip() == "READY"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130
    assert _one_line(err) == "reap-fast observe: interrupted"


def _all_cli_options() -> set[str]:
    """Every option of reap-fast's subcommands and of its other command lines."""
    from reap_fast.upstream.args import build_parser as dropin_parser

    parsers = [build_parser(), dropin_parser(False), dropin_parser(True)]
    commands = next(action for action in parsers[0]._actions if action.dest == "command")
    parsers += list(commands.choices.values())
    options = {opt for parser in parsers for action in parser._actions for opt in action.option_strings}
    # the evaluation child (its parser is built inside its main)
    usage = subprocess.run([sys.executable, "-m", "reap_fast.evaluate", "--help"], capture_output=True, text=True)
    return options | set(re.findall(r"--[a-z][a-z0-9_-]*", usage.stdout))


def test_case7_hints_name_only_options_the_cli_has():
    from reap_fast.quantize import QuantizationError, check_group_size
    from reap_fast.lab.tiny import tiny_qwen3_moe_config

    with pytest.raises(QuantizationError) as error:
        check_group_size(tiny_qwen3_moe_config(), 128)
    assert "--group-size" not in str(error.value)  # `reap-fast quantize` and `run` have no such option
    options = _all_cli_options()
    package = REPO / "reap_fast"
    modules = [package / name for name in ("cli.py", "pipeline.py", "outputs.py", "preflight.py",
                                           "metrics.py", "identity.py", "errors.py", "devices.py")]
    for folder in ("prune", "observe", "data", "upstream", "quantize"):
        modules += sorted((package / folder).glob("*.py"))
    source = "\n".join(path.read_text() for path in modules if path.is_file())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", source))
    placeholders = {"--nproc-per-node", "--flag", "--flag-name", "--flag_name", "--no_flag"}  # torchrun's, docs
    unknown = sorted(flag for flag in named if flag not in options and flag not in placeholders)
    assert not unknown, f"messages or docs name options no command line has: {unknown}"
    documents = (REPO / "reap_fast" / "data" / "documents.py").read_text()
    assert "column=" not in documents.split("def _resolve_columns")[1][:1500]


# ------------------------------------------------------------------------------------------------ 8


def test_case8_no_test_asserts_one_processors_dtype_or_backend():
    """The quantized model's compute dtype is read from the model (auto-round picks float16 or bfloat16 by
    the processor's features); no test compares it, or a backend name, with a fixed value."""
    pattern = re.compile(r"assert .*(\[\"dtype\"\]|\.dtype\)?|backend\w*) == [\"']?(torch\.)?(b?float16|auto_round:)")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((REPO / "tests").glob("test_*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
    reload_test = (REPO / "tests" / "test_quantize.py").read_text()
    assert 'getattr(torch, result["dtype"]' in reload_test  # references are built in the model's own dtype
