"""Compile-check table: every kernel at every shipped config (and optionally the tuner's space) for sm_80-sm_90.

    python bench/compile_check.py [--arch 80 86 89 90] [--tuner N | --tuner -1] [--out table.md] [--jobs 2]

No GPU needed: ``reap_lab.compile_check`` compiles through ``fused_moe`` with a stand-in Triton
driver and reads registers and spills from the wheel's ``ptxas -v`` (one process per target, ``--jobs``
at a time). Prints a markdown table (registers of each GEMM, the largest of the other kernels, spill
bytes, shared memory against the per-block limit, resident blocks per SM) and exits 1 when a shipped
config fails. Tuner candidates that fail are listed, not counted as failures: the tuner skips them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reap_lab/ lives at the repository root, not installed
from reap_lab.compile_check import TARGETS, format_table, run_parallel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    parser.add_argument("--tuner", type=int, default=0, metavar="N", help="tuner configs per target (-1: all)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        reports = run_parallel(args.arch, ["--tuner", str(args.tuner)], args.jobs, Path(folder))
    table = format_table(reports)
    failed = [r for r in reports if not r["ok"] and r["source"] != "tuner space"]
    unfit = [r for r in reports if not r["ok"] and r["source"] == "tuner space"]
    summary = (f"{len(reports)} config x target checks in {time.monotonic() - start:.0f} s: "
               f"{len(failed)} shipped configs failed, {len(unfit)} tuner candidates unfit (skipped by the tuner)")
    print(table)
    print(summary)
    if args.out:
        args.out.write_text(table + "\n\n" + summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
