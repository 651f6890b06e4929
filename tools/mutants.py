"""Planted bugs: one-line wrong versions of key decisions, each of which the test suite must catch.

Usage: ``python tools/mutants.py [--list] [--only NAME ...] [--keep]`` (``make mutants``).

The working tree (tracked and untracked, not ignored files) is copied into a temporary folder; every
mutant replaces one exact snippet of one file there, runs its test subset with the copy first on
``PYTHONPATH``, and restores the file. A mutant
is *caught* when its tests fail (pytest exit status 1). The union of the subsets is run once unmutated
first (one pytest process): it must pass. Exit status 0 only when every mutant is caught; a snippet that is not found (the code
moved) is an error naming the mutant, so the list is kept in step with the code.

Add a mutant for every bug found: ``Mutant(name, files, original, replacement, tests, also=...)`` where
``files`` lists candidate paths and ``also`` other (file, original, replacement) sites; the first site
whose file holds its snippet exactly once is used (code that moves between versions keeps its mutant).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Mutant:
    name: str
    files: tuple[str, ...]  # candidate paths, relative to the repository root
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)
    also: tuple[tuple[str, str, str], ...] = ()  # other (file, original, replacement) sites, tried in order


BASE = ("reap_fast/models/base.py",)
SESSION = ("reap_fast/observe/session.py",)
PRUNE = ("reap_fast/prune/__init__.py",)
DROPIN = ("reap_fast/upstream/main.py",)
PIPELINE = ("reap_fast/pipeline.py",)
CLI = ("reap_fast/cli.py",)
SELECT = ("reap_fast/prune/select.py",)
GATES = ("tests/test_gate_oracle.py",)
E2E = "tests/test_e2e_decisions.py"

MUTANTS: tuple[Mutant, ...] = (
    # --- gate semantics --------------------------------------------------------------------------------
    Mutant("model_renormalizes always False", BASE,
           '"""Whether the model itself renormalises its top-k weights."""',
           '"""Whether the model itself renormalises its top-k weights."""\n        return False',
           GATES + ("-k", "observation and (qwen3_moe or mixtral)")),
    Mutant("always_renormalizes ignored (Mixtral, Qwen3.5, gpt-oss)", BASE,
           "if self.always_renormalizes:", "if False:", GATES + ("-k", "observation and (mixtral or gpt_oss)")),
    Mutant("norm_topk_prob ignored", BASE,
           "return bool(getattr(text_config(config), self.renormalize_key, False))", "return False",
           GATES + ("-k", "observation and qwen3_moe")),
    Mutant("routed_scaling_factor not divided out", BASE,
           "return _model_weight_gate(self.routed_scaling_factor(config), renormalize)",
           "return _model_weight_gate(1.0, renormalize)", GATES + ("-k", "observation and deepseek_v3")),
    Mutant("routed_scaling_factor multiplied instead of divided", BASE,
           "gates = top_k_weights.to(torch.float32) / scale", "gates = top_k_weights.to(torch.float32) * scale",
           GATES + ("-k", "observation and deepseek_v3")),
    Mutant("softmax over the top-k logits only", BASE,
           "gates = probs.gather(1, top_k_index.long())",
           "gates = torch.softmax(logits.float().gather(1, top_k_index.long()), dim=-1)",
           GATES + ("-k", "observation and qwen3_moe")),
    Mutant("router logit bias left out of g (gpt-oss)", BASE,
           'weight, bias = router.weight, getattr(router, "bias", None)', "weight, bias = router.weight, None", GATES + ("-k", "gpt_oss")),
    Mutant("renormalisation divides by k instead of the top-k sum", BASE,
           "gates = gates / gates.sum(dim=-1, keepdim=True)", "gates = gates / gates.shape[-1]",
           GATES + ("-k", "observation and qwen3_moe")),
    Mutant("DeepSeek-V3 g from a softmax of the logits (sigmoid router ignored)", ("reap_fast/models/families.py",),
           'model_types=("deepseek_v3", "kimi_k2"),\n        num_experts_key="n_routed_experts",\n'
           '        gate_mode="model_weights",',
           'model_types=("deepseek_v3", "kimi_k2"),\n        num_experts_key="n_routed_experts",\n'
           '        gate_mode="softmax",', GATES + ("-k", "observation and deepseek_v3")),
    # --- renormalisation flag ----------------------------------------------------------------------------
    Mutant("Observer ignores --renormalize-router-weights", SESSION,
           "self.renormalize = renormalize and self.adapter.model_renormalizes(model.config)",
           "self.renormalize = self.adapter.model_renormalizes(model.config)",
           GATES + ("-k", "observation and qwen3_moe")),
    Mutant("Observer renormalises where the model does not", SESSION,
           "self.renormalize = renormalize and self.adapter.model_renormalizes(model.config)",
           "self.renormalize = renormalize", GATES + ("-k", "observation and qwen3_moe")),
    Mutant("drop-in forces renormalize=True", DROPIN,
           "renormalize=renormalize,", "renormalize=True,", (E2E, "-k", "renormalize_false")),
    # --- groups ------------------------------------------------------------------------------------------
    Mutant("prune_checkpoint calls select_experts without groups", PRUNE,
           'groups=routing["groups"])\n        prune_model(model, keep)',
           "groups=None)\n        prune_model(model, keep)", (E2E, "-k", "native_cli_prunes")),
    Mutant("drop-in prunes without the routing groups (it prunes through prune_checkpoint)", PRUNE,
           'groups=routing["groups"])\n        prune_model(model, keep)',
           "groups=None)\n        prune_model(model, keep)", (E2E, "-k", "dropin_prunes")),
    Mutant("model_routing reports no groups", PRUNE,
           "groups = (int(n_group), int(topk_group) if topk_group is not None else int(n_group))", "groups = None",
           (E2E, "-k", "prunes_every")),
    Mutant("group offsets dropped in uniform selection", SELECT,
           "offsets = (torch.arange(num_groups) * group_size).view(1, num_groups, 1)",
           "offsets = (torch.arange(num_groups) * 0).view(1, num_groups, 1)", ("tests/test_prune.py", "-k", "group")),
    # --- super experts -----------------------------------------------------------------------------------
    Mutant("native CLI drops --preserve-super-experts", ("reap_fast/config/prune.py",),
           'cli="--preserve-super-experts", upstream="perserve_super_experts")', 'upstream="perserve_super_experts")',
           (E2E, "-k", "native_cli_keeps")),
    Mutant("drop-in drops --perserve_super_experts", DROPIN,
           "preserve_super_experts=preserve_super,", "preserve_super_experts=False,",
           (E2E, "-k", "dropin_keeps")),
    Mutant("super experts also marked in the last quarter of layers", ("reap_fast/prune/scores.py",),
           "if not include_last_layers:", "if include_last_layers:", ("tests/test_prune.py", "-k", "super")),
    # --- selection -----------------------------------------------------------------------------------------
    Mutant("tie rule: lower index removed first", SELECT,
           "return (num_experts - 1) - flipped_order", "return torch.sort(scores, dim=-1, stable=True).indices",
           ("tests/test_prune.py", "-k", "tie")),
    Mutant("count range ignores the routing groups", SELECT,
           "by_groups = num_experts - num_groups * per_group", "by_groups = num_experts - per_group",
           ("tests/test_prune.py", "-k", "count_range")),
    Mutant("ratio budget rounded instead of int(E * r)", SELECT,
           "count = int(num_experts * config.compression_ratio)", "count = round(num_experts * config.compression_ratio)",
           ("tests/test_prune.py", "-k", "budget")),
    Mutant("run ignores --min-experts-per-layer", PIPELINE,
           "check_prune_budget(config, c.prune)", "check_prune_budget(config, replace(c.prune, min_experts_per_layer=None))",
           (E2E, "-k", "min_experts")),
    # --- settings ------------------------------------------------------------------------------------------
    Mutant("generated flags ignore what the user typed", ("reap_fast/config/flags.py",),
           "return config_type(**{**self.given(args, config_type), **fixed})", "return config_type(**fixed)",
           ("tests/test_settings.py", "-k", "reaches")),
    Mutant("run fingerprint keeps the volatile fields", PIPELINE,
           "if item.name not in volatile}", "if item.name}", ("tests/test_pipeline_config.py", "-k", "fingerprint")),
    Mutant("drop-in errors name the native flag", ("reap_fast/upstream/args.py",),
           'spellings = ("--" + source, "--" + source.replace("_", "-"))',
           'spellings = ("--" + source.replace("_", "-"),)', ("tests/test_settings.py", "-k", "dropin_errors")),
    # --- masks -----------------------------------------------------------------------------------------------
    Mutant("reference engine counts masked tokens", ("reap_fast/observe/reference.py",),
           "valid = token_mask.reshape(-1)[order // top_k]",
           "valid = torch.ones_like(token_mask.reshape(-1)[order // top_k])", GATES + ("-k", "masked")),
    Mutant("Observer counts padding", SESSION,
           "stats_mask = attention_mask.bool()", "stats_mask = None", ("tests/test_reference.py", "-k", "padding")),
    Mutant("Triton kernels ignore the token mask", ("reap_kernels/moe.py",),
           "mask = None if token_mask is None else token_mask if token_mask.dim() == 1 else token_mask.reshape(-1)",
           "mask = None",
           ("tests/test_kernels.py", "-k", "masked")),
    # --- statistics ----------------------------------------------------------------------------------------
    Mutant("EAN uses the L1 norm", ("reap_fast/observe/reference.py",),
           "norms = torch.linalg.vector_norm(y.float(), dim=-1)", "norms = y.float().abs().sum(dim=-1)",
           GATES + ("-k", "hand")),
    Mutant("reap divides by total tokens", ("reap_fast/metrics.py",),
           '"reap": torch.where(used, weighted / safe, 0.0).to(torch.float32),',
           '"reap": torch.where(used, weighted / self.total_tokens.cpu().clamp(min=1), 0.0).to(torch.float32),',
           GATES + ("-k", "hand")),
    Mutant("Triton engine takes the model's weights as g", ("reap_fast/observe/triton_engine.py",),
           "isinstance(gates, kernels.RouterGate) else gates.detach().to(torch.float32),",
           "isinstance(gates, kernels.RouterGate) else top_k_weights.detach().to(torch.float32),",
           ("tests/test_families.py", "-k", "triton and deepseek")),
    # --- packing -------------------------------------------------------------------------------------------
    Mutant("packing separators counted in the statistics", ("reap_fast/data/packing.py",),
           "ids[end], attention[end] = separator_id, 1",
           "ids[end], attention[end], counted[end] = separator_id, 1, True",
           ("tests/test_data.py", "-k", "packing")),
    Mutant("no gap between packed documents (upstream leaves one)", ("reap_fast/data/packing.py",),
           "position = end + 1", "position = end", ("tests/test_data.py", "-k", "packing")),
    # --- slicing ---------------------------------------------------------------------------------------------
    Mutant("router rows sliced from the front instead of the kept experts (in memory)", ("reap_fast/prune/slicing.py",),
           "_slice_router_tensor(layer.router, name, index, old_count, skeleton)",
           "_slice_router_tensor(layer.router, name, torch.arange(index.numel()), old_count, skeleton)",
           ("tests/test_prune.py", "-k", "slicing")),
    Mutant("router rows of the saved checkpoint taken from the front", ("reap_fast/prune/checkpoint.py",),
           "return name, tensor.index_select(dim, index).contiguous()",
           "return name, tensor.index_select(dim, torch.arange(len(kept))).contiguous()",
           (E2E, "-k", "native_cli_prunes")),
    Mutant("DeepSeek-V3 correction bias not sliced", ("reap_fast/models/families.py",),
           'model_types=("deepseek_v3", "kimi_k2"),\n        num_experts_key="n_routed_experts",\n'
           '        gate_mode="model_weights",\n        router_tensors=("weight", "e_score_correction_bias"),',
           'model_types=("deepseek_v3", "kimi_k2"),\n        num_experts_key="n_routed_experts",\n'
           '        gate_mode="model_weights",\n        router_tensors=("weight",),', (E2E, "-k", "native_cli_prunes")),
    Mutant("gpt-oss router bias not sliced", ("reap_fast/models/families.py",),
           'router_tensors=("weight", "bias"),', 'router_tensors=("weight",),',
           ("tests/test_prune.py", "-k", "gpt_oss")),
    Mutant("checkpoint writer leaves a renamed router tensor unsliced (ERNIE's moe_statics bias)",
           ("reap_fast/prune/checkpoint.py",),
           'alternatives += [rf"(?:^|\\.){re.escape(name)}$" for name in sorted(renamed)]',
           'alternatives += [rf"(?:^|\\.){re.escape(name)}$" for name in sorted(renamed) if False]',
           ("tests/test_prune.py", "-k", "own_spelling")),
    Mutant("pruned config.json misses transformers' spelling of a count key (5.x: num_local_experts)",
           ("reap_fast/prune/checkpoint.py",),
           "names += [target for alias, target in attribute_map.items() if alias in keys]", "pass",
           ("tests/test_saved_layout.py", "-k", "5x_saved_source")),
    Mutant("layer streaming fuses [up; gate] instead of [gate; up]", BASE,
           '("gate_up_proj", ("gate_proj", "up_proj")),', '("gate_up_proj", ("up_proj", "gate_proj")),',
           ("tests/test_streaming.py", "-k", "fused_experts_match")),
    Mutant("gpt-oss kernel layout taken as [gate; up] halves", ("reap_fast/models/families.py",),
           'activation="gpt_oss_swiglu", gate_class="GptOssExperts", interleaved=True,',
           'activation="gpt_oss_swiglu", gate_class="GptOssExperts", interleaved=False,',
           ("tests/test_kernels.py", "-k", "gpt_oss")),
    # --- resume and atomic writes ----------------------------------------------------------------------------
    Mutant("resume does not restore the statistics", ("reap_fast/observe/checkpointing.py",),
           "acc.load_state_tensors(states[index])", "pass", (E2E, "-k", "kill and in_memory")),
    Mutant("atomic_write writes into the final path", ("reap_fast/fileio.py",),
           'fd, tmp = tempfile.mkstemp(prefix=work_prefix(path, "tmp"), suffix=".tmp", dir=path.parent)',
           "fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), path",
           ("tests/test_atomic_outputs.py",)),
    Mutant("texts file {\"texts\": [...]} taken as the list itself", ("reap_fast/fileio.py",),
           'texts = data.get("texts") if isinstance(data, dict) else data', "texts = data",
           ("tests/test_atomic_outputs.py", "-k", "texts_file")),
    Mutant("a child's SIGTERM handler is never put back", ("reap_fast/children.py",),
           "return lambda: signal.signal(signal.SIGTERM, previous)", "return lambda: None",
           ("tests/test_children.py", "-k", "sigterm")),
)


class SnippetError(RuntimeError):
    """A mutant's snippet is missing or not unique: the code moved and the mutant must be updated."""


def copy_tree(destination: Path) -> None:
    """Copy the working tree's tracked and untracked, not ignored files into ``destination``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def check_imports_from(copy: Path) -> None:
    """The copy, not the installed project, must be what the tests import."""
    probe = "import reap_fast, reap_kernels; print(reap_fast.__file__); print(reap_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=environment(copy), check=True,
                         capture_output=True, text=True).stdout.split()
    if not all(Path(path).resolve().is_relative_to(copy.resolve()) for path in out):
        raise SystemExit(f"mutants: the tests would import {out}, not the copy in {copy}")


def locate(mutant: Mutant, copy: Path) -> tuple[Path, str, str]:
    """The first site holding its snippet exactly once: (path, original, replacement)."""
    sites = [(relative, mutant.original, mutant.replacement) for relative in mutant.files] + list(mutant.also)
    for relative, original, replacement in sites:
        path = copy / relative
        if path.is_file():
            count = path.read_text().count(original)
            if count == 1:
                return path, original, replacement
            if count > 1:
                raise SnippetError(f"{mutant.name}: the snippet occurs {count} times in {relative}")
    tried = ", ".join(f"{relative}: {original!r}" for relative, original, _ in sites)
    raise SnippetError(f"{mutant.name}: snippet not found ({tried})")


def union_of_subsets(subsets: list[tuple[str, ...]]) -> tuple[str, ...]:
    """One pytest selection holding every subset: each file's tests, narrowed by its -k where all subsets narrow it."""
    files: dict[str, list[str | None]] = {}
    for tests in subsets:
        paths = [arg for arg in tests if arg.endswith(".py")]
        expression = tests[tests.index("-k") + 1] if "-k" in tests else None
        for path in paths:
            files.setdefault(path, []).append(expression)
    clauses = []
    for path, expressions in files.items():
        module = Path(path).stem
        if None in expressions:
            clauses.append(module)
        else:
            clauses.append(f"({module} and ({' or '.join(f'({e})' for e in dict.fromkeys(expressions))}))")
    return (*files, "-k", " or ".join(clauses))


def run_tests(copy: Path, tests: tuple[str, ...], stop_first: bool = True) -> tuple[int, float, str]:
    command = [sys.executable, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, "timed out"
    tail = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, time.monotonic() - start, tail[-1] if tail else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", nargs="+", default=None, help="run the mutants whose name contains one of these")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or any(word in m.name for word in args.only)]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}: {mutant.files[0]} -> {' '.join(mutant.tests)}")
        return 0
    if not chosen:
        print("mutants: no mutant matches --only", file=sys.stderr)
        return 2
    copy = Path(tempfile.mkdtemp(prefix="reap-mutants-"))
    try:
        copy_tree(copy)
        check_imports_from(copy)
        errors = []
        for mutant in chosen:  # every snippet is checked before the long work starts
            try:
                locate(mutant, copy)
            except SnippetError as exc:
                errors.append(str(exc))
        if errors:
            print("mutants: error: " + "\n  ".join(errors), file=sys.stderr)
            return 2
        baseline = union_of_subsets([m.tests for m in chosen])
        status, seconds, last = run_tests(copy, baseline, stop_first=False)
        print(f"baseline  {seconds:6.1f}s  every subset, unmutated: {last}", flush=True)
        if status != 0:
            print(f"mutants: error: the unmutated subsets do not pass: {' '.join(baseline)}", file=sys.stderr)
            return 2
        missed = []
        for mutant in chosen:
            path, snippet, replacement = locate(mutant, copy)
            original = path.read_text()
            path.write_text(original.replace(snippet, replacement))
            try:
                status, seconds, last = run_tests(copy, mutant.tests)
            finally:
                path.write_text(original)
            verdict = {1: "caught"}.get(status, "MISSED" if status == 0 else f"ERROR (pytest exit {status})")
            print(f"{verdict:8s}  {seconds:6.1f}s  {mutant.name}  [{last}]", flush=True)
            if verdict != "caught":
                missed.append(mutant.name)
        print(f"\n{len(chosen) - len(missed)} of {len(chosen)} planted bugs caught")
        if missed:
            print("not caught: " + "; ".join(missed))
        return 1 if missed else 0
    finally:
        if args.keep:
            print(f"copy kept in {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
