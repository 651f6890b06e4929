"""The building blocks of the stage configs: range, integer and choice checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..errors import UsageError

DEFAULT_SEED = 42  # upstream ReapArgs.seed; every stage that draws random numbers (calibration sampling, "random" pruning, AutoRound)


class ConfigError(UsageError):
    """A setting outside what its stage can run with (one line, exit 2).

    ``template`` names the settings it is about as ``{0}``, ``{1}``, ... (``settings``: their field names, of the
    config class ``owner``); ``str()`` shows the field names, as the Python API knows them, and a command line
    shows its own flag spelling through :meth:`spelled`. A message without settings is shown as written.
    """

    def __init__(self, template: str, *settings: str, owner: str | None = None) -> None:
        self.template, self.settings, self.owner = template, settings, owner
        super().__init__(template.format(*settings) if settings else template)

    def spelled(self, spell: Callable[[str | None, str], str | None]) -> str:
        """The message with each setting named by ``spell(owner, field)`` (None: keep the field name)."""
        if not self.settings:
            return str(self)
        names = [spell(self.owner, name) or name for name in self.settings]
        return " ".join(self.template.format(*names).split())


def shown(value: Any) -> str:
    """``repr(value)`` safe inside a :class:`ConfigError` template (braces doubled)."""
    return repr(value).replace("{", "{{").replace("}", "}}")


def check_range(
    name: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    error: type[ConfigError] = ConfigError,
    owner: str | None = None,
) -> None:
    """Refuse ``value`` outside ``[low, high]`` (``open_low``/``open_high`` exclude that end) with ``error``
    about setting ``name`` (of config class ``owner``); None passes."""
    if value is None:
        return
    below = low is not None and (value <= low if open_low else value < low)
    above = high is not None and (value >= high if open_high else value > high)
    if below or above:
        left = "-inf" if low is None else _shown(low)
        right = "inf" if high is None else _shown(high)
        interval = f"{'(' if open_low or low is None else '['}{left}, {right}{')' if open_high or high is None else ']'}"
        raise error(f"{{0}} must be in {interval}, got {shown(value)}", name, owner=owner)


def _shown(bound: float) -> str:
    """A range bound as written: 1048576, not 1.04858e+06."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def check_integer(name: str, value: Any, error: type[ConfigError] = ConfigError, owner: str | None = None) -> None:
    """Refuse ``value`` that is not an int (a bool is not one) with ``error``; None passes."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise error(f"{{0}} must be an integer, got {shown(value)}", name, owner=owner)


def check_choice(
    name: str, value: Any, choices: Iterable[Any], error: type[ConfigError] = ConfigError, owner: str | None = None
) -> None:
    """Refuse ``value`` that is not one of ``choices`` with ``error``."""
    allowed = tuple(choices)
    if value not in allowed:
        raise error(f"{{0}} must be one of {', '.join(map(shown, allowed))}; got {shown(value)}", name, owner=owner)
