"""The quality study's statistics and environment record, against hand and table values."""

from __future__ import annotations

import math

import pytest
import torch

from reap_lab.environment import cpu_record, describe, environment_record
from reap_lab.study_stats import (
    paired_comparison,
    per_model_means,
    prediction_interval,
    student_t_quantile,
    student_t_two_sided,
    t_interval,
)
from reap_lab.train import reproducible

# Two-sided 95 % (upper 97.5 %) and 90 % points of Student's t, from printed tables.
T_TABLE_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 7: 2.3646, 9: 2.2622, 10: 2.2281, 30: 2.0423}
T_TABLE_95 = {1: 6.3138, 4: 2.1318, 7: 1.8946, 20: 1.7247}


@pytest.mark.parametrize("df", sorted(T_TABLE_975))
def test_t_quantile_matches_tables(df):
    assert student_t_quantile(0.95, df) == pytest.approx(T_TABLE_975[df], abs=6e-5)


@pytest.mark.parametrize("df", sorted(T_TABLE_95))
def test_t_quantile_90_matches_tables(df):
    assert student_t_quantile(0.90, df) == pytest.approx(T_TABLE_95[df], abs=6e-5)


def test_t_cdf_edges():
    assert student_t_two_sided(0.0, 3) == 0.0
    assert student_t_two_sided(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 1/2
    assert student_t_two_sided(1e6, 6) == pytest.approx(1.0)
    # large df approaches the normal: P(|Z| <= 1.959964) = 0.95
    assert student_t_two_sided(1.959964, 4000) == pytest.approx(0.95, abs=2e-4)
    with pytest.raises(ValueError):
        student_t_two_sided(1.0, 0)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_t_interval_by_hand():
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)  # sample standard deviation of 1..4
    half = 3.1824 * sd / 2
    assert interval.mean == 2.5 and interval.n == 4 and interval.sd == pytest.approx(sd)
    assert (interval.low, interval.high) == pytest.approx((2.5 - half, 2.5 + half), abs=1e-4)
    assert interval.excludes_zero()
    assert not t_interval([-1.0, 1.0, 0.5]).excludes_zero()
    single = t_interval([7.0])
    assert (single.low, single.mean, single.high, single.n) == (7.0, 7.0, 7.0, 1) and not single.excludes_zero()
    with pytest.raises(ValueError):
        t_interval([])


def test_prediction_interval_by_hand():
    low, high = prediction_interval([10.0, 12.0, 14.0])  # mean 12, sd 2, t(2) = 4.3027
    half = 4.3027 * 2 * math.sqrt(1 + 1 / 3)
    assert (low, high) == pytest.approx((12 - half, 12 + half), abs=1e-3)
    with pytest.raises(ValueError):
        prediction_interval([1.0])


def runs_of(table):
    """``{(method, train_seed): [ppl per calibration seed]}`` -> study run records at ratio 0.5."""
    return [{"method": m, "train_seed": t, "seed": s, "compression_ratio": 0.5, "perplexity": p}
            for (m, t), values in table.items() for s, p in enumerate(values)]


def test_per_model_means_average_calibration_seeds():
    runs = runs_of({("a", 0): [2.0, 4.0], ("a", 1): [5.0, 5.0], ("b", 0): [1.0, 1.0]})
    runs.append({"method": "a", "train_seed": 0, "seed": 0, "compression_ratio": 0.25, "perplexity": 99.0})
    assert per_model_means(runs, "a", 0.5) == {0: 3.0, 1: 5.0}


def test_paired_comparison_sees_what_marginal_intervals_hide():
    # the models differ a lot from each other, but on every model "a" is about 5 % worse than "b"
    base = [4.0, 6.0, 9.0, 5.0, 7.5, 11.0]
    factors = [1.04, 1.06, 1.05, 1.045, 1.055, 1.05]
    table = {("b", t): [p, p] for t, p in enumerate(base)}
    table.update({("a", t): [p * f, p * f] for t, (p, f) in enumerate(zip(base, factors))})
    runs = runs_of(table)
    a, b = t_interval(list(per_model_means(runs, "a", 0.5).values())), t_interval(base)
    assert a.low < b.high  # the marginal intervals overlap...
    comparison = paired_comparison(runs, "a", "b", 0.5)
    logs = [math.log(f) for f in factors]
    assert comparison.log_ratio.mean == pytest.approx(sum(logs) / 6)
    assert comparison.significant and comparison.a_better == 0 and comparison.models == 6  # ...the paired one does not
    mean, low, high = comparison.percent()
    assert mean == pytest.approx(100 * (math.exp(sum(logs) / 6) - 1)) and 4 < low < mean < high < 6
    assert comparison.as_dict()["significant"] is True
    # reversed, the interval mirrors
    reverse = paired_comparison(runs, "b", "a", 0.5)
    assert reverse.log_ratio.mean == pytest.approx(-comparison.log_ratio.mean) and reverse.a_better == 6


def test_paired_comparison_tie_and_missing_models():
    table = {("a", 0): [2.0], ("a", 1): [3.0], ("a", 2): [4.0], ("b", 0): [2.2], ("b", 1): [2.8], ("b", 3): [1.0]}
    comparison = paired_comparison(runs_of(table), "a", "b", 0.5)
    assert comparison.models == 2 and not comparison.significant  # models 0 and 1 only; signs disagree
    with pytest.raises(ValueError, match="no trained model"):
        paired_comparison(runs_of({("a", 0): [1.0], ("b", 1): [1.0]}), "a", "b", 0.5)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""


def test_cpu_record_and_description():
    record = cpu_record(CPUINFO)
    assert record == {"model_name": "Intel(R) Xeon(R) Platinum 8480+",
                      "flags": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}
    assert cpu_record("")["flags"] == []
    env = environment_record()
    assert env["versions"]["torch"] and env["torch_threads"] == torch.get_num_threads()
    line = describe({**env, "cpu": record})
    assert "Platinum 8480+" in line and "amx_bf16" in line and env["versions"]["torch"] in line


def test_reproducible_sets_and_restores():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with reproducible(seed=5, threads=1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        first = torch.rand(3)
    with reproducible(seed=5, threads=1):
        assert torch.equal(torch.rand(3), first)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == deterministic
    with pytest.raises(ValueError):
        with reproducible(seed=0, threads=0):
            pass
