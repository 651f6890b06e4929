"""The package's floors: no import circles, the shipped stages load models without observe/'s internals,
and nothing shipped imports the lab (reap_lab/, not in the wheel); no function in the package or the lab takes more
than 8 parameters.

The import graph is read from the source with ``ast`` (nothing is imported): module-level imports (run
when the module is imported) and function-level imports (run when the function is called) are two
separate graphs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reap_fast"
LAB = PACKAGE.parent / "reap_lab"  # the research and tiny-model code beside the package (not shipped)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(path): path for folder in (PACKAGE, LAB) for path in folder.rglob("*.py")}


def imported_modules(node: ast.AST, importer: str, is_package: bool) -> set[str]:
    """The reap_fast modules an import statement names (``from pkg import sub`` names ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    named = set()
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        named.add(submodule if submodule in MODULES else target)
    return named & set(MODULES)


def import_graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges) of every module in reap_fast and reap_lab."""
    module_level: dict[str, set[str]] = {name: set() for name in MODULES}
    function_level: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, inside_function: bool) -> None:
            graph = function_level if inside_function else module_level
            graph[name] |= imported_modules(node, name, is_package)
            nested = inside_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, nested)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return module_level, function_level


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan), each sorted; a self-import counts."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": {"a"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c"], ["d"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_package():
    module_level, function_level = import_graphs()
    assert "reap_fast.observe.engines" in module_level["reap_fast.observe"]
    assert "reap_fast.models.loading" in module_level["reap_fast.observe.runner"]
    assert "reap_fast.models.loading" in function_level["reap_fast.prune"]


def test_no_import_cycle_through_module_level_imports():
    module_level, _ = import_graphs()
    assert find_cycles(module_level) == []


def test_no_import_cycle_even_counting_function_level_imports():
    """Lazy imports break a circle at import time only; the modules still depend on each other."""
    module_level, function_level = import_graphs()
    combined = {name: module_level[name] | function_level[name] for name in MODULES}
    assert find_cycles(combined) == []


def test_shipped_stages_do_not_import_observe_internals():
    """prune/, quantize and pipeline load models from reap_fast.models, not from observe/'s modules."""
    module_level, function_level = import_graphs()
    stages = [name for name in MODULES if name.startswith("reap_fast.prune") or name.startswith("reap_fast.quantize")]
    stages.append("reap_fast.pipeline")
    offending = {
        stage: sorted(target for target in module_level[stage] | function_level[stage] if target.startswith("reap_fast.observe."))
        for stage in stages
    }
    assert {stage: targets for stage, targets in offending.items() if targets} == {}


def in_lab(name: str) -> bool:
    return name == "reap_lab" or name.startswith("reap_lab.")


def test_nothing_shipped_imports_the_lab():
    """The shipped code stands without the research code (reap_fast.demo finds the lab's demo by name only)."""
    module_level, function_level = import_graphs()
    assert "reap_lab.corpus" in module_level["reap_lab.demo"]  # the check sees the lab's imports
    importers = {
        name: sorted(target for target in module_level[name] | function_level[name] if in_lab(target))
        for name in MODULES
        if not in_lab(name)
    }
    assert {name: targets for name, targets in importers.items() if targets} == {}


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters, ``self``/``cls`` and ``*args``/``**kwargs`` not counted."""
    arguments = function.args
    named = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    return len(named) - (1 if named[:1] in (["self"], ["cls"]) else 0)


def test_the_parameter_count_follows_the_rule():
    source = "def f(self, a, /, b, *args, c=1, **kw): pass\ndef g(a, b): pass\nclass K:\n    def h(cls, x): pass\n"
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    assert [parameter_count(f) for f in functions] == [3, 2, 1]


def test_no_function_takes_more_than_eight_parameters():
    """Settings travel as stage configs (reap_fast/config/), not as long keyword lists: the whole package and lab."""
    too_long = {
        f"{module_name(path)}.{node.name}": parameter_count(node)
        for path in sorted(MODULES.values())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > 8
    }
    assert "reap_lab.train.train_tiny_moe" not in too_long and len(MODULES) > 50  # the scan sees the package
    assert too_long == {}


STAGE_FUNCTIONS = {"observe/runner.py": ("observe_checkpoint",), "prune/__init__.py": ("prune_checkpoint", "check_prune_budget"),
                   "prune/select.py": ("select_experts",), "quantize/autoround.py": ("quantize_w4a16",),
                   "quantize/child.py": ("run_quantize_subprocess",)}


def test_stage_functions_take_their_inputs_and_one_config():
    """No keyword overrides beside the config: a setting reaches a stage one way, as a field of its config."""
    for relative, names in STAGE_FUNCTIONS.items():
        tree = ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))
        found = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names}
        assert sorted(found) == sorted(names), relative
        for name, node in found.items():
            named = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            configs = [a.arg for a in named if a.annotation is not None and "Config" in ast.unparse(a.annotation)]
            assert node.args.kwarg is None and len(configs) == 1, (name, node.args.kwarg, configs)
