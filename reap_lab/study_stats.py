"""Intervals for the quality study: Student-t intervals over independently trained models.

The unit of replication is the trained model: calibration seeds of one model are averaged first
(they share the model's weights, so they are not independent evidence about the method). Two methods
are compared *paired*, model by model, on log perplexity: the per-model differences remove the large
model-to-model variation that both methods share, so a paired interval is far narrower than two
overlapping marginal intervals would suggest.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` >= 1 (closed form, Abramowitz & Stegun 26.7.3-4)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df == 1:
        return 2 * theta / math.pi
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for k in range(2, df, 2):
            term *= (k - 1) / k * cos2
            total += term
        return sin * total
    # odd df: 2/pi * (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    term, total = 1.0, 1.0
    for k in range(3, df - 1, 2):
        term *= (k - 1) / k * cos2
        total += term
    return 2 / math.pi * (theta + sin * math.cos(theta) * total)


def student_t_quantile(level: float, df: int) -> float:
    """The ``t`` with P(|T| <= t) = ``level`` (e.g. 0.95 -> the 97.5 % quantile), by bisection."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while student_t_two_sided(high, df) < level:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_two_sided(middle, df) < level else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided Student-t interval (``low`` = ``high`` = mean when n = 1)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "sd": self.sd}


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and ``level`` t-interval of ``values`` (independent draws)."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, mean, mean, 1, 0.0)
    sd = statistics.stdev(values)
    half = student_t_quantile(level, len(values) - 1) * sd / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), sd)


def prediction_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Where one more independent draw should land: mean +- t * sd * sqrt(1 + 1/n) (needs n >= 2)."""
    if len(values) < 2:
        raise ValueError("a prediction interval needs at least two values")
    mean, sd, n = statistics.fmean(values), statistics.stdev(values), len(values)
    half = student_t_quantile(level, n - 1) * sd * math.sqrt(1 + 1 / n)
    return mean - half, mean + half


def per_model_means(runs: Sequence[Mapping], method: str, ratio: float, key: str = "perplexity") -> dict[int, float]:
    """``{train seed: mean of key over that model's calibration seeds}`` for one method and ratio."""
    grouped: dict[int, list[float]] = {}
    for run in runs:
        if run["method"] == method and math.isclose(run["compression_ratio"], ratio):
            grouped.setdefault(int(run["train_seed"]), []).append(float(run[key]))
    return {seed: statistics.fmean(values) for seed, values in sorted(grouped.items())}


@dataclass(frozen=True)
class PairedComparison:
    """Method ``a`` against ``b`` at one ratio: per-model log-perplexity differences and their interval."""

    a: str
    b: str
    ratio: float
    log_ratio: Interval  # mean over models of log(ppl_a / ppl_b); < 0: a is better
    a_better: int  # models on which a had the lower perplexity
    models: int

    @property
    def significant(self) -> bool:
        return self.log_ratio.excludes_zero()

    def percent(self) -> tuple[float, float, float]:
        """(mean, low, high) of ppl_a / ppl_b - 1 in percent."""
        return tuple(100 * math.expm1(v) for v in (self.log_ratio.mean, self.log_ratio.low, self.log_ratio.high))

    def as_dict(self) -> dict:
        mean, low, high = self.percent()
        return {"a": self.a, "b": self.b, "compression_ratio": self.ratio, "log_ratio": self.log_ratio.as_dict(),
                "percent": {"mean": mean, "low": low, "high": high}, "a_better_on": self.a_better,
                "models": self.models, "significant": self.significant}


def paired_comparison(runs: Sequence[Mapping], a: str, b: str, ratio: float, level: float = 0.95) -> PairedComparison:
    """Compare ``a`` with ``b`` on the models that have both (per-model means over calibration seeds)."""
    first, second = per_model_means(runs, a, ratio), per_model_means(runs, b, ratio)
    common = sorted(set(first) & set(second))
    if not common:
        raise ValueError(f"no trained model has runs of both {a!r} and {b!r} at {ratio:g}")
    differences = [math.log(first[s]) - math.log(second[s]) for s in common]
    return PairedComparison(a, b, ratio, t_interval(differences, level), sum(d < 0 for d in differences), len(common))
