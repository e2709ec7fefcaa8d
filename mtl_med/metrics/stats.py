"""Statistics for comparing runs over seeds: the sample spread, a mean with its confidence interval,
and paired tests (t-test and Wilcoxon signed-rank) with their p-values, confidence intervals and the
number of seeds. Every "A beats B" of the reports goes through :func:`paired_comparison`.

The standard deviation is the sample one (``ddof=1``, the spread of the seeds as an estimate of the
spread of the method); one run has no spread (``nan``), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["sample_std", "MeanCI", "mean_ci", "PairedTest", "paired_comparison", "seeds_needed", "format_mean_std", "format_p"]


def _values(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"values must be finite, got {a.tolist()}")
    return a


def sample_std(x: Sequence[float]) -> float:
    """Sample standard deviation (``ddof=1``); ``nan`` for fewer than two values."""
    a = _values(x)
    return float(a.std(ddof=1)) if a.size > 1 else math.nan


@dataclass(frozen=True)
class MeanCI:
    """A mean over ``n`` seeds, its sample std and the two-sided ``level`` t confidence interval."""

    mean: float
    std: float
    n: int
    low: float
    high: float
    level: float

    def as_dict(self) -> dict:
        return asdict(self)


def mean_ci(x: Sequence[float], level: float = 0.95) -> MeanCI:
    """Mean of ``x`` with the Student-t confidence interval ``mean ± t_{(1+level)/2, n-1} s / sqrt(n)``
    (``nan`` bounds for fewer than two values)."""
    from scipy import stats

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = _values(x)
    if a.size == 0:
        raise ValueError("mean_ci needs at least one value")
    m, s = float(a.mean()), sample_std(a)
    if a.size < 2:
        return MeanCI(m, s, 1, math.nan, math.nan, level)
    half = float(stats.t.ppf((1 + level) / 2, a.size - 1)) * s / math.sqrt(a.size)
    return MeanCI(m, s, int(a.size), m - half, m + half, level)


@dataclass(frozen=True)
class PairedTest:
    """``a - b`` paired by seed: the mean difference with its t confidence interval, the paired
    t-test's and the Wilcoxon signed-rank test's two-sided p-values, and the seeds won, tied and lost
    by ``a``."""

    n: int
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    level: float
    t_p: float
    wilcoxon_p: float
    wins: int
    ties: int
    losses: int

    def as_dict(self) -> dict:
        return asdict(self)

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the paired t-test rejects "no difference" at ``alpha`` (``False`` when it cannot be run)."""
        return bool(np.isfinite(self.t_p) and self.t_p < alpha)

    def summary(self, unit: str = "", digits: int = 3) -> str:
        """One line: ``+0.024 (95 % CI -0.010 to +0.058), 2 of 3 seeds, paired t p = 0.21, Wilcoxon p = 0.50, n = 3``."""
        f = f"{{:+.{digits}f}}"
        ci = (f"{int(round(100 * self.level))} % CI {f.format(self.ci_low)} to {f.format(self.ci_high)}"
              if np.isfinite(self.ci_low) else "no CI")
        return (f"{f.format(self.mean_diff)}{unit} ({ci}), {self.wins} won, {self.ties} tied, {self.losses} lost; "
                f"paired t p = {format_p(self.t_p)}, Wilcoxon p = {format_p(self.wilcoxon_p)}; n = {self.n} seeds")


def format_p(p: float) -> str:
    """A p-value as the tables print it: two significant digits below 0.01, two decimals above, ``n/a`` where the
    test could not be run."""
    if not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def paired_comparison(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedTest:
    """Compare ``a`` with ``b``, paired by position (the same seed): two-sided paired t-test
    (``scipy.stats.ttest_rel``) and Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, exact for
    small n; zero differences dropped), with the t confidence interval of the mean difference.
    p-values are ``nan`` where a test is undefined (fewer than two pairs, all differences equal for the
    t-test, all zero for Wilcoxon)."""
    from scipy import stats

    x, y = _values(a), _values(b)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired_comparison needs at least one pair")
    d = x - y
    ci = mean_ci(d, level)
    t_p = w_p = math.nan
    if d.size > 1 and np.ptp(d) > 0:
        t_p = float(stats.ttest_rel(x, y).pvalue)
    elif d.size > 1 and d[0] != 0:  # every difference the same non-zero value: no spread, p -> 0
        t_p = 0.0
    if np.any(d != 0):
        w_p = float(stats.wilcoxon(d[d != 0]).pvalue)
    return PairedTest(int(d.size), ci.mean, ci.std, ci.low, ci.high, level, t_p, w_p,
                      int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum()))


def seeds_needed(effect: float, std: float, alpha: float = 0.05, power: float | None = None) -> int:
    """Seeds a paired comparison needs for a mean difference ``effect`` with per-seed spread ``std``.

    ``power=None``: the smallest n at which an observed mean difference of exactly ``effect`` gives a
    two-sided paired t-test p < ``alpha`` (``t_{1-alpha/2, n-1} s / sqrt(n) < effect``). With a
    ``power``, the usual normal approximation ``n = ((z_{1-alpha/2} + z_power) s / effect)^2`` (rounded up).
    """
    from scipy import stats

    if effect <= 0 or std <= 0:
        raise ValueError(f"effect and std must be positive, got {effect}, {std}")
    if power is not None:
        z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
        return int(math.ceil((z * std / effect) ** 2))
    n = 2
    while stats.t.ppf(1 - alpha / 2, n - 1) * std / math.sqrt(n) >= effect:
        n += 1
        if n > 10**7:  # pragma: no cover - absurd inputs
            raise ValueError("more than 10^7 seeds")
    return n


def format_mean_std(x: Sequence[float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """``mean ± sample std`` of ``x`` times ``scale`` (``mean`` alone for one value)."""
    a = _values(x) * scale
    s = sample_std(a)
    f = f"{{:.{digits}f}}"
    return f"{f.format(a.mean())}{unit}" if not np.isfinite(s) else f"{f.format(a.mean())} ± {f.format(s)}{unit}"
