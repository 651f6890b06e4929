"""bench/gpu_check.sh --dry-run on the CPU: every step walked with its budget, mocked, recorded; the total fits.

The script must fit a 15-minute device window twice (start plus one rerun): its step budgets add up to at
most 8 minutes, each is printed before its step, and steps.json is rewritten after every step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["env", "install", "gpu_tests", "kernel_tests", "tune", "compile_check", "bench", "bench_targets", "merge_check",
         "e2e"]


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=120, check=False)


def test_dry_run_walks_every_step_within_eight_minutes(tmp_path):
    result = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    total = int(re.search(r"total budget (\d+) s \(limit 480 s\), dry run", result.stdout).group(1))
    budgets = {name: int(value) for name, value in re.findall(r"\[(\w+)\] budget (\d+) s", result.stdout)}
    assert list(budgets) == STEPS and sum(budgets.values()) == total <= 480
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert [step["step"] for step in steps] == STEPS
    assert all(step["dry_run"] and step["rc"] == 0 for step in steps)
    assert [step["budget_s"] for step in steps] == [budgets[name] for name in STEPS]
    for name in STEPS:  # each step left its log: the command it would run
        assert (tmp_path / f"{name}.log").read_text().startswith("mock of: ")
    assert "bench/tune.py" in (tmp_path / "tune.log").read_text() and "--budget-s" in (tmp_path / "tune.log").read_text()
    assert f"failed steps: 0; budgets spent {total} s of {total} s (limit 480 s)" in result.stdout


def test_budgets_over_the_limit_stop_before_any_step(tmp_path):
    result = dry_run(tmp_path, GPU_CHECK_LIMIT_S="300")
    assert result.returncode == 99 and "exceed the limit" in result.stdout
    assert json.loads((tmp_path / "steps.json").read_text()) == []
