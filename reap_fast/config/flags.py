"""Command-line flags generated from the stage configs' declarations (:mod:`reap_fast.config.declare`).

``SettingFlags(parser, "run", (ObserveConfig, PruneConfig, ...))`` adds every declared flag of those configs for
that command; ``flags.build(args, ObserveConfig)`` is the config of what the user typed (every setting not typed
keeps the config's own default, so a default is written once), and ``flags.spell`` names a setting by the flag
the user typed, for :meth:`ConfigError.spelled`.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field
from typing import Any, Sequence

from .declare import Setting, declared


def typed_flags(flags: Sequence[str], argv: Sequence[str]) -> list[str]:
    """The spellings of ``flags`` that ``argv`` holds (``--flag value`` or ``--flag=value``), in ``flags``' order."""
    return [flag for flag in flags if any(arg == flag or arg.startswith(flag + "=") for arg in argv)]


def flag_type(config_type: type, name: str) -> Any:
    """The Python type a flag of field ``name`` parses to: the field's annotation without ``None``."""
    hint = typing.get_type_hints(config_type)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def default_note(field: Field, spec: Setting) -> str:
    """``spec.help`` with the field's default, where the help does not say it already."""
    default = field.default
    if default is MISSING or default in (None, False) or "default" in spec.help:
        return spec.help
    return f"{spec.help} (default: {str(default).lower() if isinstance(default, bool) else default})"


def argparse_options(config_type: type, field: Field, spec: Setting) -> dict[str, Any]:
    """``add_argument`` keywords of one setting; the default is left out (SUPPRESS): only typed flags count."""
    options: dict[str, Any] = {"default": argparse.SUPPRESS, "help": default_note(field, spec)}
    if spec.negatable:
        return {**options, "action": argparse.BooleanOptionalAction}
    kind = spec.parse or flag_type(config_type, field.name)
    if kind is bool:
        if field.default is not False:
            raise TypeError(f"{config_type.__name__}.{field.name}: a flag of a setting true by default needs parse")
        return {**options, "action": "store_true"}
    options["type"] = kind
    choices = spec.flag_choices or spec.choices
    if choices is not None:
        options["choices"] = list(choices)
    if spec.metavar is not None:
        options["metavar"] = spec.metavar
    return options


class SettingFlags:
    """The generated flags of one command and the configs built from its parsed arguments."""

    def __init__(self, parser: argparse.ArgumentParser, command: str, configs: Sequence[type]) -> None:
        self.command = command
        self.dests: dict[type, dict[str, str]] = {}  # config type -> field -> argparse dest
        self.spellings: dict[tuple[str, str], tuple[str, ...]] = {}  # (config name, field) -> flags
        defaults: dict[str, Any] = {}  # dest -> the default of the first config declaring it
        groups: dict[str, Any] = {}
        for config_type in configs:
            for field, spec in declared(config_type):
                flags = spec.flags(command)
                if not flags:
                    continue
                dest = flags[0].lstrip("-").replace("-", "_")
                if dest in defaults:  # one flag, several stages (run's --seed): their defaults must agree
                    if defaults[dest] != field.default:
                        raise TypeError(f"{flags[0]} has two defaults in {command}: {defaults[dest]!r}, {field.default!r}")
                else:
                    defaults[dest] = field.default
                    target = parser
                    if spec.exclusive is not None:
                        if spec.exclusive not in groups:
                            groups[spec.exclusive] = parser.add_mutually_exclusive_group()
                        target = groups[spec.exclusive]
                    target.add_argument(*flags, dest=dest, **argparse_options(config_type, field, spec))
                self.dests.setdefault(config_type, {})[field.name] = dest
                self.spellings[(config_type.__name__, field.name)] = flags

    def given(self, args: argparse.Namespace, config_type: type) -> dict[str, Any]:
        """The settings of ``config_type`` whose flags the user typed, with their values."""
        dests = self.dests.get(config_type, {})
        return {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}

    def build(self, args: argparse.Namespace, config_type: type, **fixed: Any) -> Any:
        """``config_type`` from the typed flags, plus ``fixed`` (settings the command decides)."""
        return config_type(**{**self.given(args, config_type), **fixed})

    def spell(self, owner: str | None, name: str, argv: Sequence[str] = ()) -> str | None:
        """The flag of setting ``name`` (of config ``owner``; None: any) as typed in ``argv``, else its first
        spelling; None for a setting without a flag in this command."""
        for (config_name, field_name), flags in self.spellings.items():
            if field_name == name and owner in (None, config_name):
                return (typed_flags(flags, argv) or flags)[0]
        return None
