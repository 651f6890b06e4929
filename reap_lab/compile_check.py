"""Compile the MoE kernels for NVIDIA targets without a GPU and check registers, spills and shared memory.

``reap_kernels.fused_moe`` is called on CPU tensors of a real layer shape (``torch.empty`` weights:
no memory is touched) while a stand-in Triton driver reports the chosen target (``GPUTarget("cuda",
arch, 32)``) and every launch is turned into a compile-only warm-up. So each kernel is compiled
through the real launcher, with the specialisations a GPU launch would get (16-byte divisibility of
pointers and sizes, unit strides). ``ptxas -v`` (the copy shipped in the triton wheel) reports the
registers and spill bytes of each kernel; Triton reports the shared memory. A kernel passes when it
compiles, spills nothing and needs no more shared memory than the target allows per block.

Needs compiled kernels: run in a process where ``TRITON_INTERPRET`` is not 1, e.g.::

    python -m reap_lab.compile_check --arch 80 86 89 90            # every shipped config
    python -m reap_lab.compile_check --arch 86 --json report.json

``bench/compile_check.py`` prints the table (shipped configs and the tuner's space);
``bench/tune.py`` skips candidates that fail here before timing them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reap_kernels.config import CONFIG_DIR, TUNING_AXES, GemmConfig, MoEConfig
from reap_kernels.moe import ExpertsLayout, fused_moe

REPOSITORY = Path(__file__).resolve().parents[1]  # the compile processes run from here (reap_lab/ importable)
TARGETS = {80: "A100", 86: "RTX A6000 / RTX 3090", 89: "RTX 4090 / L40", 90: "H100"}
# Largest shared memory one block may use (opt-in), bytes (CUDA C programming guide, compute capabilities).
# sm_100 (B200) and sm_120 (RTX 50xx) are known so that bench/gpu_check.sh can check a lent card of those kinds.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048, 100: 2048, 120: 1536}


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer shape and its expert layout."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    layout: ExpertsLayout = ExpertsLayout()
    has_bias: bool = False

    @property
    def match(self) -> dict[str, int]:
        return {"E": self.num_experts, "H": self.hidden, "I": self.inter, "k": self.top_k}


GPT_OSS_LAYOUT = ExpertsLayout(transposed=True, interleaved=True, activation="gpt_oss_swiglu")  # as the engine reads it
SHAPES = (
    LayerShape("Qwen3-30B-A3B", 128, 8, 2048, 768),
    LayerShape("Qwen3.5-35B-A3B", 256, 8, 2048, 512),
    LayerShape("gpt-oss-20b", 32, 4, 2880, 2880, GPT_OSS_LAYOUT, has_bias=True),
)


@dataclass(frozen=True)
class KernelReport:
    """What one compiled kernel needs on one target."""

    arch: int
    kernel: str
    registers: int
    spill_bytes: int  # spill stores + spill loads
    shared_bytes: int
    num_warps: int

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers, threads and shared memory (an upper bound)."""
        threads = 32 * self.num_warps
        by_registers = REGISTERS_PER_SM // max(self.registers * threads, 1)
        by_threads = MAX_THREADS_PER_SM[self.arch] // threads
        by_shared = SHARED_LIMIT[self.arch] // self.shared_bytes if self.shared_bytes else by_threads
        return max(0, min(by_registers, by_threads, by_shared))

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"{self.kernel}: {self.spill_bytes} bytes of register spills")
        if self.shared_bytes > self.shared_limit:
            found.append(f"{self.kernel}: {self.shared_bytes} bytes of shared memory > {self.shared_limit}")
        return found


@dataclass(frozen=True)
class ConfigReport:
    """The kernels of one MoE config on one target, or the compile error."""

    arch: int
    shape: str
    source: str  # where the config comes from (file and entry, or the tuner's space)
    config: MoEConfig
    kernels: tuple[KernelReport, ...]
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        return [problem for kernel in self.kernels for problem in kernel.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"arch": self.arch, "shape": self.shape, "source": self.source, "config": self.config.to_dict(),
                "kernels": [asdict(kernel) for kernel in self.kernels], "error": self.error, "ok": self.ok}


class _StandInDriver:
    """Answers what Triton's launcher asks the driver for a compile: device key, stream and target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> str:
        return f"compile-check-sm{self.arch}"  # the launcher keeps one kernel cache per device key

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of the single kernel in ``ptx`` from ``ptxas -v`` (the wheel's ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu_name}", str(source), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True, text=True, check=False,
        )
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[:500]}")
    registers = _PTXAS_REGISTERS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log.strip()[:500]}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


class CompileChecker:
    """Compiles through ``fused_moe`` for one target at a time; caches kernels and reports in the run."""

    def __init__(self) -> None:
        import triton
        from triton.runtime.jit import JITFunction

        if _interpreted():
            raise RuntimeError("compile checks need compiled kernels: run without TRITON_INTERPRET=1")
        self._triton = triton
        self._jit_function = JITFunction
        self._reports: dict[tuple[int, str], KernelReport] = {}  # (arch, kernel hash) -> report

    @contextlib.contextmanager
    def _target(self, arch: int, compiled: list):
        """Stand-in driver for ``arch``; launches become warm-ups whose compiled kernels go to ``compiled``."""
        driver = self._triton.runtime.driver
        original_run = self._jit_function.run

        def warmup_run(function, *args, grid, warmup, **kwargs):
            kernel = original_run(function, *args, grid=grid, warmup=True, **kwargs)
            compiled.append((function.fn.__name__, kernel))
            return kernel

        previous = driver._active  # None until a real driver was asked for (none exists without a GPU)
        driver.set_active(_StandInDriver(arch))
        self._jit_function.run = warmup_run
        try:
            yield
        finally:
            self._jit_function.run = original_run
            driver._active = previous

    def _report(self, arch: int, name: str, kernel) -> KernelReport:
        key = (arch, kernel.hash)
        if key not in self._reports:
            registers, spills = ptxas_usage(kernel.asm["ptx"], arch)
            self._reports[key] = KernelReport(arch, name, registers, spills, int(kernel.metadata.shared),
                                              int(kernel.metadata.num_warps))
        return self._reports[key]

    def check(self, config: MoEConfig, shape: LayerShape, arch: int, source: str = "", num_tokens: int = 256) -> ConfigReport:
        """Compile every kernel of one ``fused_moe`` call with statistics (and the plain combine)."""
        compiled: list = []
        error = None
        try:
            with self._target(arch, compiled), contextlib.redirect_stdout(io.StringIO()):
                for inputs in _layer_inputs(shape, num_tokens):
                    fused_moe(*inputs["args"], layout=shape.layout, config=config, **inputs["kwargs"])
            reports = {}
            for name, kernel in compiled:
                report = self._report(arch, name, kernel)
                reports[(name, kernel.hash)] = report
            kernels = tuple(reports.values())
        except Exception as exc:  # a compile error is a finding, reported per config
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            error = f"{type(exc).__name__}: {' | '.join(lines[:1] + lines[-2:])[:400]}"
            kernels = ()
        return ConfigReport(arch, shape.name, source, config, kernels, error)


def _interpreted() -> bool:
    from reap_kernels.config import INTERPRET

    return INTERPRET


def _layer_inputs(shape: LayerShape, num_tokens: int) -> list[dict]:
    """Arguments of two ``fused_moe`` calls at ``shape``: with statistics, and plain."""
    dtype = torch.bfloat16
    experts, hidden, inter = shape.num_experts, shape.hidden, shape.inter
    gate_up_shape = (experts, hidden, 2 * inter) if shape.layout.transposed else (experts, 2 * inter, hidden)
    down_shape = (experts, inter, hidden) if shape.layout.transposed else (experts, hidden, inter)
    x = torch.empty(num_tokens, hidden, dtype=dtype)
    w_gate_up, w_down = torch.empty(gate_up_shape, dtype=dtype), torch.empty(down_shape, dtype=dtype)
    index = torch.zeros(num_tokens, shape.top_k, dtype=torch.int64)
    weights = torch.empty(num_tokens, shape.top_k, dtype=dtype)
    biases = {}
    if shape.has_bias:
        biases = {"b_gate_up": torch.empty(experts, 2 * inter, dtype=dtype), "b_down": torch.empty(experts, hidden, dtype=dtype)}
    args = (x, w_gate_up, w_down, index, weights)
    stats = {"gates": torch.empty(num_tokens, shape.top_k), "token_mask": torch.ones(num_tokens, dtype=torch.bool)}
    return [{"args": args, "kwargs": {**biases, **stats}}, {"args": args, "kwargs": biases}]


def shipped_configs(arch: int, config_dir: Path = CONFIG_DIR) -> list[tuple[str, LayerShape, MoEConfig]]:
    """(source, shape, config) for every entry of every file in ``config_dir`` used on ``arch``.

    A file with an ``"arch"`` key (the compute-capability files, and the files ``bench/tune.py``
    writes) is used only on that target; ``default.json`` on every target. An entry is checked at
    each of :data:`SHAPES` its ``match`` fits. Identical (shape, config) pairs are listed once.
    """
    found, seen = [], set()
    for path in sorted(config_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("arch", arch) != arch:
            continue
        for number, entry in enumerate(data["entries"]):
            config = MoEConfig.from_dict(entry["config"])
            match = entry.get("match", {})
            for shape in SHAPES:
                key = (shape, config)
                if key in seen or any(shape.match.get(name) != value for name, value in match.items()):
                    continue
                seen.add(key)
                found.append((f"{path.name}#{number} (T={entry['T']})", shape, config))
    return found


def format_table(reports: list) -> str:
    """A markdown table: one row per config and target, registers/spills per kernel, shared memory.

    Takes :class:`ConfigReport` objects or their ``to_dict`` form.
    """
    lines = ["| target | shape | config (source) | gate_up regs | down regs | other max regs | spills | max smem KB (limit) | blocks/SM gate_up, down | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        if isinstance(report, dict):
            report = ConfigReport(report["arch"], report["shape"], report["source"], MoEConfig.from_dict(report["config"]),
                                  tuple(KernelReport(**kernel) for kernel in report["kernels"]), report["error"])
        by_name = {}
        for kernel in report.kernels:
            by_name.setdefault(kernel.kernel, []).append(kernel)
        gemm = {name: by_name.get(f"_{name}_kernel", []) for name in ("gate_up", "down_proj")}
        others = [kernel for name, kernels in by_name.items() if name not in ("_gate_up_kernel", "_down_proj_kernel") for kernel in kernels]
        spills = sum(kernel.spill_bytes for kernel in report.kernels)
        shared = max((kernel.shared_bytes for kernel in report.kernels), default=0)
        occupancy = ", ".join(str(min((k.blocks_per_sm for k in gemm[name]), default=0)) for name in gemm)
        regs = [str(max((k.registers for k in gemm[name]), default=0)) for name in gemm]
        status = "ok" if report.ok else "FAIL: " + "; ".join(report.problems)[:120]
        lines.append(
            f"| sm_{report.arch} | {report.shape} | {describe(report.config)} ({report.source}) | {regs[0]} | {regs[1]} | "
            f"{max((k.registers for k in others), default=0)} | {spills} | {shared / 1024:.0f} ({SHARED_LIMIT[report.arch] // 1024}) | "
            f"{occupancy} | {status} |"
        )
    return "\n".join(lines)


def describe(config: MoEConfig) -> str:
    """A compact one-line form of a config: bm, then n x k / warps / stages per GEMM, combine."""
    def gemm(g) -> str:
        return f"{g.block_n}x{g.block_k}/w{g.num_warps}/s{g.num_stages}"

    return f"bm{config.block_m} gu {gemm(config.gate_up)} dn {gemm(config.down)} cb {config.combine_block_h}/w{config.combine_num_warps}"


def tuner_space() -> list[MoEConfig]:
    """Every tile shape ``bench/tune.py`` may give a GEMM kernel (``TUNING_AXES``), as configs whose two
    GEMMs share it (each kernel's code depends only on block_m and its own tile; group_m only reorders
    programs)."""
    axes = [TUNING_AXES[name] for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages")]
    return [
        MoEConfig(block_m, GemmConfig(block_n, block_k, 8, warps, stages), GemmConfig(block_n, block_k, 8, warps, stages))
        for block_m, block_n, block_k, warps, stages in itertools.product(*axes)
    ]


def tuner_sample(arch: int, size: int) -> list[MoEConfig]:
    """A deterministic sample (seeded by ``arch``) of :func:`tuner_space`; all of it when ``size`` < 0."""
    space = tuner_space()
    return space if size < 0 or size >= len(space) else random.Random(arch).sample(space, size)


def checks_for(arch: int, tuner: int, extra: Path | None) -> list[tuple[str, LayerShape, MoEConfig]]:
    """The (source, shape, config) checks of one target: shipped configs, tuner sample, extra file."""
    checks = shipped_configs(arch)
    checks += [("tuner space", SHAPES[0], config) for config in tuner_sample(arch, tuner)] if tuner else []
    if extra is not None:
        checks += [(f"{extra.name}#{number}", SHAPES[0], MoEConfig.from_dict(entry["config"]))
                   for number, entry in enumerate(json.loads(extra.read_text())["entries"])]
    return checks


def run_parallel(archs: list[int], args: list[str], jobs: int, folder: Path) -> list[dict]:
    """Run this module once per target in ``jobs`` parallel processes (compiled, not interpreted; from the
    repository root, where reap_lab/ is importable); return the reports of all of them (``ConfigReport.to_dict`` form)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}

    def one(arch: int) -> list[dict]:
        out = folder / f"compile_check_sm{arch}.json"
        result = subprocess.run([sys.executable, "-m", "reap_lab.compile_check", "--arch", str(arch), "--json", str(out), *args],
                                capture_output=True, text=True, env=env, check=False, cwd=REPOSITORY)
        if not out.is_file():
            raise RuntimeError(f"compile check for sm_{arch} wrote no report:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return json.loads(out.read_text())

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return [report for reports in pool.map(one, archs) for report in reports]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(SHARED_LIMIT))
    parser.add_argument("--tuner", type=int, default=0, metavar="N",
                        help="also check N configs of the tuner's space (a fixed sample per target; -1: all of it)")
    parser.add_argument("--extra", type=Path, help="a config file (reap_kernels/configs format) to check on every --arch")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON")
    args = parser.parse_args(argv)
    if _interpreted():
        print("compile_check: error: TRITON_INTERPRET=1 is set; compile checks need compiled kernels", file=sys.stderr)
        return 2
    checker = CompileChecker()
    reports = [checker.check(config, shape, arch, source)
               for arch in args.arch for source, shape, config in checks_for(arch, args.tuner, args.extra)]
    print(format_table(reports))
    if args.json:
        args.json.write_text(json.dumps([report.to_dict() for report in reports], indent=1))
    failed = [report for report in reports if not report.ok and report.source != "tuner space"]
    print(f"{len(reports)} config x target checks; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
