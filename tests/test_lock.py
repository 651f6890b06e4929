"""The locks CI installs agree with pyproject: every requirement (with the extras the Makefile installs) is pinned
in requirements/lock.txt at a version its range allows, every pin has hashes, and torch stays outside."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("test", "quant", "eval")
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", re.MULTILINE)
MARKER_ENV = {"platform_system": "Linux", "sys_platform": "linux", "python_version": "3.11", "extra": ""}


def _pins(name: str) -> dict[str, Version]:
    text = (REPO / "requirements" / name).read_text(encoding="utf-8")
    return {canonicalize_name(package): Version(version) for package, version in PIN.findall(text)}


def _entries(name: str) -> list[str]:
    text = (REPO / "requirements" / name).read_text(encoding="utf-8")
    return re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text.split("\n", 2)[2])


def _project_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        listed += project["optional-dependencies"][extra]
    return [Requirement(line) for line in listed]


def test_every_project_requirement_is_locked_within_its_range():
    pins = _pins("lock.txt")
    for requirement in _project_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate(MARKER_ENV)):
            continue
        assert name in pins, f"{name} is in pyproject but not in requirements/lock.txt (run make lock)"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"lock pins {name}=={pins[name]}, outside pyproject's {requirement.specifier} (run make lock)"


@pytest.mark.parametrize("lock", ["lock.txt", "upstream-lock.txt", "tools.txt"])
def test_every_pin_has_hashes_and_torch_is_outside(lock):
    entries = [entry for entry in _entries(lock) if PIN.match(entry)]
    assert entries
    for entry in entries:
        assert "--hash=sha256:" in entry, f"{entry.splitlines()[0]} has no hash"
    assert "torch" not in _pins(lock)


def test_upstream_lock_holds_upstreams_transformers():
    assert _pins("upstream-lock.txt")["transformers"] == Version("4.55.0")


def test_this_venv_is_the_lock():
    """What the suite runs in is what the lock says (skipped in `make test-latest`'s venv, which resolves anew)."""
    import sys
    from importlib import metadata

    import torch

    if Path(sys.prefix).name == ".venv-latest":
        pytest.skip("make test-latest runs the newest releases, not the lock")
    kept = {"triton"} if torch.version.cuda else set()  # a CUDA torch's venv keeps its own triton (Makefile)
    for name, version in _pins("lock.txt").items():
        if name in kept:
            continue
        installed = Version(metadata.version(name))
        assert installed == version, f"{name} {installed} installed, the lock says {version} (rerun make)"
