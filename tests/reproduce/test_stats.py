"""Small-sample intervals against scipy and textbook values, and their coverage by simulation at n = 3-5."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pdelightning_reproduce import stats as S

REPS = 4000  # simulated samples per coverage check: the Monte-Carlo SE of a 95 % coverage is ~0.35 %


def test_t_and_welch_and_paired_match_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 5), rng.normal(0.0, 3.0, 4)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    ours = S.welch_diff(a, b)
    assert (ours.low, ours.high) == pytest.approx((ref.low, ref.high), rel=1e-10)
    ref1 = stats.ttest_1samp(a, 0.0).confidence_interval(0.95)
    assert (S.t_mean(a).low, S.t_mean(a).high) == pytest.approx((ref1.low, ref1.high), rel=1e-10)
    c = a + rng.normal(0, 0.1, 5)
    refp = stats.ttest_rel(c, a).confidence_interval(0.95)
    p = S.paired_t(c, a)
    assert (p.low, p.high) == pytest.approx((refp.low, refp.high), rel=1e-10) and p.method == S.PAIRED


def test_rates_match_scipy_and_newcombe_1998() -> None:
    for k, n in ((0, 5), (3, 12), (7, 7)):
        w = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert S.wilson(k, n)[1:3] == pytest.approx((w.low, w.high), abs=1e-12)
        e = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert S.clopper_pearson(k, n)[1:3] == pytest.approx((e.low, e.high), abs=1e-12)
    # Newcombe (1998), Stat. Med. 17:873, Table II, method 10 (hybrid score without continuity correction)
    assert S.newcombe_diff(56, 70, 48, 80)[1:3] == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert S.newcombe_diff(9, 10, 3, 10)[1:3] == pytest.approx((0.1705, 0.8090), abs=1e-4)
    assert S.newcombe_diff(5, 56, 0, 29)[1:3] == pytest.approx((-0.0381, 0.1926), abs=1e-4)
    assert S.newcombe_diff(0, 10, 0, 20)[1:3] == pytest.approx((-0.1611, 0.2775), abs=1e-4)
    assert S.newcombe_diff(10, 10, 0, 20)[1:3] == pytest.approx((0.6791, 1.0), abs=1e-4)
    # the two tables: one-sided Fisher p = 0.109 (3/12 vs 0/12) and 0.091 (3/6 vs 0/6)
    assert S.fisher_one_sided(3, 12, 0, 12) == pytest.approx(0.1087, abs=1e-4)
    assert S.fisher_one_sided(3, 6, 0, 6) == pytest.approx(0.0909, abs=1e-4)
    assert S.fisher_one_sided(0, 6, 3, 6, greater=False) == pytest.approx(0.0909, abs=1e-4)


def test_fieller_limits_solve_its_equation() -> None:
    a, b = np.array([2.0, 2.4, 1.7, 2.2]), np.array([1.0, 1.3, 0.8])
    r = S.fieller_ratio(a, b)
    sa, sb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    q = r.estimate  # the df of a - r b is taken at the point ratio
    df = (sa + q**2 * sb) ** 2 / (sa**2 / (a.size - 1) + q**4 * sb**2 / (b.size - 1))
    for lim in (r.low, r.high):  # at each limit the t statistic of a - r b sits on its critical value
        t = (a.mean() - lim * b.mean()) / math.sqrt(sa + lim**2 * sb)
        assert abs(t) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
    assert r.low < r.estimate < r.high
    wide = S.fieller_ratio([1.0, 2.0, 3.0], [0.1, -0.1, 0.05])  # denominator not distinguishable from 0
    assert (wide.low, wide.high) == (-math.inf, math.inf)


def _coverage(lo: np.ndarray, hi: np.ndarray, truth: float) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
def test_coverage_of_the_mean_and_difference_intervals_at_n5(dist: str) -> None:
    """>= 93 % coverage of nominal 95 % at n = 5 on normal and on skewed lognormal data.

    Lognormal sigma 0.35 (skewness 1.2) for the one-sample t; sigma 0.5 (skewness 1.75) for the differences. Measured
    limit, not asserted: at sigma 0.5 the one-sample t covers ~91.5 %, at sigma 1 ~82 % (the Welch difference of two
    equally skewed samples stays at ~96-97 %, the skews cancel); the percentile bootstrap is far below either.
    """
    rng = np.random.default_rng(20261206)
    if dist == "normal":
        a, b = rng.normal(0.3, 1.0, (REPS, 5)), rng.normal(0.0, 2.0, (REPS, 5))
        one, mone = a, 0.3
        ma, mb = 0.3, 0.0
    else:
        one, mone = rng.lognormal(0.0, 0.35, (REPS, 5)), math.exp(0.35**2 / 2)
        a, b = rng.lognormal(0.0, 0.5, (REPS, 5)), rng.lognormal(0.2, 0.5, (REPS, 5))
        ma, mb = math.exp(0.125), math.exp(0.325)
    t = S.t_mean(one)
    assert _coverage(t.low, t.high, mone) >= 0.93
    w = S.welch_diff(a, b)
    assert _coverage(w.low, w.high, ma - mb) >= 0.93
    # paired units: both members share a per-unit offset
    off = rng.normal(0.0, 1.0, (REPS, 5))
    p = S.paired_t(a + off, b + off)
    assert _coverage(p.low, p.high, ma - mb) >= 0.93


def test_the_old_percentile_bootstrap_covers_far_less_at_small_n() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0.0, 1.0, (REPS, 3))
    boot = S.bootstrap_mean(x, b=400, seed=1, allow_small=True)
    t = S.t_mean(x)
    cov_boot, cov_t = _coverage(boot.low, boot.high, 0.0), _coverage(t.low, t.high, 0.0)
    assert cov_boot < 0.85 and cov_t >= 0.93  # ~76 % against ~95 %
    x5 = rng.lognormal(0.0, 0.5, (REPS, 5))
    boot5 = S.bootstrap_mean(x5, b=400, seed=2, allow_small=True)
    assert _coverage(boot5.low, boot5.high, math.exp(0.125)) < 0.90
    with pytest.raises(ValueError, match="n >= 30"):
        S.bootstrap_mean([1.0, 2.0, 3.0])


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_coverage_of_rate_intervals(p: float) -> None:
    """Exact coverage (summed over every outcome) of Wilson and Clopper-Pearson at n = 12, Newcombe at 12 vs 12."""
    n = 12
    k = np.arange(n + 1)
    pk = stats.binom.pmf(k, n, p)
    for fn, floor in ((S.wilson, 0.90), (S.clopper_pearson, 0.95)):
        ci = [fn(int(i), n) for i in k]
        cov = sum(w for w, c in zip(pk, ci, strict=True) if c.low <= p <= c.high)
        assert cov >= floor
    q = max(p - 0.1, 0.0)
    pq = stats.binom.pmf(k, n, q)
    cov = 0.0
    for i in k:
        for j in k:
            d = S.newcombe_diff(int(i), n, int(j), n)
            cov += pk[i] * pq[j] * (d.low <= p - q <= d.high)
    assert cov >= 0.93
