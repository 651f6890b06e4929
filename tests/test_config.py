"""The shared building blocks of the stage configs (reap_fast.config.checks)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from reap_fast.config import ConfigError, check_choice, check_integer, check_range
from reap_fast.errors import ReapFastError


@dataclass(frozen=True)
class _Example:
    ratio: float | None = 0.5
    count: int = 1
    kind: str = "a"

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0, open_low=True, open_high=True)
        check_range("count", self.count, 1)
        check_choice("kind", self.kind, ("a", "b"))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ratio": 0.0}, "ratio must be in (0, 1), got 0.0"),
        ({"ratio": 1.0}, "ratio must be in (0, 1), got 1.0"),
        ({"count": 0}, "count must be in [1, inf), got 0"),
        ({"kind": "c"}, "kind must be one of 'a', 'b'; got 'c'"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(settings, message):
    with pytest.raises(ConfigError) as caught:
        _Example(**settings)
    assert str(caught.value) == message
    assert isinstance(caught.value, ReapFastError) and caught.value.exit_code == 2


def test_edges_and_none_pass():
    assert _Example(ratio=None, count=1).ratio is None
    check_range("x", 1.0, 0.0, 1.0)  # closed ends include the edge
    check_range("x", 0.0, 0.0, 1.0)


def test_a_replaced_config_is_validated_again():
    base = _Example(count=4)
    assert replace(base, kind="b") == _Example(count=4, kind="b")
    with pytest.raises(ConfigError, match=r"count must be in \[1, inf\), got -1"):
        replace(base, count=-1)


@pytest.mark.parametrize("value", [1.0, "3", True])
def test_check_integer_refuses_what_is_not_an_int(value):
    with pytest.raises(ConfigError) as caught:
        check_integer("steps", value)
    assert str(caught.value) == f"steps must be an integer, got {value!r}"


def test_check_integer_passes_ints_and_none():
    check_integer("steps", 0)
    check_integer("steps", None)
