"""bench/tune.py on the CPU: a tiny interpreted sweep, the file it writes, its budget and its CUDA check.

The sweep test replaces the timer by one that makes every later candidate faster, so the descent must
move away from the current config (unless a candidate is rejected or fails), and it makes one
candidate compute wrong numbers and another fail to launch: both must be skipped.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reap_kernels.config import MoEConfig, _best, _load_entries, get_config
from reap_kernels.moe import fused_moe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reap_bench_tune", ROOT / "bench" / "tune.py")
tune = sys.modules["reap_bench_tune"] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(tune)

E, K, H, I, T = 4, 2, 32, 32, 32
SHAPE_ARGS = ["--shape", str(E), str(K), str(H), str(I), "--tokens", str(T)]
SHAPE = {"E": E, "H": H, "I": I, "k": K}
BF16_TOL = 4 * 2.0**-8


def current_config() -> MoEConfig:
    return get_config(E, H, I, K, T, torch.bfloat16)


def test_sweep_writes_a_loadable_config_with_the_default_result(tmp_path, monkeypatch):
    times = itertools.count(1000.0, -1.0)
    monkeypatch.setattr(tune, "measure_ms", lambda fn, quick: next(times))

    def patched_fused_moe(*args, config: MoEConfig, **kwargs):
        if config.combine_block_h == 32:
            raise RuntimeError("out of resources: shared memory (simulated)")
        out, stats = fused_moe(*args, config=config, **kwargs)
        return (out + 1 if config.block_m == 32 else out), stats  # wrong numbers: must be rejected

    monkeypatch.setattr(tune, "fused_moe", patched_fused_moe)
    path = tmp_path / "tuned.json"
    assert tune.main(["--out", str(path), "--quick", *SHAPE_ARGS]) == 0

    data = json.loads(path.read_text())
    (entry,) = data["entries"]
    assert entry["match"] == SHAPE and entry["T"] == T
    assert entry["candidates"] == {"timed": 2, "unfit": 0, "rejected": 1, "failed": 1} and entry["complete"]
    assert entry["best_ms"] < entry["default_ms"]
    current = current_config()
    expected = MoEConfig(
        block_m=current.block_m,  # block_m 32 gave wrong numbers
        gate_up=replace(current.gate_up, block_n=16),
        down=replace(current.down, block_n=16),
        combine_block_h=current.combine_block_h,  # block_h 32 failed
        combine_num_warps=current.combine_num_warps,
    )
    assert expected != current
    assert entry["default_config"] == current.to_dict()

    entries = _load_entries(path)
    assert _best(entries, SHAPE, T) == expected
    assert _best(entries, {**SHAPE, "E": 8}, T) is None  # the entry is for this shape only

    layer = tune.Layer((E, K, H, I), T, torch.bfloat16)
    args = (layer.x, layer.w_gate_up, layer.w_down, layer.index, layer.weights)
    out, stats = fused_moe(*args, gates=layer.gates, token_mask=layer.mask, config=expected)
    ref_out, ref_stats = fused_moe(*args, gates=layer.gates, token_mask=layer.mask, config=current)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=0.0, atol=BF16_TOL * ref_out.float().abs().max().item())
    assert torch.equal(stats["expert_frequency"], ref_stats["expert_frequency"])
    torch.testing.assert_close(stats["ean_sum"], ref_stats["ean_sum"], rtol=BF16_TOL, atol=0.0)


def test_zero_budget_times_and_keeps_the_current_config(tmp_path):
    path = tmp_path / "tuned.json"
    assert tune.main(["--out", str(path), "--quick", "--budget-s", "0", *SHAPE_ARGS]) == 0
    (entry,) = json.loads(path.read_text())["entries"]
    assert entry["candidates"]["timed"] == 0 and not entry["complete"]
    assert entry["config"] == current_config().to_dict()
    assert entry["best_ms"] == entry["default_ms"] > 0
    assert _best(_load_entries(path), SHAPE, T) == current_config()


def test_full_grid_fits_the_tokens_per_expert_and_stays_small():
    assert tune.fitting_block_m(tune.FULL_GRID.block_m, 256 * 8 / 128) == [16, 32]
    assert tune.fitting_block_m(tune.FULL_GRID.block_m, 8192 * 8 / 128) == [32, 64, 128]
    assert tune.fitting_block_m(tune.FULL_GRID.block_m, 1.0) == [16]
    base = MoEConfig.from_dict(json.loads((ROOT / "reap_kernels" / "configs" / "default.json").read_text())["entries"][-1]["config"])
    stages = tune.stages(tune.FULL_GRID, 2048 * 8 / 128)
    names = [name for name, _ in stages]
    assert names[0] == "block_m" and names[-1] == "combine" and len(names) == 6
    new = {candidate for _, make in stages for candidate in make(base)} - {base}
    assert 60 <= len(new) <= 80  # one descent path: about one GEMM compile per candidate
    assert {c.gate_up.group_m for c in new} == {1, 4, 8, 16}
    assert {c.gate_up.block_k for c in new} >= {32, 64, 128} and {c.down.block_n for c in new} >= {64, 128, 256}
    assert {c.gate_up.num_stages for c in new} == {2, 3, 4, 5} and max(c.block_m for c in new) == 128


def test_candidates_the_compile_check_rejects_are_never_timed(tmp_path, monkeypatch):
    timed = []
    monkeypatch.setattr(tune, "measure_ms", lambda fn, quick: timed.append(fn.args[0]) or 1000.0 - len(timed))
    monkeypatch.setattr(tune, "compile_fit", lambda layer: lambda config: ["spills"] if config.gate_up.block_n == 16 else [])
    path = tmp_path / "tuned.json"
    assert tune.main(["--out", str(path), "--quick", *SHAPE_ARGS]) == 0
    (entry,) = json.loads(path.read_text())["entries"]
    assert entry["candidates"]["unfit"] >= 1
    assert all(config.gate_up.block_n != 16 for config in timed) and entry["config"]["gate_up"]["block_n"] != 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_real_shape_without_cuda_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "tuned.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py"), "--out", str(path)],
                            check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA device" in result.stderr
    assert tune.main(["--out", str(path), "--quick"]) == 2  # --quick does not make the real shape run
    assert "no CUDA device" in capsys.readouterr().err
    assert not path.exists()


def test_entries_merge_into_a_device_file(tmp_path):
    """--merge-into: the tuned entries replace those of the same shape and T; the others stay."""
    device_file = tmp_path / "My_GPU.json"
    other = {"match": {"E": 8, "H": 64, "I": 32, "k": 2}, "T": 64, "config": current_config().to_dict()}
    stale = {"match": SHAPE, "T": T, "config": {**current_config().to_dict(), "block_m": 64}}
    device_file.write_text(json.dumps({"entries": [other, stale]}))
    assert tune.main(["--out", str(tmp_path / "tuned.json"), "--quick", "--budget-s", "0", "--merge-into",
                      str(device_file), *SHAPE_ARGS]) == 0
    merged = json.loads(device_file.read_text())["entries"]
    assert other in merged and stale not in merged and len(merged) == 2
    assert _best(_load_entries(device_file), SHAPE, T) == current_config()
