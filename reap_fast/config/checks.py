"""The building blocks of the stage configs: range, integer and choice checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ..errors import UsageError

Config = TypeVar("Config")

DEFAULT_SEED = 42  # upstream ReapArgs.seed; every stage that draws random numbers (calibration sampling, "random" pruning, AutoRound)


class ConfigError(UsageError):
    """A setting outside what its stage can run with (one line, exit 2)."""


def check_range(
    name: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    error: type[ConfigError] = ConfigError,
) -> None:
    """Refuse ``value`` outside ``[low, high]`` (``open_low``/``open_high`` exclude that end) with ``error``;
    None passes."""
    if value is None:
        return
    below = low is not None and (value <= low if open_low else value < low)
    above = high is not None and (value >= high if open_high else value > high)
    if below or above:
        left = "-inf" if low is None else _shown(low)
        right = "inf" if high is None else _shown(high)
        interval = f"{'(' if open_low or low is None else '['}{left}, {right}{')' if open_high or high is None else ']'}"
        raise error(f"{name} must be in {interval}, got {value!r}")


def _shown(bound: float) -> str:
    """A range bound as written: 1048576, not 1.04858e+06."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def check_integer(name: str, value: Any, error: type[ConfigError] = ConfigError) -> None:
    """Refuse ``value`` that is not an int (a bool is not one) with ``error``; None passes."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise error(f"{name} must be an integer, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any], error: type[ConfigError] = ConfigError) -> None:
    """Refuse ``value`` that is not one of ``choices`` with ``error``."""
    allowed = tuple(choices)
    if value not in allowed:
        raise error(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
