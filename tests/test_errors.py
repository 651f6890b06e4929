"""The rule of errors.py's docstring: every ReapFastError of the package also derives from exactly one built-in
kind, ValueError (something the caller passed) unless it is one of the few about the machine or the moment."""

from __future__ import annotations

import importlib
import pkgutil

import reap_fast
from reap_fast.errors import ReapFastError

# The errors about the machine or the moment (RuntimeError) or a file in the way (an OSError kind).
NOT_VALUE_ERRORS = {"EngineUnavailableError", "MemoryPlanError", "OutputError", "OutputInUseError",
                    "OutputLocationError"}


def _package_errors() -> set[type]:
    for module in pkgutil.walk_packages(reap_fast.__path__, "reap_fast."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, todo = set(), [ReapFastError]
    while todo:
        for subclass in todo.pop().__subclasses__():
            if subclass.__module__.startswith("reap_fast.") and subclass not in found:
                found.add(subclass)
                todo.append(subclass)
    return found


def test_every_error_derives_from_exactly_one_builtin_kind_by_the_rule():
    errors = _package_errors()
    names = {error.__name__ for error in errors}
    assert {"UsageError", "ConfigError", "QuantizationError", "CliError", "ModelFolderError"} <= names  # found them
    assert NOT_VALUE_ERRORS <= names
    kinds = {error.__name__: [kind.__name__ for kind in (ValueError, RuntimeError, OSError) if issubclass(error, kind)]
             for error in errors}
    assert {name: kind for name, kind in kinds.items() if len(kind) != 1} == {}
    assert {name for name, kind in kinds.items() if kind != ["ValueError"]} == NOT_VALUE_ERRORS
