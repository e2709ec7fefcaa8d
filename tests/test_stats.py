"""mtl_med.metrics.stats against values worked by hand."""

import math

import numpy as np
import pytest

from mtl_med.metrics import format_mean_std, mean_ci, paired_comparison, sample_std, seeds_needed


def test_sample_std_is_ddof_1():
    assert sample_std([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3))
    assert sample_std([1, 2, 3, 4]) != pytest.approx(np.std([1, 2, 3, 4]))  # not the population std
    assert math.isnan(sample_std([3.0]))


def test_mean_ci_student_t():
    ci = mean_ci([1, 2, 3])
    # t_{0.975, 2} = 4.302653 ; s = 1 ; half width 4.302653 / sqrt(3)
    assert (ci.mean, ci.std, ci.n) == (2.0, 1.0, 3)
    assert ci.low == pytest.approx(2 - 2.484138, abs=1e-6) and ci.high == pytest.approx(2 + 2.484138, abs=1e-6)
    one = mean_ci([5.0])
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.std)


def test_paired_comparison_known_values():
    r = paired_comparison([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])
    # d = 1 2 2 3 4: mean 2.4, s 1.140175, t = 4.7068 on 4 df -> p 0.009262; Wilcoxon exact, all 5 positive: 2 / 2^5
    assert r.n == 5 and r.mean_diff == pytest.approx(2.4) and r.std_diff == pytest.approx(1.140175, abs=1e-6)
    assert r.t_p == pytest.approx(0.009262, abs=1e-5)
    assert r.wilcoxon_p == pytest.approx(0.0625)
    assert r.ci_low == pytest.approx(2.4 - 2.776445 * 1.140175 / math.sqrt(5), abs=1e-5)
    assert (r.wins, r.ties, r.losses) == (5, 0, 0)
    assert r.significant() and "n = 5 seeds" in r.summary()


def test_paired_comparison_is_paired_not_two_sample():
    a = np.array([10.0, 20.0, 30.0])
    r = paired_comparison(a + 0.1 + np.array([0, 0.01, -0.01]), a)
    assert r.t_p < 0.01  # the large between-seed spread cancels in the pairs


def test_paired_comparison_degenerate_and_errors():
    r = paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert r.mean_diff == 0 and math.isnan(r.t_p) and math.isnan(r.wilcoxon_p) and not r.significant()
    assert r.ties == 2
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1, float("nan")], [1, 2])


def test_seeds_needed():
    # a 0.6-point gain at a paired spread of 1.4 points: (1.96 * 1.4 / 0.6)^2 = 20.9 -> 21 (normal approximation),
    # 24 with the t quantile; 0.2 points: 188.2 -> 189, 191 with t
    assert seeds_needed(0.6, 1.4, power=0.5) == 21
    assert seeds_needed(0.2, 1.4, power=0.5) == 189
    assert seeds_needed(0.6, 1.4) == 24
    assert seeds_needed(0.2, 1.4) == 191


def test_format_mean_std():
    assert format_mean_std([0.99, 0.98, 0.97], scale=100, unit=" %") == "98.00 ± 1.00 %"
    assert format_mean_std([0.5]) == "0.50"
