"""Compile checks for sm_80, sm_86, sm_89 and sm_90 without a GPU (see reap_lab/compile_check.py).

Every shipped config (reap_kernels/configs/) is compiled through ``fused_moe`` for each target it is used
on, at the Qwen3-30B-A3B, Qwen3.5-35B-A3B and gpt-oss-20b layer shapes, and must compile with no
register spill and within the target's shared memory per block. A fixed sample of the tuner's space
(TUNER_SAMPLE per target) must compile (spills or too much shared memory there are findings the
tuner skips, not failures). A deliberately oversized config must be caught. The whole tuner space
is the ``compile_sweep`` marker: ``make compile-sweep``.

Each target compiles in its own process (two at a time); kernels are compiled once per process and
Triton's cache directory is shared by the session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reap_lab.compile_check import SHAPES, SHARED_LIMIT, TARGETS, run_parallel, tuner_space

try:
    from triton.backends.nvidia.compiler import get_ptxas

    HAVE_PTXAS = Path(get_ptxas(80).path).is_file()
except Exception:  # no NVIDIA backend in this triton build
    HAVE_PTXAS = False

pytestmark = pytest.mark.skipif(not HAVE_PTXAS, reason="triton's NVIDIA backend (ptxas) is not installed")
TUNER_SAMPLE = 2
JOBS = 2
OVERSIZED = {"block_m": 64, "gate_up": {"block_n": 64, "block_k": 64},
             "down": {"block_n": 256, "block_k": 128, "num_warps": 4, "num_stages": 5}}  # 5 x 40 KB shared memory


@pytest.fixture(scope="session")
def compile_reports(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("compile_check")
    extra = folder / "oversized.json"
    extra.write_text(json.dumps({"entries": [{"match": {}, "T": 1, "config": OVERSIZED}]}))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton_cache"))
    return run_parallel(sorted(TARGETS), ["--tuner", str(TUNER_SAMPLE), "--extra", str(extra)], JOBS, folder)


def test_every_shipped_config_compiles_without_spills_on_every_target(compile_reports):
    config_dir = Path(__file__).resolve().parents[1] / "reap_kernels" / "configs"
    shipped = [r for r in compile_reports if r["source"] not in ("tuner space",) and not r["source"].startswith("oversized")]
    for arch in TARGETS:
        files = {r["source"].split("#")[0] for r in shipped if r["arch"] == arch}
        expected = {p.name for p in config_dir.glob("*.json") if json.loads(p.read_text()).get("arch", arch) == arch}
        assert files == expected, f"sm_{arch}: checked {files}, shipped {expected}"
        assert {r["shape"] for r in shipped if r["arch"] == arch} == {shape.name for shape in SHAPES}
    for report in shipped:
        assert report["ok"], f"sm_{report['arch']} {report['shape']} {report['source']}: {report['error'] or report['kernels']}"
        names = {kernel["kernel"] for kernel in report["kernels"]}
        assert {"_gate_up_kernel", "_down_proj_kernel", "_align_kernel", "_combine_kernel", "_expert_stats_kernel"} <= names
        for kernel in report["kernels"]:
            assert 0 < kernel["registers"] <= 255 and kernel["spill_bytes"] == 0
            assert kernel["shared_bytes"] <= SHARED_LIMIT[report["arch"]]
    for arch in TARGETS:  # the large-T entries run gate_up as 2 x 128-wide tiles (one [BK, 256] weight tile)
        wide = [r for r in shipped if r["arch"] == arch and r["config"]["gate_up"]["block_n"] == 128]
        assert wide and all(r["ok"] for r in wide), f"sm_{arch}: no 2x128 gate_up tile compiled"
    for report in shipped:
        if report["arch"] == 90 and report["config"]["gate_up"]["block_n"] == 128:
            gate_up = [k for k in report["kernels"] if k["kernel"] == "_gate_up_kernel"]
            assert all(k["registers"] < 200 for k in gate_up), f"sm_90 gate_up registers: {gate_up}"


def test_tuner_sample_compiles_and_oversized_config_is_caught(compile_reports):
    sample = [r for r in compile_reports if r["source"] == "tuner space"]
    assert len(sample) == TUNER_SAMPLE * len(TARGETS)
    assert all(r["error"] is None for r in sample), [r["error"] for r in sample if r["error"]]
    oversized = [r for r in compile_reports if r["source"].startswith("oversized")]
    assert len(oversized) == len(TARGETS)
    for report in oversized:  # 5 stages x (64x128 + 128x256) bf16 = 400 KB: over every target's limit
        assert not report["ok"] and any("shared memory" in problem for problem in _problems(report))


def _problems(report: dict) -> list[str]:
    return [f"{k['kernel']}: shared memory" for k in report["kernels"] if k["shared_bytes"] > SHARED_LIMIT[report["arch"]]]


@pytest.mark.compile_sweep
@pytest.mark.skipif(os.environ.get("REAP_FAST_COMPILE_SWEEP") != "1", reason="full tuner sweep: make compile-sweep")
def test_whole_tuner_space_compiles(tmp_path):
    reports = run_parallel(sorted(TARGETS), ["--tuner", "-1"], os.cpu_count() or 1, tmp_path)
    sweep = [r for r in reports if r["source"] == "tuner space"]
    assert len(sweep) == len(tuner_space()) * len(TARGETS)
    assert all(r["error"] is None for r in sweep), [r["error"] for r in sweep if r["error"]][:5]
