"""The drop-in against Cerebras REAP itself: same command line, same observation, same experts, same weights.

Runs upstream's ``prune.py`` and ``layerwise_prune.py`` unchanged in their own environment (see
``tests/upstream_oracle.py``) and ``python -m reap_fast.prune`` / ``layerwise_prune`` with the same flags,
on a tiny Qwen3-MoE saved by upstream's transformers, for a chat dataset (evol-codealpaca, rendered by the
chat template) and a plain-text one (C4-like rows, upstream's C4 processor), three seeds each. Slow (two processes per case): marked
``upstream``, run with ``make upstream-check``; skipped with the reason when upstream or its
environment is absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from reap_fast.merge_metrics import MERGE_KEYS
from reap_fast.metrics import METRIC_DTYPES, load_metrics
from upstream_oracle import (
    CHAT_DATASET,
    TEXT_DATASET,
    build_checkpoint,
    compare_observations,
    find_upstream,
    kept_experts,
    run_both,
    run_upstream,
    write_datasets,
)

pytestmark = pytest.mark.upstream

SEEDS = (0, 7, 42)
DATASETS = {"chat": CHAT_DATASET, "text": TEXT_DATASET}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream-e2e")
    upstream = find_upstream(root)
    if isinstance(upstream, str):
        pytest.skip(upstream)
    write_datasets(root)
    checkpoint = build_checkpoint(upstream, root / "model")
    return root, upstream, checkpoint


def _argv(checkpoint: Path, dataset: str, seed: int) -> list[str]:
    return [
        "--model_name", str(checkpoint), "--dataset_name", dataset, "--seed", str(seed),
        "--prune_method", "reap", "--compression_ratio", "0.5", "--batches_per_category", "2", "--batch_size", "2",
        "--model_max_length", "128", "--renormalize_router_weights", "true",
        "--output_file_name", "obs.pt", "--do_eval", "false", "--smoke_test", "false", "--profile", "false",
    ]


def _workdir(root: Path, name: str) -> Path:
    cwd = root / name
    cwd.mkdir()
    for dataset in DATASETS.values():
        shutil.copytree(root / dataset.split("/")[0], cwd / dataset.split("/")[0])
    return cwd


@pytest.fixture(scope="module")
def upstream_default_files():
    """Upstream prune.py's observation files by (dataset kind, seed): the reference of the merging keys."""
    return {}


@pytest.mark.parametrize("layerwise", [False, True], ids=["prune", "layerwise_prune"])
@pytest.mark.parametrize("kind", sorted(DATASETS))
@pytest.mark.parametrize("seed", SEEDS)
def test_same_observation_experts_and_weights_as_upstream(setup, upstream_default_files, layerwise, kind, seed):
    """Upstream's default command (``--record_pruning_metrics_only false``): 14 keys per layer.

    Upstream's layerwise_prune.py records the nine pruning keys whatever the flag says; the drop-in records
    all fourteen on both entry points, and its five merging keys are checked against upstream prune.py's
    file for the same flags (same calibration set).
    """
    root, upstream, checkpoint = setup
    dataset = DATASETS[kind]
    argv = _argv(checkpoint, dataset, seed)
    name = f"{'layerwise' if layerwise else 'prune'}-{kind}-{seed}"
    theirs_dir, ours_dir = _workdir(root, f"up-{name}"), _workdir(root, f"rf-{name}")
    theirs, ours = run_both(upstream, (theirs_dir, ours_dir), argv, layerwise)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    assert ours.returncode == 0, ours.stderr[-3000:]

    results = Path("artifacts") / checkpoint.name / dataset.split("/")[-1]
    observation = results / ("layerwise" if layerwise else "all") / "obs.pt"
    their_metrics = torch.load(theirs_dir / observation, weights_only=False)
    our_metrics = load_metrics(ours_dir / observation)
    assert all(len(values) == 14 for values in our_metrics.values())
    if layerwise:
        pruning = {layer: {key: values[key] for key in METRIC_DTYPES} for layer, values in our_metrics.items()}
        assert compare_observations(pruning, their_metrics) == []
        reference = upstream_default_files.get((kind, seed))
        if reference is None:
            reference_dir = _workdir(root, f"up-default-{kind}-{seed}")
            done = run_upstream(upstream, reference_dir, argv, "reap.prune")
            assert done.returncode == 0, done.stderr[-3000:]
            reference = reference_dir / results / "all" / "obs.pt"
        merging = {layer: {key: values[key] for key in MERGE_KEYS} for layer, values in our_metrics.items()}
        assert compare_observations(merging, torch.load(reference, weights_only=False)) == []
    else:
        assert all(len(values) == 14 for values in their_metrics.values())
        assert compare_observations(our_metrics, their_metrics) == []
        upstream_default_files[(kind, seed)] = theirs_dir / observation
    tokens = int(our_metrics[0]["total_tokens"])
    assert 2 * 2 * 128 // 2 < tokens < 2 * 2 * 128, f"{tokens} tokens observed"  # 4 packed rows of 128, with gaps

    pruned = results / "pruned_models" / f"{'layerwise_' if layerwise else ''}reap-renorm_true-seed_{seed}-0.50"
    layers = sorted(our_metrics)
    their_kept = kept_experts(theirs_dir / pruned, checkpoint, layers)
    our_kept = kept_experts(ours_dir / pruned, checkpoint, layers)
    assert all(min(slots) >= 0 for slots in their_kept.values()), their_kept
    assert our_kept == their_kept
