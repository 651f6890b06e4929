"""Interrupted observation resumes from its checkpoint and gives the numbers of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reap_fast.cli import main
from reap_fast.config import ObserveConfig
from reap_fast.metrics import METRIC_DTYPES, load_metrics
from reap_fast.observe import observe_checkpoint
from reap_fast.observe.checkpointing import STATE_FILE, TEST_SIGNAL_ENV, CheckpointMismatchError
from reap_lab.tiny import make_tiny_checkpoint

BASE = ObserveConfig(samples_per_category=6, model_max_length=48, batch_size=2, seed=5, engine="reference",
                     device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("resume") / "tiny", seed=1, num_hidden_layers=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [f"Note {i}: " + "pack my box with five dozen liquor jugs. " * (2 + i % 3) for i in range(16)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


def _equal(a, b):
    assert sorted(a) == sorted(b)
    for layer in a:
        for key in METRIC_DTYPES:
            assert torch.equal(a[layer][key], b[layer][key]), (layer, key)


@pytest.mark.parametrize("layerwise, interrupt_after", [(False, 2), (True, 5)])
def test_sigterm_then_resume_equals_uninterrupted(checkpoint, dataset, tmp_path, monkeypatch, layerwise,
                                                  interrupt_after):
    """3 batches per pass: in memory stop after batch 2; streaming stop in layer 1 after its 2nd batch."""
    uninterrupted = observe_checkpoint(str(checkpoint), dataset, config=replace(BASE, layerwise=layerwise))
    folder = tmp_path / "partial"
    monkeypatch.setenv(TEST_SIGNAL_ENV, str(interrupt_after))
    with pytest.raises(SystemExit) as stopped:
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, layerwise=layerwise, checkpoint_dir=str(folder),
                                          checkpoint_every=1e9))  # only the signal writes a checkpoint
    assert stopped.value.code == 128 + signal.SIGTERM
    state = torch.load(folder / STATE_FILE, weights_only=True)
    if layerwise:
        assert (state["layer"], state["batches_done"], state["layers_done"]) == (1, 2, [0])
        assert (folder / state["hidden"]["file"]).is_file()
    else:
        assert state["batches_done"] == 2
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    resumed = observe_checkpoint(str(checkpoint), dataset,
                                 config=replace(BASE, layerwise=layerwise, resume=True, checkpoint_dir=str(folder)))
    _equal(uninterrupted, resumed)
    assert not folder.exists()  # removed after success


def test_periodic_checkpoints_and_resume_from_each_point(checkpoint, dataset, tmp_path, monkeypatch):
    """checkpoint_every=0 writes after every batch; resuming from a layer boundary also works."""
    uninterrupted = observe_checkpoint(str(checkpoint), dataset, config=replace(BASE, layerwise=True))
    folder = tmp_path / "partial"
    monkeypatch.setenv(TEST_SIGNAL_ENV, "3")  # the end of layer 0
    with pytest.raises(SystemExit):
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, layerwise=True, checkpoint_dir=str(folder), checkpoint_every=0))
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert (state["layer"], state["batches_done"]) == (1, 0)
    assert len(list(folder.glob("hidden-*.bin"))) == 1  # older snapshots are deleted
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    resumed = observe_checkpoint(str(checkpoint), dataset,
                                 config=replace(BASE, layerwise=True, resume=True, checkpoint_dir=str(folder),
                                                checkpoint_every=0))
    _equal(uninterrupted, resumed)


def test_a_different_run_is_refused(checkpoint, dataset, tmp_path, monkeypatch):
    folder = tmp_path / "partial"
    monkeypatch.setenv(TEST_SIGNAL_ENV, "1")
    with pytest.raises(SystemExit):
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, checkpoint_dir=str(folder), checkpoint_every=1e9))
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    with pytest.raises(CheckpointMismatchError, match=r"different run \(.*seed 5 -> 6"):
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, resume=True, checkpoint_dir=str(folder), seed=6))
    with pytest.raises(CheckpointMismatchError, match="layerwise False -> True"):
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, resume=True, layerwise=True, checkpoint_dir=str(folder)))
    with pytest.raises(CheckpointMismatchError, match="pass --resume"):
        observe_checkpoint(str(checkpoint), dataset, config=replace(BASE, checkpoint_dir=str(folder)))
    assert (folder / STATE_FILE).is_file()  # a refused run leaves the checkpoint alone


def _cli(checkpoint, dataset, output, *extra):
    return [sys.executable, "-m", "reap_fast", "observe", "--model", str(checkpoint), "--dataset", f"{dataset}:6",
            "--model-max-length", "48", "--batch-size", "2", "--seed", "5", "--engine", "reference", "--device", "cpu",
            "--dtype", "float32", "--output", str(output), *extra]


def test_cli_subprocess_killed_by_sigterm_then_resumed(checkpoint, dataset, tmp_path, capsys):
    """A real process: SIGTERM in layer 1 (sent by the process to itself), exit 143, resume, same file."""
    reference = tmp_path / "reference.pt"
    assert main(_cli(checkpoint, dataset, reference, "--layerwise")[3:]) == 0
    output = tmp_path / "obs.pt"
    env = dict(os.environ, **{TEST_SIGNAL_ENV: "4"})
    first = subprocess.run(_cli(checkpoint, dataset, output, "--layerwise"), env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "--resume" in first.stderr and not output.exists()
    assert (Path(f"{output}.partial") / STATE_FILE).is_file()
    # Without --resume the checkpoint is not overwritten: one-line error (in-process CLI from here on).
    assert main(_cli(checkpoint, dataset, output, "--layerwise")[3:]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(_cli(checkpoint, dataset, output, "--layerwise", "--resume")[3:]) == 0
    _equal(load_metrics(reference), load_metrics(output))
    assert not Path(f"{output}.partial").exists()
