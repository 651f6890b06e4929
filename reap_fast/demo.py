"""``reap-fast demo``: runs the lab's demo (reap_lab/demo.py) from a clone of the repository.

The demo trains its tiny model with the research code in reap_lab/, which the wheel does not ship. It is found
on ``sys.path`` (``make demo`` runs from the clone's root) or beside this package when reap_fast is the clone's
own (an editable install); an installed wheel says so in one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from .errors import UsageError

LAB_ABSENT = ("the demo trains its tiny model with reap_lab/, which is not installed with reap-fast: "
              "run `make demo` in a clone of the repository")


def lab_demo() -> ModuleType:
    """The module ``reap_lab.demo``, or a one-line :class:`UsageError` when no clone holds it."""
    if importlib.util.find_spec("reap_lab") is None:
        root = Path(__file__).resolve().parents[1]
        if not (root / "reap_lab" / "demo.py").is_file():
            raise UsageError(LAB_ABSENT)
        sys.path.append(str(root))
    return importlib.import_module("reap_lab.demo")


def run_demo(folder: Path) -> dict:
    """Train, observe, prune, quantize, evaluate, reload and generate (reap_lab.demo.run_demo)."""
    return lab_demo().run_demo(folder)
