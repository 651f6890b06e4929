"""The README's GPU speed targets, asserted from the layer benchmark's JSON (skipped without GPU results).

Targets (README, "Benchmarks / GPU"), per token count, on medians of the same run:
  triton_stats at least 100x faster than upstream_hook, within 10 % of triton_plain, no slower than hf_fastest.

Results are read from ``REAP_FAST_BENCH_JSON`` (paths separated by ``os.pathsep``; ``bench/gpu_check.sh``
points it at its fresh ``bench_moe_layer.json``) or else from the committed ``bench/results/*.json``.
Both formats are understood: pytest-benchmark's (``benchmarks[].extra_info`` + ``stats.median``) and the
script fallback's (``results[]`` with ``median_s``). Only results whose device is not a CPU count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
SPEEDUP_OVER_HOOK = 100.0
STATS_OVERHEAD = 1.10


def result_files() -> list[Path]:
    given = os.environ.get("REAP_FAST_BENCH_JSON")
    if given:
        return [Path(p) for p in given.split(os.pathsep) if p]
    return sorted(RESULTS.glob("*.json"))


def gpu_medians(path: Path) -> dict[tuple[str, int], dict[str, float]]:
    """``{(device, T): {variant: median seconds}}`` of the GPU rows of one results file."""
    data = json.loads(path.read_text())
    rows = [dict(b.get("extra_info", {}), median_s=b["stats"]["median"]) for b in data.get("benchmarks", [])]
    rows += data.get("results", [])
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        device = str(row.get("device", "cpu"))
        if device.lower().startswith("cpu") or "variant" not in row:
            continue
        medians.setdefault((device, int(row["T"])), {})[row["variant"]] = float(row["median_s"])
    return medians


def target_failures(medians: dict[str, float]) -> list[str]:
    """The README targets missed by one (device, T) group of medians."""
    needed = {"upstream_hook", "hf_fastest", "triton_stats", "triton_plain"}
    if not needed <= set(medians):
        return [f"variants missing: {sorted(needed - set(medians))}"]
    stats = medians["triton_stats"]
    failures = []
    if medians["upstream_hook"] / stats < SPEEDUP_OVER_HOOK:
        failures.append(f"only {medians['upstream_hook'] / stats:.1f}x faster than the upstream-style hook (>= 100x)")
    if stats > STATS_OVERHEAD * medians["triton_plain"]:
        failures.append(f"statistics cost {stats / medians['triton_plain'] - 1:.1%} over the plain Triton forward (<= 10 %)")
    if stats > medians["hf_fastest"]:
        failures.append(f"{stats / medians['hf_fastest']:.2f}x the time of transformers' fastest forward (<= 1x)")
    return failures


def test_target_check_flags_a_miss_and_passes_a_hit():
    hit = {"upstream_hook": 2.0, "hf_fastest": 0.011, "triton_stats": 0.010, "triton_plain": 0.0095}
    assert target_failures(hit) == []
    assert len(target_failures(dict(hit, upstream_hook=0.5))) == 1
    assert len(target_failures(dict(hit, triton_plain=0.008))) == 1
    assert len(target_failures(dict(hit, hf_fastest=0.009))) == 1
    assert target_failures({"triton_stats": 1.0})[0].startswith("variants missing")


def test_gpu_results_meet_the_readme_targets():
    groups = {}
    for path in result_files():
        for key, medians in gpu_medians(path).items():
            groups[(path.name, *key)] = medians
    if not groups:
        pytest.skip("no GPU layer-benchmark results (bench/gpu_check.sh writes them on a CUDA machine)")
    report = {f"{name} {device} T={tokens}": target_failures(m) for (name, device, tokens), m in groups.items()}
    missed = {key: failures for key, failures in report.items() if failures}
    assert not missed, missed
