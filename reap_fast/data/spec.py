"""Calibration dataset specs: ``name[subset](split):N,name2:M`` (upstream's composite syntax)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ReapFastError


DEFAULT_SPLIT = "train"


class CalibrationDataError(ReapFastError, ValueError):
    """Bad calibration input; the message is one line meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# --- spec parsing ------------------------------------------------------------------------------


@dataclass
class CategorySpec:
    """One category of a spec: a dataset (hub name or local path), subset, split and sample count."""

    name: str
    subset: str | None = None
    split: str = DEFAULT_SPLIT
    num_samples: int | None = None
    column: str | None = None  # explicit text/chat column; None = detect

    @property
    def label(self) -> str:
        """The category's name as written in a spec (``(split)`` shown unless it is ``train``)."""
        label = self.name
        if self.subset is not None:
            label += f"[{self.subset}]"
        if self.split != DEFAULT_SPLIT:
            label += f"({self.split})"
        return label


_FORBIDDEN = r"\[\]():,"
_PART_RE = re.compile(
    rf"^(?P<name>[^{_FORBIDDEN}]+)"
    rf"(?:\[(?P<subset>[^{_FORBIDDEN}]*)\])?"
    rf"(?:\((?P<split>[^{_FORBIDDEN}]*)\))?"
    r"(?::(?P<count>[^:,]*))?$"
)
_SPEC_FORMAT = "name[subset](split):N with [subset], (split) and :N optional"


def parse_dataset_spec(
    spec: str, default_split: str = DEFAULT_SPLIT, default_subset: str | None = None
) -> list[CategorySpec]:
    """Parse ``"name[subset](split):N,name2:M"`` into categories (upstream ``parse_composite_dataset_spec``).

    Names may contain ``/``, ``.``, ``-``, ``_`` and spaces but none of ``[]():,``; ``:`` is only the
    count separator. A missing ``:N`` gives ``num_samples=None`` (the caller's default applies); a missing
    ``(split)`` / ``[subset]`` gives ``default_split`` / ``default_subset``. The same entry may appear
    twice (as upstream allows: its documents are drawn again, continuing the random sequence).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CalibrationDataError("empty dataset spec; expected " + _SPEC_FORMAT)
    parts = spec.split(",")
    return [_parse_part(part.strip(), index, spec, (default_split, default_subset)) for index, part in enumerate(parts)]


def _parse_part(part: str, index: int, spec: str, defaults: tuple[str, str | None]) -> CategorySpec:
    where = f"dataset spec entry {index + 1} '{part}' (in '{spec}')"
    if not part:
        raise CalibrationDataError(f"dataset spec entry {index + 1} is empty (stray comma?) in '{spec}'")
    match = _PART_RE.match(part)
    if match is None:
        if part.count(":") > 1:
            raise CalibrationDataError(f"malformed {where}: ':' may appear only once, before the sample count")
        raise CalibrationDataError(f"malformed {where}: expected {_SPEC_FORMAT}")
    name = match["name"].strip()
    subset, split, count = match["subset"], match["split"], match["count"]
    if not name:
        raise CalibrationDataError(f"malformed {where}: the dataset name is empty")
    if subset is not None and not subset.strip():
        raise CalibrationDataError(f"malformed {where}: empty [subset]")
    if split is not None and not split.strip():
        raise CalibrationDataError(f"malformed {where}: empty (split)")
    num_samples = None
    if count is not None:
        if re.fullmatch(r"[0-9]+", count.strip()) is None:
            reason = f"sample count '{count}' is not a positive integer (':' only separates the sample count)"
            raise CalibrationDataError(f"malformed {where}: {reason}")
        num_samples = int(count)
        if num_samples <= 0:
            raise CalibrationDataError(f"malformed {where}: sample count must be > 0")
    return CategorySpec(
        name=name,
        subset=subset.strip() if subset is not None else defaults[1],
        split=split.strip() if split is not None else defaults[0],
        num_samples=num_samples,
    )


