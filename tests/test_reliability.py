"""Regression tests for issues 13 and 24: users' files are never lost, runs never mix, inputs are checked first,
every path a command writes follows one rule (reap_fast.outputs.claim_output).

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
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reap_fast.cli import build_parser, main
from reap_fast.config import ConfigError
from reap_fast.identity import attach_identity
from reap_fast.metrics import MetricsFileError, load_metrics, save_metrics
from reap_fast.outputs import (
    MARKER_FILE,
    OutputError,
    OutputInUseError,
    OutputLock,
    clean_leftovers,
    lock_path,
    write_marker,
)
from reap_lab.tiny import make_tiny_checkpoint

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
    (out / MARKER_FILE).unlink()  # only the marker says reap-fast wrote a folder, not its metadata files
    assert _prune(model, obs, out, "--overwrite") == 2
    assert "not written by reap-fast" in _one_line(capsys.readouterr().err)
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
from reap_fast.children import run_child, sigterm_raises_system_exit
sigterm_raises_system_exit()
run_child([sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)",
           sys.argv[1]])
"""

# A parent that runs the quantization child with a stand-in interpreter that only sleeps.
QUANT_PARENT = """
import sys
from reap_fast.children import sigterm_raises_system_exit
from reap_fast.quantize import run_quantize_subprocess
sigterm_raises_system_exit()  # as the reap-fast CLI does
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
    from reap_lab.tiny import tiny_qwen3_moe_config

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


# ================================================================================================
# Issue 24: every path a user names is an output contract. One test per case of the issue (1-12),
# each of which failed on main before it; then the writers are enumerated (a new writer needs a test).
# ================================================================================================

ENOSPC = OSError(28, "No space left on device")


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def test_i24_case1_checkpoint_dir_never_deletes_what_reap_fast_did_not_make(setup, tmp_path, capsys, monkeypatch):
    model, data = setup["model"], setup["data"]
    monkeypatch.chdir(tmp_path)
    before = _tree(model.parent)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cases = [(model, "is the model folder"), (model.parent, "contains the model folder"),
             (model / "ck", "inside the model folder"), (mine, "not made by reap-fast")]
    for folder, message in cases:
        assert _observe(model, data, tmp_path / "o.pt", "--checkpoint-dir", str(folder)) == 2
        line = _one_line(capsys.readouterr().err)
        assert message in line and "--checkpoint-dir" in line
    (tmp_path / "work.txt").write_text("cwd")
    assert _observe(model, data, tmp_path / "o.pt", "--checkpoint-dir", ".") == 2  # the current folder
    assert "not made by reap-fast" in _one_line(capsys.readouterr().err)
    assert _tree(model.parent) == before and (mine / "notes.txt").read_text() == "mine"
    assert (tmp_path / "work.txt").is_file() and not (tmp_path / "o.pt").exists()

    # a new folder is marked while in use and removed after success; a file the user drops in stays
    ck = tmp_path / "ck"
    assert _observe(model, data, tmp_path / "o.pt", "--checkpoint-dir", str(ck), "--checkpoint-every", "0") == 0
    assert not ck.exists()
    from reap_fast.outputs import CHECKPOINT_NAMES, claim_scratch_dir, remove_scratch_dir

    claim_scratch_dir(ck)
    (ck / "state.pt").write_bytes(b"state")
    (ck / "later.txt").write_text("user's")
    assert remove_scratch_dir(ck, CHECKPOINT_NAMES) is False
    assert sorted(path.name for path in ck.iterdir()) == ["later.txt"]


def test_i24_case2_eval_output_never_overwrites_inputs_or_user_files(setup, tmp_path, capsys):
    model = setup["model"]
    config_before = (model / "config.json").read_bytes()
    user = tmp_path / "results.json"
    user.write_text('{"mine": true}')
    cases = [(model / "config.json", "is inside the model folder"), (model, "model folder"),
             (user, "not a results file reap-fast wrote"), (tmp_path, "is a folder")]
    for output, message in cases:  # refused before lm-eval is even looked for
        code = main(["eval", "--model", str(model), "--tasks", "no_such_task", "--output", str(output)])
        assert code == 2
        assert message in _one_line(capsys.readouterr().err)
    assert (model / "config.json").read_bytes() == config_before and user.read_text() == '{"mine": true}'

    # a second process on the same results file is refused at once
    held = tmp_path / "held.json"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["eval", "--model", str(model), "--tasks", "no_such_task", "--output", str(held)]) == 2
        assert f"in use by pid {holder.pid}" in _one_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()

    from reap_fast.outputs import RESULTS_TAG, claim_output

    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({**RESULTS_TAG, "comparison": []}))
    with pytest.raises(OutputError, match="pass --overwrite"):
        claim_output(ours, "eval json", {"model folder": model})
    assert claim_output(ours, "eval json", {"model folder": model}, overwrite=True) == ours
    untagged = tmp_path / "report.json"  # a report's keys without the tag: not recognised
    untagged.write_text(json.dumps({"settings": {}, "models": [], "results": {}, "comparison": []}))
    with pytest.raises(OutputError, match="is not a results file reap-fast wrote"):
        claim_output(untagged, "eval json", {"model folder": model}, overwrite=True)


def test_i24_case3_the_picture_never_replaces_a_user_file_and_is_checked_first(setup, tmp_path, capsys, monkeypatch):
    model, obs = setup["model"], setup["obs"]
    (tmp_path / "p.png").write_text("my holiday picture")
    assert _prune(model, obs, tmp_path / "p", "--compression-ratio", "0.25") == 2
    assert "p.png already exists and is not a pruning picture" in _one_line(capsys.readouterr().err)
    assert (tmp_path / "p.png").read_text() == "my holiday picture" and not (tmp_path / "p").exists()
    (tmp_path / "q.png").mkdir()
    assert _prune(model, obs, tmp_path / "q", "--compression-ratio", "0.25") == 2
    assert "q.png is a folder" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "q").exists()  # refused before the model was written, not after
    # reap-fast's own picture is replaced with --overwrite
    assert _prune(model, obs, tmp_path / "r", "--compression-ratio", "0.25") == 0
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    assert _prune(model, obs, tmp_path / "r", "--compression-ratio", "0.5", "--overwrite") == 0


def test_i24_case4_overwrite_refuses_a_reap_fast_folder_holding_user_files(setup, tmp_path, capsys):
    model, obs, out = setup["model"], setup["obs"], tmp_path / "pruned"
    assert _prune(model, obs, out, "--compression-ratio", "0.25") == 0
    (out / "my-notes.md").write_text("results of my evaluation")
    (out / "plots").mkdir()
    capsys.readouterr()
    assert _prune(model, obs, out, "--compression-ratio", "0.5", "--overwrite") == 2
    line = _one_line(capsys.readouterr().err)
    assert "holds files it did not write (my-notes.md, plots)" in line and "never deleted" in line
    assert (out / "my-notes.md").read_text() == "results of my evaluation" and (out / "plots").is_dir()
    assert json.loads((out / "pruned_experts.json").read_text())["compression_ratio"] == 0.25


def test_i24_case5_read_only_locations_are_one_line_for_every_command(setup, tmp_path, capsys, monkeypatch):
    import reap_fast.outputs as outputs
    import reap_fast.preflight as preflight

    model, data, obs = setup["model"], setup["data"], setup["obs"]
    commands = {
        "observe": ["observe", "--model", str(model), "--dataset", f"{data}:3", "--model-max-length", "64",
                    "--output", str(tmp_path / "ro" / "o.pt")],
        "prune": ["prune", "--model", str(model), "--metrics", str(obs), "--output", str(tmp_path / "ro" / "p")],
        "quantize": ["quantize", "--model", str(model), "--dataset", str(data), "--output", str(tmp_path / "ro" / "q")],
        "run": ["run", "--model", str(model), "--dataset", f"{data}:3", "--model-max-length", "64",
                "--output", str(tmp_path / "ro" / "run")],
    }
    real_open = os.open

    def read_only_open(path, flags, *args):
        if str(path).endswith(".reap-fast.lock"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", read_only_open)  # the lock is the first thing written
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert "the file system is read-only" in _one_line(capsys.readouterr().err), name
    monkeypatch.undo()
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)  # checked before the lock is taken
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert "is not writable" in _one_line(capsys.readouterr().err), name
    assert not list((tmp_path / "ro").rglob("*"))  # nothing written


def test_i24_case6_disk_full_during_observe_keeps_the_checkpoint_for_resume(setup, tmp_path, capsys, monkeypatch):
    import reap_fast.observe.runner as runner

    output, ck = tmp_path / "o.pt", tmp_path / "o.pt.partial"
    monkeypatch.setattr(runner, "save_metrics", _raise(OSError(28, "No space left on device", str(output))))
    assert _observe(setup["model"], setup["data"], output, "--checkpoint-every", "0") == 2
    line = _one_line(capsys.readouterr().err)
    assert "the disk is full" in line and "rerun with --resume" in line
    assert (ck / "state.pt").is_file() and not output.exists()
    monkeypatch.undo()
    assert _observe(setup["model"], setup["data"], output, "--resume") == 0
    resumed, plain = load_metrics(output), load_metrics(setup["obs"])
    for layer in plain:
        for key in plain[layer]:
            assert torch.equal(resumed[layer][key], plain[layer][key]), (layer, key)
    assert not ck.exists()


def test_i24_case6_disk_full_while_drawing_the_picture_keeps_the_model(setup, tmp_path, capsys, monkeypatch, caplog):
    import reap_fast.picture as picture

    monkeypatch.setattr(picture, "atomic_write", _raise(ENOSPC))
    out = tmp_path / "pruned"
    assert _prune(setup["model"], setup["obs"], out, "--compression-ratio", "0.25") == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "pruning picture not written: the disk is full" in caplog.text
    assert (out / "model.safetensors").is_file() and not (tmp_path / "pruned.png").exists()
    # an ENOSPC anywhere else in a command is one line, not a traceback
    import reap_fast.prune as prune

    monkeypatch.setattr(prune, "save_pruned", _raise(OSError(28, "No space left on device", str(out))))
    assert _prune(setup["model"], setup["obs"], tmp_path / "p2", "--compression-ratio", "0.25") == 1
    assert "error: the disk is full (" in _one_line(capsys.readouterr().err)


def test_i24_case6_disk_full_in_a_child_is_one_line_to_the_parent(tmp_path):
    from reap_fast.children import call_child
    from reap_fast.errors import ReapFastError

    script = ("import sys; from reap_fast.children import child_main\n"
              "def work():\n    raise OSError(28, 'No space left on device', 'w4a16/model.safetensors')\n"
              "sys.exit(child_main(work, 'reap-fast quantize'))")
    with pytest.raises(ReapFastError) as error:
        call_child([sys.executable, "-c", script], ReapFastError, "quantization", capture_output=True)
    assert str(error.value) == "quantization failed: the disk is full (w4a16/model.safetensors)"
    assert error.value.exit_code == 1


def test_i24_case7_sequence_lengths_are_bounded_by_the_model_and_the_memory(setup, tmp_path, capsys, monkeypatch):
    import time as clock

    from reap_fast.config import ObserveConfig
    from reap_fast.memory import MemoryBudget
    from reap_fast.models.loading import load_config
    from reap_fast.models.memory_plan import MemoryPlanError
    from reap_fast.observe import limits
    from reap_fast.observe.planning import plan_observation

    model, data = setup["model"], setup["data"]
    start = clock.perf_counter()
    for length, message in (("1000000000", "must be in [1, 1048576]"), ("100000", "above the model's 4096 positions"),
                            ("8192", "--allow-longer-than-model")):
        assert main(["observe", "--model", str(model), "--dataset", f"{data}:3", "--model-max-length", length,
                     "--output", str(tmp_path / "o.pt")]) == 2
        assert message in _one_line(capsys.readouterr().err)
    assert clock.perf_counter() - start < 30  # refused before any calibration data is built
    config = load_config(str(model))
    settings = ObserveConfig(model_max_length=8192, allow_longer_than_model=True, device="cpu", dtype="float32")
    limits.check_sequence_length(config, settings)  # allowed, with a warning
    # the memory a length implies is bounded by the memory plan, whichever path it takes
    long = ObserveConfig(model_max_length=4096, batch_size=64, device="cpu", dtype="float32", layerwise="auto")
    with pytest.raises(MemoryPlanError, match="--model-max-length"):
        plan_observation(model, config, long, budget=MemoryBudget(host_free=(1 << 30) + (256 << 20)))
    assert not (tmp_path / "o.pt").exists()


def test_i24_case8_quantize_of_a_missing_or_hub_model_and_a_garbage_observation_are_one_line(setup, tmp_path, capsys):
    for name in ("nope", "someorg/x"):
        assert main(["quantize", "--model", name, "--dataset", str(setup["data"]), "--output",
                     str(tmp_path / "q")]) == 2
        assert f"model folder not found: {name}" in _one_line(capsys.readouterr().err)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello world, not a tensor file")  # torch.load says "KeyError: 101"
    assert _prune(setup["model"], garbage, tmp_path / "out") == 2
    assert "not a file torch.save wrote" in _one_line(capsys.readouterr().err)


def test_i24_case9_top_trailing_slash_and_other_weights(setup, tmp_path, capsys, monkeypatch):
    model, data = setup["model"], setup["data"]
    for top in ("-1", "0"):
        assert _observe(model, data, tmp_path / "o.pt", "--top", top) == 2
        assert "--top must be at least 1" in _one_line(capsys.readouterr().err)
    monkeypatch.chdir(tmp_path)
    assert _observe(model, data, "newobs/") == 2
    assert "give a file name such as newobs/observation.pt" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "newobs").exists()
    # same config, other weights: the README says statistics of another model are refused
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert json.loads((other / "config.json").read_text()) == json.loads((model / "config.json").read_text())
    assert _prune(other, setup["obs"], tmp_path / "p") == 2
    assert "weights differ" in _one_line(capsys.readouterr().err)
    copy = _copy_model(setup, tmp_path / "copy")  # the same files elsewhere are the same model
    assert _prune(copy, setup["obs"], tmp_path / "p", "--compression-ratio", "0.25") == 0


HUB_TASK_YAML = """task: hub_arc
dataset_path: allenai/ai2_arc
dataset_name: ARC-Easy
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices.text}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.skipif(__import__("importlib").util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_i24_case10_unreachable_eval_tasks_stop_the_dropin_and_run_before_observing(setup, tmp_path):
    task = tmp_path / "hub_arc.yaml"  # a task whose dataset is on the hub, which is out of reach here
    task.write_text(HUB_TASK_YAML)
    env = {**os.environ, **OFFLINE}
    artifacts = tmp_path / "artifacts"
    dropin = [sys.executable, "-m", "reap_fast.prune", "--model_name", str(setup["model"]), "--dataset_name",
              str(setup["data"]), "--batches_per_category", "2", "--model_max_length", "64", "--compression_ratio",
              "0.5", "--device", "cpu", "--artifacts_dir", str(artifacts), "--lm_eval_tasks", str(task)]
    completed = subprocess.run(dropin, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 1, completed.stderr[-2000:]
    line = _one_line(completed.stderr)
    assert "cannot be loaded" in line and "pass --do_eval false" in line
    assert not list(artifacts.rglob("*.pt")) and not list(artifacts.rglob("config.json"))  # nothing observed

    run = [sys.executable, "-m", "reap_fast", "run", "--model", str(setup["model"]), "--dataset", f"{setup['data']}:3",
           "--model-max-length", "64", "--output", str(tmp_path / "run"), "--eval-tasks", str(task)]
    completed = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "run without --eval-tasks" in _one_line(completed.stderr)
    assert not (tmp_path / "run" / "observation.pt").exists()


QUANTIZABLE_TINY = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, head_dim=32,
                        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)


@pytest.mark.skipif(__import__("importlib").util.find_spec("auto_round") is None, reason="auto-round not installed")
def test_i24_case11_quantize_fits_the_data_given_and_keeps_auto_round_quiet(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "model", seed=0, **QUANTIZABLE_TINY)
    data = tmp_path / "docs.jsonl"  # 26 documents: fewer than the default 128 samples
    data.write_text("".join(json.dumps({"text": f"{i} " + "experts route tokens to their gates. " * 6}) + "\n"
                            for i in range(26)))
    command = [sys.executable, "-m", "reap_fast", "quantize", "--model", str(model), "--dataset", str(data),
               "--output", str(tmp_path / "q"), "--iters", "0", "--seqlen", "64", "--device", "cpu"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    err = completed.stderr
    assert "holds 26 documents, fewer than the default 128: quantizing with --nsamples 26" in err
    assert "\x1b[" not in err and "model conflict" not in err  # no colour codes, no notice about our own folder
    assert "routers and unquantized layers in float32 (source: float32)" in err  # the dtype is said (auto: kept)
    marker = json.loads((tmp_path / "q" / "reap_fast_quant.json").read_text())
    assert marker["settings"]["nsamples"] == 26
    # an explicit --nsamples the data cannot give names the flag (refused before auto-round is imported)
    assert main([*command[3:-8], "--output", str(tmp_path / "q2"), "--nsamples", "64"]) == 2
    assert "pass --nsamples 26 or fewer" in _one_line(capsys.readouterr().err)


def test_i24_case12_help_version_and_flags(setup, tmp_path, capsys):
    from reap_fast import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"reap-fast {__version__}"
    parser = build_parser()
    assert "``" not in parser.description and ":func:" not in parser.description
    for name in ("observe", "prune", "quantize", "run", "eval", "demo"):
        sub = _subparser(name)
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"
        shown = {"observe": ("(default: 2048)", "(default: 1024"), "quantize": ("(default: 200)", "default: 128")}
        for default in shown.get(name, ()):
            assert default in " ".join(text.split()), (name, default)
    eval_samples = next(a for a in _subparser("run")._actions if "--eval-samples" in a.option_strings)
    assert "documents" in eval_samples.help


def test_i24_case12_prune_budget_and_dtype(setup, tmp_path, capsys):
    from safetensors import safe_open

    model, obs = setup["model"], setup["obs"]
    assert _prune(model, obs, tmp_path / "n0", "--n-experts-to-prune", "0") == 2  # like ratio 0
    assert "must be in [1, inf), got 0" in _one_line(capsys.readouterr().err)
    assert _prune(model, obs, tmp_path / "n0", "--n-experts-to-prune", "17") == 2
    line = _one_line(capsys.readouterr().err)
    assert "must be between 1 and 6" in line  # 8 experts, top-2: the range named is the range accepted
    assert _prune(model, obs, tmp_path / "n7", "--n-experts-to-prune", "7") == 2
    assert "must be between 1 and 6" in _one_line(capsys.readouterr().err)
    assert _prune(model, obs, tmp_path / "n6", "--n-experts-to-prune", "6") == 0
    assert _prune(model, obs, tmp_path / "r", "--compression-ratio", "0.1") == 2  # int(8 * 0.1) = 0 removed
    assert "nothing would be pruned" in _one_line(capsys.readouterr().err)
    asked = "bfloat16"  # the source is float32: the weights are cast as asked, not kept as the source's
    assert _prune(model, obs, tmp_path / "bf", "--compression-ratio", "0.25", "--dtype", asked) == 0
    with safe_open(str(tmp_path / "bf" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {getattr(torch, asked)}
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == asked


def test_i24_case12_clutter_is_silenced_and_files_follow_the_umask(setup, tmp_path, monkeypatch, capfd):
    from reap_fast import children
    from reap_fast.logs import QUIET_ENVIRONMENT

    for name in QUIET_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert main(["observe", "--model", "nope-folder/", "--dataset", "x", "--output", str(tmp_path / "o.pt")]) == 2
    assert all(os.environ.get(name) == value for name, value in QUIET_ENVIRONMENT.items())  # children inherit them
    # every child started with -m is started without runpy's "found in sys.modules" warning
    quiet = subprocess.run([sys.executable, *children.QUIET_RUNPY, "-m", "reap_fast.evaluate.harness", "--help"],
                           capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-m", "reap_fast.evaluate.harness", "--help"], capture_output=True, text=True)
    assert "RuntimeWarning" in loud.stderr and "RuntimeWarning" not in quiet.stderr
    assert children.child_argv("m", "r.json", "python") == ["python", *children.QUIET_RUNPY, "-m", "m", "r.json"]
    for module in ("evaluate/heldout.py", "evaluate/harness.py", "quantize/child.py"):  # every -m child uses it
        assert "child_argv(" in (REPO / "reap_fast" / module).read_text(), module
    if find_spec("lm_eval") is not None:  # lm-eval asks git for the commit of the current folder
        import lm_eval
        import lm_eval.evaluator

        from reap_fast.evaluate import HarnessSettings, harness

        def evaluate(**kwargs):
            return {"results": {}, "git_hash": lm_eval.evaluator.get_git_commit_hash()}

        monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
        monkeypatch.setattr(harness, "task_manager", lambda settings: None)
        monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lm_eval.evaluator.get_git_commit_hash)
        monkeypatch.chdir(tmp_path)  # not a git repository
        result = harness.evaluate_model(tmp_path, HarnessSettings(tasks=["t"], device="cpu"))
        assert "fatal" not in capfd.readouterr().err and result["results"] == {}
    previous = os.umask(0o022)
    try:
        folder = make_tiny_checkpoint(tmp_path / "tiny", seed=0)  # the demo's and the tests' model writer
    finally:
        os.umask(previous)
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o644}


def test_i24_case12_runs_eval_stage_shows_its_progress(setup, tmp_path, capsys, monkeypatch):
    import reap_fast.evaluate.heldout as heldout

    monkeypatch.setattr(heldout, "perplexity_in_child",
                        lambda path, texts, config, quantized=False: {"perplexity": 2.0, "next_token_accuracy": 0.5})
    code = main(["run", "--model", str(setup["model"]), "--dataset", f"{setup['data']}:3", "--model-max-length", "64",
                 "--compression-ratio", "0.25", "--output", str(tmp_path / "run"), "--eval-dataset",
                 f"{setup['data']}:2", "--eval-samples", "2"])
    assert code == 0
    err = capsys.readouterr().err
    assert "eval (perplexity)" in err and "model=pruned" in err


# --- the writers, enumerated ----------------------------------------------------------------------

WRITER_TESTS = {  # each kind of written path -> the test of its rule
    "observation": "test_i24_case9_top_trailing_slash_and_other_weights",
    "checkpoint dir": "test_i24_case1_checkpoint_dir_never_deletes_what_reap_fast_did_not_make",
    "pruned folder": "test_i24_case4_overwrite_refuses_a_reap_fast_folder_holding_user_files",
    "picture": "test_i24_case3_the_picture_never_replaces_a_user_file_and_is_checked_first",
    "quantized folder": "test_i24_quantized_folder_follows_the_rule",
    "eval json": "test_i24_case2_eval_output_never_overwrites_inputs_or_user_files",
    "run folder": "test_i24_run_folder_follows_the_rule",
}
# Modules that write files, and what: a kind of OUTPUT_KINDS, or "scratch" for their own temporary files.
WRITER_MODULES = {
    "cli.py": {"observation", "checkpoint dir", "eval json"},
    "metrics.py": {"observation", "checkpoint dir"},
    "observe/checkpointing.py": {"checkpoint dir"},
    "observe/runner.py": {"observation", "checkpoint dir"},
    "picture.py": {"picture"},
    "prune/save.py": {"pruned folder"},
    "quantize/checks.py": {"quantized folder"},
    "quantize/autoround.py": {"quantized folder", "scratch"},
    "evaluate/comparison.py": {"eval json", "run folder"},
    "evaluate/harness.py": {"scratch"},  # the child's request and result, in the parent's temporary folder
    "evaluate/heldout.py": {"scratch"},  # the same
    "quantize/child.py": {"scratch"},  # the worker's request and texts, in a scratch folder beside the output
    "demo.py": {"scratch"},  # the generation child's request
    "children.py": {"scratch"},  # a child's request and error record
    "observe/streaming/memory.py": {"checkpoint dir"},  # the hidden-states snapshot of a checkpoint
    "pipeline.py": {"run folder"},
}
WRITE_CALLS = {"atomic_write", "atomic_write_json", "atomic_torch_save", "save_metrics", "publish_folder", "rmtree",
               "write_marker", "claim_output", "claim_scratch_dir", "remove_scratch_dir", "write_request"}


def test_i24_every_writer_goes_through_the_rule_and_has_a_test():
    import ast

    from reap_fast.outputs import OUTPUT_KINDS

    assert set(WRITER_TESTS) == set(OUTPUT_KINDS)
    assert all(callable(globals().get(name)) for name in WRITER_TESTS.values())
    package = REPO / "reap_fast"
    writers, kinds_claimed = {}, set()
    for path in sorted(package.rglob("*.py")):
        relative = str(path.relative_to(package))
        if relative in ("outputs.py", "fileio.py"):
            continue  # outputs/fileio are the rule and its primitives
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in WRITE_CALLS:
                    writers.setdefault(relative, set()).add(name)
                if name == "claim_output" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    kinds_claimed.add(node.args[1].value)
    unlisted = sorted(set(writers) - set(WRITER_MODULES))
    assert not unlisted, f"modules that write files without a WRITER_MODULES entry (and a test): {unlisted}"
    assert kinds_claimed == set(OUTPUT_KINDS)  # every kind is checked by the rule somewhere
    for module, kinds in WRITER_MODULES.items():
        assert kinds <= set(OUTPUT_KINDS) | {"scratch"}, module


def test_i24_quantized_folder_follows_the_rule(setup, tmp_path, capsys):
    model, data = setup["model"], setup["data"]
    out = tmp_path / "q"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier model")
    write_marker(out, "w4a16")
    (out / "README.md").write_text("my notes")  # added after reap-fast wrote the folder
    for output, message in ((model / "q", "inside the model folder"), (out, "holds files it did not write")):
        assert main(["quantize", "--model", str(model), "--dataset", str(data), "--output", str(output),
                     "--overwrite"]) == 2
        assert message in _one_line(capsys.readouterr().err)
    assert (out / "README.md").read_text() == "my notes" and not (model / "q").exists()


def test_i24_run_folder_follows_the_rule(setup, tmp_path, capsys):
    base = ["run", "--model", str(setup["model"]), "--dataset", f"{setup['data']}:3", "--model-max-length", "64"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "pruned.png").write_text("not a picture of reap-fast")
    assert main([*base, "--output", str(run)]) == 2  # a fresh folder holding a user's file named like an output
    assert "not written by reap-fast" in _one_line(capsys.readouterr().err)
    (run / "pruned.png").unlink()
    assert main([*base, "--output", str(run), "--compression-ratio", "0.25"]) == 0
    marker = json.loads((run / MARKER_FILE).read_text())
    assert {"observation.pt", "pruned", "pruned.png", "pipeline.json"} <= set(marker["files"])
    (run / "mine.txt").write_text("user's")
    (run / "pipeline.json").unlink()  # no state: the folder is checked as an output again
    capsys.readouterr()
    assert main([*base, "--output", str(run), "--compression-ratio", "0.5", "--overwrite"]) == 2
    assert "holds files it did not write (mine.txt)" in _one_line(capsys.readouterr().err)
    assert (run / "mine.txt").read_text() == "user's"
