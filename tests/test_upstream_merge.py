"""Upstream's merging entry point (``src/reap/main.py``) on the drop-in's observation file.

The drop-in's default command (``python -m reap_fast.prune``, ``--record_pruning_metrics_only false``,
observation only) writes ``artifacts/<model>/<dataset>/all/obs.pt``; upstream's ``main.py`` run in that
folder reuses the file ("previously processed") and clusters and merges from it. The same ``main.py``
run alone in another folder observes for itself. Both merged models must agree (weights within 1e-4).

Merge method: ``frequency_weighted_average`` (HC-SMoE's frequency-weighted merging), agglomerative
clustering with average linkage, on the CPU; one case per expert similarity upstream offers, so each of
the five merging statistics drives a clustering (``ttm`` is upstream's default, ``characteristic_activation``
is HC-SMoE, ``router_logits`` MC-SMoE's, ``online_characteristic_activation_dist`` SubMoE's). Marked
``upstream`` (``make upstream-check``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upstream_oracle import CHAT_DATASET, build_checkpoint, find_upstream, run_dropin, run_upstream, write_datasets
from upstream_oracle import _run_together, _upstream_command  # both main.py runs at once (two cores)

pytestmark = pytest.mark.upstream

SEED = 7
EXPERT_SIMILARITIES = (
    "ttm",
    "characteristic_activation",
    "routed_characteristic_activation",
    "router_logits",
    "online_characteristic_activation_dist",
)


def _common(checkpoint: Path) -> list[str]:
    return [
        "--model_name", str(checkpoint), "--dataset_name", CHAT_DATASET, "--seed", str(SEED),
        "--batches_per_category", "2", "--batch_size", "2", "--model_max_length", "128",
        "--output_file_name", "obs.pt", "--do_eval", "false", "--smoke_test", "false", "--profile", "false",
    ]


def _workdir(root: Path, name: str) -> Path:
    cwd = root / name
    cwd.mkdir()
    shutil.copytree(root / CHAT_DATASET.split("/")[0], cwd / CHAT_DATASET.split("/")[0])
    return cwd


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(upstream, the checkpoint, a folder holding the drop-in's observation, a folder for upstream alone)."""
    root = tmp_path_factory.mktemp("upstream-merge")
    upstream = find_upstream(root)
    if isinstance(upstream, str):
        pytest.skip(upstream)
    write_datasets(root)
    checkpoint = build_checkpoint(upstream, root / "model")
    ours, theirs = _workdir(root, "dropin-then-upstream"), _workdir(root, "upstream-alone")
    argv = _common(checkpoint) + ["--prune_method", "reap", "--run_observer_only", "true"]
    done = run_dropin(ours, argv, layerwise=False)  # the drop-in's default command: 14 keys
    assert done.returncode == 0, done.stderr[-3000:]
    observation = ours / "artifacts" / checkpoint.name / CHAT_DATASET.split("/")[-1] / "all" / "obs.pt"
    assert all(len(values) == 15 for values in torch.load(observation, weights_only=True).values())  # + identity
    return upstream, checkpoint, ours, theirs


def _merged(folder: Path, expert_sim: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / "artifacts").glob(f"*/*/merged_models/*/{expert_sim}_*/*.safetensors"))
    assert files, f"no merged model for {expert_sim} under {folder}"
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("expert_sim", EXPERT_SIMILARITIES)
def test_upstream_merging_on_the_dropin_file_equals_upstream_alone(folders, expert_sim):
    upstream, checkpoint, ours, theirs = folders
    argv = _common(checkpoint) + [
        "--expert_sim", expert_sim, "--cluster_method", "agglomerative", "--linkage_method", "average",
        "--merge_method", "frequency_weighted_average", "--compression_ratio", "0.5", "--plot_clusters", "false",
    ]
    commands = [_upstream_command(upstream, folder, argv, "reap.main") for folder in (ours, theirs)]
    on_ours, alone = _run_together(commands, (ours, theirs))
    assert on_ours.returncode == 0, on_ours.stderr[-3000:]
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "previously processed" in on_ours.stderr  # it read the drop-in's file, it did not observe
    merged_ours, merged_alone = _merged(ours, expert_sim), _merged(theirs, expert_sim)
    assert sorted(merged_ours) == sorted(merged_alone)
    source = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        source.update(load_file(str(file)))
    changed = [name for name, value in merged_alone.items() if name in source and not torch.equal(value, source[name])]
    assert any(".experts." in name for name in changed), "upstream merged nothing: the comparison would be empty"
    for name, value in merged_alone.items():
        torch.testing.assert_close(merged_ours[name], value, rtol=1e-4, atol=1e-6, msg=name)

