"""One declaration per setting: its default, range, help and flag spellings, in the stage config's field.

A stage config field is written ``batch_size: int = setting(1, "sequences per forward pass", cli="--batch-size",
low=1, upstream="batch_size")``. From that one place come the config's own range checks (:func:`validate`, called
by ``__post_init__``), the ``reap-fast`` flags of each command and of ``run`` (:mod:`reap_fast.config.flags`), the
drop-in's reap-fast flags and the upstream argument that feeds the setting (:mod:`reap_fast.upstream.args`), which
fields leave the ``run`` fingerprint (``volatile``), and the flag a config error names (:meth:`ConfigError.spelled`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .checks import ConfigError, check_choice, check_integer, check_range

SETTING = "reap_fast.setting"  # the dataclass field metadata key


@dataclass(frozen=True)
class Setting:
    """What a field declares besides its name, type and default.

    * ``cli``: its flag spellings in its stage's own ``reap-fast`` command (first: the one errors name; empty:
      no flag, the Python API only); ``run``: its spellings under ``reap-fast run`` (None: as ``cli``; empty: not
      a ``run`` flag). A flag several stages declare under ``run`` (``--seed``) sets all of them.
    * ``upstream``: the upstream REAP argument whose value the drop-in gives this setting; ``dropin``: the
      name of a reap-fast flag the drop-in adds for it (``--engine``), with this default and help.
    * ``low``/``high`` (``open_low``/``open_high``), ``choices``, ``integer``: the checks :func:`validate` makes.
    * ``volatile``: changes where or how fast a result is computed, not the result (left out of fingerprints).
    * ``parse``, ``metavar``, ``negatable`` (``--x`` / ``--no-x``), ``flag_choices`` (what the flag accepts where
      the API takes more), ``exclusive`` (a group of flags of which one may be given): how argparse reads it.
    """

    help: str
    cli: tuple[str, ...] = ()
    run: tuple[str, ...] | None = None
    upstream: str | None = None
    dropin: str | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | None = None
    flag_choices: tuple[Any, ...] | None = None
    integer: bool = False
    volatile: bool = False
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    negatable: bool = False
    exclusive: str | None = None

    def flags(self, command: str) -> tuple[str, ...]:
        """The spellings of this setting in ``command`` ("run" or the stage's own command)."""
        if command == "run" and self.run is not None:
            return self.run
        return self.cli


def setting(default: Any, help: str, *, cli: str | tuple[str, ...] = (), run: str | tuple[str, ...] | None = None,
            **declared: Any) -> Any:
    """A dataclass field with its :class:`Setting` (keywords as its attributes; a flag may be one string)."""
    spelled = {"cli": (cli,) if isinstance(cli, str) else tuple(cli)}
    if run is not None:
        spelled["run"] = (run,) if isinstance(run, str) else tuple(run)
    for name in ("choices", "flag_choices"):
        if name in declared:
            declared[name] = tuple(declared[name])
    return dataclasses.field(default=default, metadata={SETTING: Setting(help=help, **spelled, **declared)})


def declared(config_type: type) -> Iterator[tuple[dataclasses.Field, Setting]]:
    """Each field of ``config_type`` that declares a :class:`Setting`, with it."""
    for field in dataclasses.fields(config_type):
        if SETTING in field.metadata:
            yield field, field.metadata[SETTING]


def validate(config: Any, error: type[ConfigError] = ConfigError) -> None:
    """Check every declared range, choice and integer of ``config`` (raises ``error`` naming the field)."""
    owner = type(config).__name__
    for field, spec in declared(type(config)):
        value = getattr(config, field.name)
        if spec.integer:
            check_integer(field.name, value, error, owner)
        if spec.choices is not None:
            check_choice(field.name, value, spec.choices, error, owner)
        if spec.low is not None or spec.high is not None:
            check_range(field.name, value, spec.low, spec.high, open_low=spec.open_low, open_high=spec.open_high,
                        error=error, owner=owner)


def volatile_fields(config_type: type) -> frozenset[str]:
    """The fields of ``config_type`` that do not change a result (see :attr:`Setting.volatile`)."""
    return frozenset(field.name for field, spec in declared(config_type) if spec.volatile)


def parse_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no) for flags written as upstream's HfArgumentParser accepts them."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
