"""The wheel holds what users import: reap_fast/ and reap_kernels/ with their package data, nothing of reap_lab/,
tests/, bench/ or tools/, and no module in it imports them. ``reap-fast demo`` runs reap_lab's demo from a clone
and says in one line, without a traceback, that a wheel alone has no lab."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reap_fast.errors import EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("reap_fast", "reap_kernels")


def working_tree_files() -> list[str]:
    """Tracked and untracked, not ignored files of the checkout (what a fresh clone plus local edits holds)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return sorted(relative for relative in listed if relative and (REPO / relative).is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel pip builds from a copy of the working tree (the build's scratch folders stay out of the checkout)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for relative in working_tree_files():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes((REPO / relative).read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("reap_fast-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def shipped_files(archive: zipfile.ZipFile) -> set[str]:
    return {name for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}


def test_the_wheel_holds_the_two_packages_and_their_data_only(wheel):
    """Every file of reap_fast/ and reap_kernels/ but their Markdown notes; nothing else of the repository."""
    expected = {relative for relative in working_tree_files()
                if relative.split("/")[0] in SHIPPED and not relative.endswith(".md")}
    files = shipped_files(wheel)
    assert {name.split("/")[0] for name in files} == set(SHIPPED)
    assert files == expected
    assert "reap_kernels/configs/default.json" in files and "reap_fast/demo.py" in files  # data and the demo's entry
    assert not any(name.startswith("reap_lab/") or name.endswith("compile_check.py") for name in files)


def imported_roots(source: str) -> set[str]:
    """The top-level names a module's absolute imports (module-level and in functions) start from."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_reads_every_kind_of_import():
    source = "import a.b, c\nfrom d.e import f\nfrom . import g\ndef h():\n    from reap_lab import tiny\n"
    assert imported_roots(source) == {"a", "c", "d", "reap_lab"}


def test_no_shipped_module_imports_the_repository_support_code(wheel):
    """Names of the repository's other folders and of the test/bench helper modules imported flat (``oracle``)."""
    tree = working_tree_files()
    support = {Path(relative).parts[0] for relative in tree if "/" in relative} - set(SHIPPED)
    support |= {Path(relative).stem for relative in tree if relative.split("/")[0] in ("tests", "bench", "tools")}
    assert {"reap_lab", "tests", "bench", "tools", "oracle", "conftest"} <= support
    modules = sorted(name for name in shipped_files(wheel) if name.endswith(".py"))
    assert len(modules) > 60
    importers = {name: sorted(imported_roots(wheel.read(name).decode()) & support) for name in modules}
    assert {name: roots for name, roots in importers.items() if roots} == {}
    # reap_fast/demo.py finds the lab's demo by name, the one place a shipped file names it
    assert [name for name in modules if b"reap_lab" in wheel.read(name)] == ["reap_fast/demo.py"]


def _run(code_or_module: list[str], cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, *code_or_module], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_demo_from_the_wheel_alone_says_where_it_runs_in_one_line(wheel, tmp_path):
    site = tmp_path / "site"
    wheel.extractall(site)
    result = _run(["-m", "reap_fast", "demo", "--output", str(tmp_path / "out")], tmp_path, site)
    assert result.returncode == EXIT_USAGE, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "reap-fast demo: error: the demo trains its tiny model with reap_lab/, which is not installed with "
        "reap-fast: run `make demo` in a clone of the repository"]
    assert not (tmp_path / "out").exists()


def test_demo_finds_the_lab_beside_the_package_of_a_clone(tmp_path):
    """An editable install of a clone (its reap_fast/ reached from elsewhere, the root not on sys.path)."""
    site = tmp_path / "site"
    site.mkdir()
    for package in SHIPPED:
        (site / package).symlink_to(REPO / package)
    probe = "import importlib.util; from reap_fast.demo import lab_demo\n" \
            "print(importlib.util.find_spec('reap_lab') is None, lab_demo().__file__)"
    result = _run(["-c", probe], tmp_path, site)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", str(REPO / "reap_lab" / "demo.py")]
