"""The kernels folder ships as `reap_kernels` and never stands in for the Hugging Face `kernels` package; every
package of reap_fast/ is in the wheel."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys, importlib.util
import transformers
from transformers.utils.import_utils import is_kernels_available
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
import reap_kernels
assert hasattr(reap_kernels, "fused_moe"), "reap_kernels lacks its API"
assert not is_kernels_available(), "transformers thinks our folder is the Hugging Face kernels package"
shadow = sys.modules.get("kernels")
assert shadow is None or not hasattr(shadow, "fused_moe"), "the folder was imported as a working `kernels`"
spec = importlib.util.find_spec("kernels")
print("kernels spec:", None if spec is None else spec.origin)
print("ok")
"""


def _probe(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_reap_kernels_is_installed_from_the_kernels_folder():
    import reap_kernels

    assert Path(reap_kernels.__file__).resolve().parent == REPO / "kernels"


def test_transformers_imports_and_ignores_our_folder_outside_the_repo(tmp_path):
    result = _probe(tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(REPO / "kernels") not in result.stdout  # no top-level `kernels` resolves to our folder


def test_transformers_imports_from_the_repository_root():
    result = _probe(REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_every_package_folder_is_in_the_package_list():
    """pyproject lists the packages by name (kernels/ is mapped to reap_kernels); a folder left out is not installed."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    folders = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "reap_fast").rglob("__init__.py")}
    assert "reap_fast.lab" in folders
    assert folders - listed == set()
