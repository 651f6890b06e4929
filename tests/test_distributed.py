"""Data-parallel observation: 2 CPU processes under torchrun (Gloo) give the single-process statistics.

Tolerance: counts (int64) and ``max_activations`` are exact; the float64 sums differ only by the
order of summation across ranks, so they agree to 1e-12 relative (measured: <= 2.2e-16). This needs
every sequence's forward to be bit-identical in both runs: batch size 1 and the same CPU thread count
(with 1 vs 2 threads the fp32 GEMM blocking differs and the sums move by ~1e-8 relative; with larger
batches the different batch compositions do the same, ~1e-6).
"""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from reap_fast.config import ObserveConfig
from reap_fast.metrics import METRIC_DTYPES, LayerAccumulator, load_metrics
from reap_fast.observe import observe_checkpoint
from reap_fast.observe.distributed import all_reduce_accumulators, init_distributed, is_main_process, rank_and_world
from reap_lab.tiny import make_tiny_checkpoint

SETTINGS = dict(samples_per_category=5, model_max_length=40, batch_size=1, seed=3, engine="reference", device="cpu",
                dtype="float32", progress=False)
BASE = ObserveConfig(**SETTINGS)

_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from reap_fast.config import ObserveConfig
    from reap_fast.metrics import save_metrics
    from reap_fast.observe import observe_checkpoint
    from reap_fast.observe.distributed import is_main_process, rank_and_world
    model, dataset, out, settings = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
    for layerwise in (False, True):
        partial = str(out / f"partial{layerwise}")
        config = ObserveConfig(layerwise=layerwise, checkpoint_dir=partial, **settings)
        metrics = observe_checkpoint(model, dataset, None, config)
        rank, world = rank_and_world()
        assert world == 2, world
        # every rank holds the totals; only rank 0 writes
        save_metrics(metrics, out / f"rank{rank}-layerwise{layerwise}.pt")
    # one file per rank: two processes printing to one pipe may interleave their lines
    (out / f"rank{rank}.txt").write_text(f"rank {rank} main {is_main_process()}")
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dist") / "tiny", seed=2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    texts = [f"Doc {i}: " + "sphinx of black quartz, judge my vow. " * (1 + i % 4) for i in range(14)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


def _assert_matches(single, parallel):
    assert sorted(single) == sorted(parallel)
    for layer in single:
        for key in METRIC_DTYPES:
            expected, actual = single[layer][key], parallel[layer][key]
            if expected.dtype == torch.int64 or key == "max_activations":
                assert torch.equal(expected, actual), (layer, key)
            else:
                torch.testing.assert_close(actual, expected, rtol=1e-12 if expected.dtype == torch.float64 else 1e-6,
                                           atol=0, msg=f"layer {layer} {key}")


def test_torchrun_two_cpu_processes_equal_single_process(checkpoint, dataset, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(checkpoint), dataset, str(tmp_path), json.dumps(SETTINGS)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert (tmp_path / "rank0.txt").read_text() == "rank 0 main True"
    assert (tmp_path / "rank1.txt").read_text() == "rank 1 main False"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same GEMM blocking, the same fp32 rounding
    try:
        singles = {lw: observe_checkpoint(str(checkpoint), dataset,
                                          config=replace(BASE, layerwise=lw)) for lw in (False, True)}
    finally:
        torch.set_num_threads(threads)
    for layerwise in (False, True):
        single = singles[layerwise]
        rank0 = load_metrics(tmp_path / f"rank0-layerwise{layerwise}.pt")
        rank1 = load_metrics(tmp_path / f"rank1-layerwise{layerwise}.pt")
        _assert_matches(single, rank0)
        for layer in rank0:  # both ranks hold the same totals
            for key in METRIC_DTYPES:
                assert torch.equal(rank0[layer][key], rank1[layer][key])
        assert not (tmp_path / f"partial{layerwise}").exists()


def test_without_torchrun_nothing_is_started(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("cpu") == (0, 1, "cpu")
    assert rank_and_world() == (0, 1) and is_main_process()
    accumulator = LayerAccumulator(4)
    all_reduce_accumulators({0: accumulator})  # a no-op without a process group
    assert int(accumulator.total_tokens) == 0
