"""The merging statistics through the real observation paths: layer streaming, SIGTERM + resume, torchrun."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from reap_fast.config import ObserveConfig
from reap_lab.tiny import make_tiny_checkpoint
from reap_fast.merge_metrics import MERGE_KEYS
from reap_fast.metrics import METRIC_DTYPES, load_metrics
from reap_fast.observe import observe_checkpoint
from reap_fast.observe.checkpointing import TEST_SIGNAL_ENV
from test_distributed import _WORKER

SETTINGS = dict(samples_per_category=6, model_max_length=40, batch_size=2, seed=5, engine="reference",
                device="cpu", dtype="float32", progress=False, merging_statistics=True)
BASE = ObserveConfig(**SETTINGS)
KEYS = (*METRIC_DTYPES, *MERGE_KEYS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("merge-carry") / "tiny", seed=4, num_hidden_layers=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [f"Item {i}: " + "how vexingly quick daft zebras jump. " * (1 + i % 3) for i in range(16)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


@pytest.fixture(scope="module")
def in_memory(checkpoint, dataset):
    return observe_checkpoint(str(checkpoint), dataset, config=BASE)


def _close(expected, actual, rtol):
    assert sorted(expected) == sorted(actual)
    for layer in expected:
        assert sorted(actual[layer]) == sorted(KEYS)
        for key in KEYS:
            a, b = actual[layer][key], expected[layer][key]
            if b.dtype == torch.int64 or rtol == 0:
                assert torch.equal(a, b), (layer, key)
            else:
                torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7, msg=f"layer {layer} {key}")


def test_layer_streaming_records_the_same_merging_statistics(checkpoint, dataset, in_memory):
    streamed = observe_checkpoint(str(checkpoint), dataset, config=replace(BASE, layerwise=True))
    _close(in_memory, streamed, rtol=1e-5)


@pytest.mark.parametrize("layerwise, interrupt_after", [(False, 2), (True, 5)])
def test_sigterm_then_resume_gives_the_same_fourteen_keys(checkpoint, dataset, tmp_path, monkeypatch, layerwise,
                                                          interrupt_after):
    uninterrupted = observe_checkpoint(str(checkpoint), dataset, config=replace(BASE, layerwise=layerwise))
    folder = tmp_path / "partial"
    monkeypatch.setenv(TEST_SIGNAL_ENV, str(interrupt_after))
    with pytest.raises(SystemExit) as stopped:
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, layerwise=layerwise, checkpoint_dir=str(folder), checkpoint_every=1e9))
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    resumed = observe_checkpoint(str(checkpoint), dataset,
                                 config=replace(BASE, layerwise=layerwise, resume=True, checkpoint_dir=str(folder)))
    _close(uninterrupted, resumed, rtol=0)


def test_a_pruning_only_checkpoint_is_not_resumed_with_merging_statistics(checkpoint, dataset, tmp_path, monkeypatch):
    folder = tmp_path / "partial"
    monkeypatch.setenv(TEST_SIGNAL_ENV, "1")
    with pytest.raises(SystemExit):
        observe_checkpoint(str(checkpoint), dataset,
                           config=replace(BASE, checkpoint_dir=str(folder), checkpoint_every=1e9,
                                          merging_statistics=False))
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    with pytest.raises(Exception, match="merging_statistics"):
        observe_checkpoint(str(checkpoint), dataset, config=replace(BASE, resume=True, checkpoint_dir=str(folder)))


def test_torchrun_two_processes_equal_single_process(checkpoint, dataset, tmp_path):
    """Whole batches per rank: even the per-call router-logit distance equals the single process's."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(checkpoint), dataset, str(tmp_path), json.dumps(SETTINGS)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {lw: observe_checkpoint(str(checkpoint), dataset,
                                         config=replace(BASE, layerwise=lw)) for lw in (False, True)}
    finally:
        torch.set_num_threads(threads)
    for layerwise in (False, True):
        _close(single[layerwise], load_metrics(tmp_path / f"rank0-layerwise{layerwise}.pt"), rtol=1e-6)
        _close(single[layerwise], load_metrics(tmp_path / f"rank1-layerwise{layerwise}.pt"), rtol=1e-6)


def test_observe_and_run_flag_records_fourteen_keys(checkpoint, dataset, tmp_path):
    from reap_fast.cli import main

    common = ["--dataset", f"{dataset}:3", "--model-max-length", "40", "--batch-size", "2", "--device", "cpu"]
    assert main(["observe", "--model", str(checkpoint), *common, "--output", str(tmp_path / "plain.pt")]) == 0
    assert main(["observe", "--model", str(checkpoint), *common, "--output", str(tmp_path / "merge.pt"),
                 "--merging-statistics"]) == 0
    plain, merged = load_metrics(tmp_path / "plain.pt"), load_metrics(tmp_path / "merge.pt")
    assert all(sorted(values) == sorted(METRIC_DTYPES) for values in plain.values())
    assert all(sorted(values) == sorted(KEYS) for values in merged.values())
    for layer in plain:  # the pruning keys do not depend on the flag
        for key in METRIC_DTYPES:
            torch.testing.assert_close(merged[layer][key], plain[layer][key], rtol=1e-6, atol=0)
    output = tmp_path / "run"
    assert main(["run", "--model", str(checkpoint), *common, "--output", str(output), "--merging-statistics",
                 "--compression-ratio", "0.5"]) == 0
    ran = load_metrics(output / "observation.pt")
    assert all(sorted(values) == sorted(KEYS) for values in ran.values())


@pytest.mark.parametrize("pruning_only", [False, True])
def test_dropin_honours_record_pruning_metrics_only(checkpoint, dataset, tmp_path, monkeypatch, capsys, pruning_only):
    """Upstream's default (false) records 14 keys on both entry points; layerwise says how upstream differs."""
    from reap_fast.upstream.main import main as dropin

    monkeypatch.chdir(tmp_path)
    argv = ["--model_name", str(checkpoint), "--dataset_name", dataset, "--batches_per_category", "2",
            "--batch_size", "2", "--model_max_length", "40", "--compression_ratio", "0.25", "--do_eval", "false",
            "--output_file_name", "obs.pt", "--device", "cpu", "--run_observer_only", "true"]
    if pruning_only:
        argv += ["--record_pruning_metrics_only", "true"]
    expected = sorted(METRIC_DTYPES) if pruning_only else sorted(KEYS)
    for layerwise in (False, True):
        assert dropin(argv, layerwise=layerwise) == 0
        files = sorted(Path("artifacts").rglob("obs.pt"))
        metrics = load_metrics(files[-1] if layerwise else files[0])
        assert all(sorted(values) == expected for values in metrics.values()), (layerwise, files)
        noted = "layerwise_prune.py records only the nine pruning keys" in capsys.readouterr().err
        assert noted == (layerwise and not pruning_only)
