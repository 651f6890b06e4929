"""Nothing in the repository can stand in for the Hugging Face `kernels` package (which transformers >= 5.25
imports whenever its modeling utilities load), from any working directory or kind of process; every package of
reap_fast/ is in the wheel."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHILD_MODULES = ("reap_fast", "reap_fast.prune", "reap_fast.layerwise_prune", "reap_fast.evaluate.heldout",
                 "reap_fast.evaluate.harness", "reap_fast.quantize.worker")

PROBE = """
import importlib, sys
import transformers.modeling_utils  # imports Hugging Face's `kernels` (transformers.integrations.hub_kernels)
import kernels
import reap_kernels
assert hasattr(reap_kernels, "fused_moe"), "reap_kernels lacks its API"
assert not hasattr(kernels, "fused_moe"), "our Triton package was imported as `kernels`"
print("kernels:", kernels.__file__)
print("reap_kernels:", reap_kernels.__file__)
"""


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def _hf_kernels_origin() -> str:
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("Hugging Face's `kernels` package is not installed (transformers < 5.25 does not need it)")
    return str(Path(spec.origin).parent)


def test_no_path_in_the_repository_is_named_kernels():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    shadows = sorted({part for path in tracked for part in Path(path).parts if Path(part).stem == "kernels"})
    assert shadows == []


def test_reap_kernels_is_imported_from_its_own_folder():
    import reap_kernels

    assert Path(reap_kernels.__file__).resolve().parent == REPO / "reap_kernels"


@pytest.mark.parametrize("where", ["root", "tests", "elsewhere"])
def test_transformers_gets_hugging_face_kernels_from_any_working_directory(where, tmp_path):
    origin = _hf_kernels_origin()
    cwd = {"root": REPO, "tests": REPO / "tests", "elsewhere": tmp_path}[where]
    result = _run([sys.executable, "-c", PROBE], cwd)
    assert result.returncode == 0, result.stderr
    assert f"kernels: {origin}" in result.stdout
    assert f"reap_kernels: {REPO / 'reap_kernels'}" in result.stdout


def test_each_child_process_kind_starts_from_the_repository_root():
    """A child has the working directory first on sys.path (``python -m``, ``python -c``): every module the project
    starts as a process imports, then transformers' modeling utilities load Hugging Face's `kernels`, not ours."""
    origin = _hf_kernels_origin()
    imports = "".join(f"importlib.import_module({module!r})\n" for module in CHILD_MODULES)
    loaded = _run([sys.executable, "-c", "import importlib\n" + imports + PROBE], REPO)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert f"kernels: {origin}" in loaded.stdout
    as_module = _run([sys.executable, "-m", "reap_fast.evaluate.heldout", "--help"], REPO)
    assert as_module.returncode == 0, as_module.stderr[-2000:]


def test_every_package_folder_is_in_the_package_list():
    """pyproject lists the packages by name; a folder left out is not installed."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    folders = {".".join(path.parent.relative_to(REPO).parts)
               for package in ("reap_fast", "reap_kernels") for path in (REPO / package).rglob("__init__.py")}
    assert folders - listed == set()
