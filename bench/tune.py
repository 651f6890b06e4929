"""Tune the MoE kernels' block sizes for one layer shape on this GPU; writes a ``reap_kernels/configs`` file.

    python bench/tune.py --out tuned.json [--tokens 256 2048 8192] [--shape E k H I] [--dtype bf16]
                         [--budget-s 120] [--quick]

For every token count T the script times ``reap_kernels.moe.fused_moe`` with statistics on (gates and
a token mask given, as REAP observation calls it) on random weights and routed inputs, and searches
the ``MoEConfig`` space by coordinate descent from the current config (``get_config``: the device file
if one exists, else ``default.json``), one stage at a time, each stage starting from the best so far:

    block_m     16, 32, 64, 128 where they fit the mean number of pairs per expert (T * k / E)
    gate_up     block_n x block_k x num_warps  (64, 128, 256) x (32, 64, 128) x (4, 8)
    down        the same for the down projection
    gate_up     group_m x num_stages  (1, 4, 8, 16) x (2, 3, 4, 5)
    down        the same
    combine     block_h x num_warps  (512, 1024) x (4, 8)

(``reap_kernels.config.TUNING_AXES``.) That is at most ~75 candidates per T, one new GEMM kernel to
compile each. On CUDA every candidate first goes through ``reap_lab.compile_check`` for this
device's compute capability: one that spills registers or needs more shared memory than a block may
have is skipped before it is timed ("unfit"). A candidate that fails to launch is skipped, and so is
one whose output or statistics differ from the current config's beyond the dtype's tolerance. Timing:
``triton.testing.do_bench_cudagraph`` (median of CUDA-graph replays: the kernels' time without launch
overhead). The current and the best config are timed once more at the end of each T and the faster one
is kept. Default token counts: the buckets 256, 512, ..., 16384.

``--budget-s`` bounds the whole run: T number i (of n) stops sweeping at start + budget * i / n and
keeps its best so far, so a fast T leaves its time to the next. The output file is rewritten
(atomically) after every T, in the format ``reap_kernels.config`` reads, plus informational keys
(device, versions, per entry the median ms of the current and the best config). ``--merge-into FILE``
also merges the entries into a config file after every T (same shape and T replaced, others kept):
``bench/gpu_check.sh`` merges into ``reap_kernels/configs/<device_file_name(torch.cuda.get_device_name())>``.
The budget is printed at the start and per T.

``--quick`` sweeps a tiny grid and times with ``time.perf_counter``. Without CUDA only ``--quick`` on a
tiny shape runs (under ``TRITON_INTERPRET=1``, for tests): the timings then say nothing about speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # reap_lab/ lives at the repository root, not installed

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton
import triton.testing

from reap_fast.fileio import atomic_write_json
from reap_kernels.config import TUNING_AXES, GemmConfig, MoEConfig, get_config
from reap_kernels.moe import fused_moe

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tolerance unit per dtype: other tile sizes sum the dot products in another order, so an element may
# land on a neighbouring 16-bit value (fp32 tiles use IEEE dots: only the summation order differs).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-20}
CPU_MAX_DIM, CPU_MAX_TOKENS = 256, 512  # largest H, I and T the interpreter sweeps in reasonable time
BENCH_REP_MS = 40
TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_REPEATS = 2


@dataclass(frozen=True)
class Grid:
    """Candidate values per stage; an empty axis dict skips the stage."""

    block_m: tuple[int, ...]
    tiles: dict[str, tuple[int, ...]]  # GemmConfig fields swept together, for gate_up then for down
    schedule: dict[str, tuple[int, ...]]  # the same, in a later stage
    combine: dict[str, tuple[int, ...]]  # MoEConfig combine_* fields swept together


FULL_GRID = Grid(
    block_m=TUNING_AXES["block_m"],
    tiles={name: TUNING_AXES[name] for name in ("block_n", "block_k", "num_warps")},
    schedule={name: TUNING_AXES[name] for name in ("group_m", "num_stages")},
    combine={name: TUNING_AXES[name] for name in ("combine_block_h", "combine_num_warps")},
)
QUICK_GRID = Grid(
    block_m=(16, 32),
    tiles={"block_n": (16, 32)},
    schedule={},
    combine={"combine_block_h": (32, 64)},
)

Stage = tuple[str, Callable[[MoEConfig], list[MoEConfig]]]


def fitting_block_m(values: tuple[int, ...], mean_pairs: float) -> list[int]:
    """block_m values between 1/16 and 2x the mean number of pairs per expert (at least one value)."""
    fits = [m for m in values if mean_pairs / 16 <= m <= max(2 * mean_pairs, min(values))]
    return fits or [max(values)]


def _sweep(axes: dict[str, tuple[int, ...]], gemm: str | None = None) -> Callable[[MoEConfig], list[MoEConfig]]:
    """Candidates: every combination of ``axes`` applied to the base config (to its ``gemm`` field if given)."""
    def candidates(base: MoEConfig) -> list[MoEConfig]:
        result = []
        for values in itertools.product(*axes.values()):
            changes = dict(zip(axes, values, strict=True))
            result.append(replace(base, **{gemm: replace(getattr(base, gemm), **changes)}) if gemm else replace(base, **changes))
        return result

    return candidates


def stages(grid: Grid, mean_pairs: float) -> list[Stage]:
    """The coordinate-descent stages, in order; each maps the best config so far to its candidates."""
    result: list[Stage] = [("block_m", _sweep({"block_m": tuple(fitting_block_m(grid.block_m, mean_pairs))}))]
    for axes in (grid.tiles, grid.schedule):
        if axes:
            result += [(f"{gemm} {'/'.join(axes)}", _sweep(axes, gemm)) for gemm in ("gate_up", "down")]
    if grid.combine:
        result.append(("combine", _sweep(grid.combine)))
    return result


def describe(config: MoEConfig) -> str:
    """A compact one-line form of a config."""
    def gemm(g: GemmConfig) -> str:
        return f"{g.block_n}x{g.block_k}/g{g.group_m}/w{g.num_warps}/s{g.num_stages}"

    return (f"bm={config.block_m} gate_up={gemm(config.gate_up)} down={gemm(config.down)} "
            f"combine={config.combine_block_h}/w{config.combine_num_warps}")


class Layer:
    """Random weights of one MoE layer and its routed inputs at one token count."""

    def __init__(self, shape: tuple[int, int, int, int], num_tokens: int, dtype: torch.dtype, seed: int = 0):
        num_experts, top_k, hidden, inter = shape
        device = "cuda" if CUDA else "cpu"
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(*size: int, std: float = 1.0) -> torch.Tensor:
            return torch.randn(*size, device=device, generator=generator) * std

        self.shape, self.num_tokens, self.dtype = shape, num_tokens, dtype
        self.w_gate_up = randn(num_experts, 2 * inter, hidden, std=2 * hidden**-0.5).to(dtype)
        self.w_down = randn(num_experts, hidden, inter, std=2 * inter**-0.5).to(dtype)
        x = randn(num_tokens, hidden)
        logits = x @ randn(num_experts, hidden, std=hidden**-0.5).T
        weights, self.index = torch.softmax(logits, -1).topk(top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        self.x, self.weights, self.gates = x.to(dtype), weights.to(dtype), weights
        self.mask = torch.rand(num_tokens, device=device, generator=generator) > 0.1  # ~10 % padding

    @property
    def mean_pairs(self) -> float:
        """Mean number of (token, slot) pairs per expert."""
        return self.num_tokens * self.shape[1] / self.shape[0]

    def current_config(self) -> MoEConfig:
        """The config ``fused_moe`` uses without one (what tuning has to beat)."""
        num_experts, top_k, hidden, inter = self.shape
        return get_config(num_experts, hidden, inter, top_k, self.num_tokens, self.dtype)

    def run(self, config: MoEConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``fused_moe`` with statistics, as REAP observation calls it."""
        return fused_moe(self.x, self.w_gate_up, self.w_down, self.index, self.weights,
                         gates=self.gates, token_mask=self.mask, config=config)


def same_result(result: tuple[torch.Tensor, dict], reference: tuple[torch.Tensor, dict], dtype: torch.dtype) -> bool:
    """Output within 4 units of roundoff of max|out|, counts exact, float statistics within 4u relative."""
    tol = 4 * UNIT_ROUNDOFF[dtype]
    out, stats = result
    ref_out, ref_stats = reference
    if not torch.allclose(out.float(), ref_out.float(), rtol=0.0, atol=tol * ref_out.float().abs().max().item()):
        return False
    for name, ref in ref_stats.items():
        value = stats[name]
        if not ref.is_floating_point():
            if not torch.equal(value, ref):
                return False
            continue
        finite = ref[ref.isfinite()]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        if not torch.allclose(value, ref, rtol=tol, atol=tol * scale):
            return False
    return True


def measure_ms(fn: Callable[[], object], quick: bool) -> float:
    """Median time of ``fn()`` in ms: replayed from a CUDA graph on CUDA (no launch or Python overhead in
    the number, as observation would run at scale), else a few ``perf_counter`` calls."""
    if CUDA and not quick:
        return float(triton.testing.do_bench_cudagraph(fn, rep=BENCH_REP_MS, return_mode="median"))
    times = []
    for _ in range(QUICK_REPEATS):
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compile_fit(layer: Layer) -> Callable[[MoEConfig], list[str]]:
    """A check of a candidate's kernels for this GPU's compute capability (problems, or [] when fit).

    Under the interpreter (no GPU, CPU tests) nothing is compiled: every candidate is fit.
    """
    if not CUDA:
        return lambda config: []
    from reap_lab.compile_check import CompileChecker, LayerShape

    major, minor = torch.cuda.get_device_capability()
    checker, (num_experts, top_k, hidden, inter) = CompileChecker(), layer.shape
    shape = LayerShape("tuned", num_experts, top_k, hidden, inter)
    return lambda config: checker.check(config, shape, 10 * major + minor).problems


def tune_tokens(layer: Layer, grid: Grid, deadline: float, quick: bool) -> dict:
    """Coordinate descent over ``grid`` at one token count until ``deadline`` (time.monotonic)."""
    label = f"T={layer.num_tokens}"
    problems_of = compile_fit(layer)
    current = layer.current_config()
    reference = layer.run(current)
    best, best_ms = current, measure_ms(partial(layer.run, current), quick)
    print(f"{label} current  {best_ms:9.3f} ms  {describe(current)}", flush=True)
    tried, counts, complete = {current}, Counter(), True
    for name, make in stages(grid, layer.mean_pairs):
        for candidate in make(best):
            if candidate in tried:
                continue
            if time.monotonic() > deadline:
                complete = False
                break
            tried.add(candidate)
            problems = problems_of(candidate)
            if problems:
                counts["unfit"] += 1
                print(f"{label} {name}: {problems[0]}; skipped: {describe(candidate)}")
                continue
            try:
                result = layer.run(candidate)
                if not same_result(result, reference, layer.dtype):
                    counts["rejected"] += 1
                    print(f"{label} {name}: differs from the current config's result, skipped: {describe(candidate)}")
                    continue
                ms = measure_ms(partial(layer.run, candidate), quick)
            except Exception as error:  # a config that does not compile or launch (e.g. shared memory)
                counts["failed"] += 1
                message = (str(error).strip().splitlines() or [""])[0]
                print(f"{label} {name}: {type(error).__name__}: {message[:120]}; skipped: {describe(candidate)}")
                continue
            counts["timed"] += 1
            if ms < best_ms:
                best, best_ms = candidate, ms
            print(f"{label} {name:24s} {ms:9.3f} ms  {describe(candidate)}", flush=True)
        if not complete:
            print(f"{label}: budget spent, keeping the best so far")
            break
    current_ms = measure_ms(partial(layer.run, current), quick)  # both once more, back to back
    best_ms = measure_ms(partial(layer.run, best), quick) if best != current else current_ms
    if best_ms >= current_ms:
        best, best_ms = current, current_ms
    print(f"{label} best {best_ms:9.3f} ms vs current {current_ms:9.3f} ms  {describe(best)}", flush=True)
    num_experts, top_k, hidden, inter = layer.shape
    return {
        "match": {"E": num_experts, "H": hidden, "I": inter, "k": top_k},
        "T": layer.num_tokens,
        "config": best.to_dict(),
        "default_config": current.to_dict(),
        "default_ms": round(current_ms, 4),
        "best_ms": round(best_ms, 4),
        "candidates": {key: counts[key] for key in ("timed", "unfit", "rejected", "failed")},
        "complete": complete,
    }


def environment() -> dict:
    """Device, compute capability (``arch``: the compile check uses the file on it only) and versions."""
    major, minor = torch.cuda.get_device_capability() if CUDA else (0, 0)
    return {
        "device": torch.cuda.get_device_name() if CUDA else "cpu (TRITON_INTERPRET=1)",
        **({"arch": 10 * major + minor} if CUDA else {}),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (reap_kernels/configs format)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_BUCKETS), help="token counts T")
    parser.add_argument("--shape", type=int, nargs=4, metavar=("E", "k", "H", "I"), default=[128, 8, 2048, 768],
                        help="experts, top-k, hidden size, expert intermediate size (default: Qwen3-30B-A3B)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--budget-s", type=float, default=120.0, help="seconds for the whole run")
    parser.add_argument("--merge-into", type=Path, metavar="FILE",
                        help="also merge the entries into this config file (same shape and T replaced), e.g. "
                             "reap_kernels/configs/<device file name>")
    parser.add_argument("--quick", action="store_true", help="tiny grid, perf_counter timing (CPU tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    _, _, hidden, inter = args.shape
    if not CUDA and not (args.quick and max(hidden, inter) <= CPU_MAX_DIM and max(args.tokens) <= CPU_MAX_TOKENS):
        print(f"tune.py: error: no CUDA device; without one only --quick with H, I <= {CPU_MAX_DIM} and "
              f"T <= {CPU_MAX_TOKENS} runs (interpreted, for tests)", file=sys.stderr)
        return 2
    grid = QUICK_GRID if args.quick else FULL_GRID
    dtype = DTYPES[args.dtype]
    data = {
        "_comment": f"Tuned by bench/tune.py for shape (E, k, H, I) = {tuple(args.shape)}, {args.dtype}. "
                    "Only 'entries' (match, T, config) is read by reap_kernels.config; the rest is information.",
        **environment(),
        "dtype": args.dtype,
        "quick": args.quick,
        "budget_s": args.budget_s,
        "entries": [],
    }
    tokens = sorted(set(args.tokens))
    print(f"budget {args.budget_s:.0f} s for T = {', '.join(map(str, tokens))}: T number i of {len(tokens)} stops "
          f"sweeping at {args.budget_s / len(tokens):.0f} s x i", flush=True)
    for i, num_tokens in enumerate(tokens):
        layer = Layer(tuple(args.shape), num_tokens, dtype)
        deadline = start + args.budget_s * (i + 1) / len(tokens)
        print(f"T={num_tokens}: {deadline - time.monotonic():.0f} s of the budget left for it", flush=True)
        data["entries"].append(tune_tokens(layer, grid, deadline, args.quick))
        del layer
        data["elapsed_s"] = round(time.monotonic() - start, 1)
        atomic_write_json(data, args.out)
        if args.merge_into is not None:
            merge_entries(args.merge_into, data)
    print(f"wrote {args.out} ({len(data['entries'])} entries) in {data['elapsed_s']} s "
          f"(budget {args.budget_s:.0f} s)")
    return 0


def merge_entries(path: Path, tuned: dict) -> None:
    """Merge ``tuned``'s entries into the config file at ``path`` (created if absent): an entry with the same
    ``match`` and ``T`` is replaced, the others kept; the file's ``arch`` and device are the tuned ones."""
    existing = json.loads(path.read_text()) if path.is_file() else {"entries": []}
    new_keys = {(json.dumps(entry["match"], sort_keys=True), entry["T"]) for entry in tuned["entries"]}
    kept = [entry for entry in existing.get("entries", [])
            if (json.dumps(entry.get("match", {}), sort_keys=True), entry["T"]) not in new_keys]
    merged = {**existing, **{key: value for key, value in tuned.items() if key != "entries"}}
    merged["entries"] = sorted(kept + tuned["entries"], key=lambda entry: (json.dumps(entry.get("match", {}), sort_keys=True), entry["T"]))
    atomic_write_json(merged, path)


if __name__ == "__main__":
    raise SystemExit(main())
