"""Confidence intervals and exact tests that stay valid with 3-10 seeds, as pure functions.

Every interval function returns an :class:`Interval` ``(estimate, low, high, method)``. The mean and difference
intervals are vectorised: ``x`` may be ``[..., n]`` (the last axis holds the units), and then each field is an array
over the leading axes, which is how the coverage simulation in the tests runs thousands of samples at once.

* :func:`t_mean`: one-sample Student t interval of a mean (Student 1908).
* :func:`welch_diff`: Welch interval of a difference of two independent means, Welch-Satterthwaite df (Welch 1947).
* :func:`paired_t`: t interval of the mean of paired differences (one difference per unit).
* :func:`fieller_ratio`: Fieller interval of a ratio of two independent means, Welch-type df (Fieller 1954).
* :func:`wilson` / :func:`clopper_pearson`: score / exact interval of a rate (Wilson 1927; Clopper & Pearson 1934).
* :func:`newcombe_diff`: hybrid-score interval of a difference of two independent rates (Newcombe 1998, method 10).
* :func:`fisher_one_sided`: Fisher's exact test of a 2x2 table in the claim's direction (scipy.stats.fisher_exact).
* :func:`bootstrap_mean`: the percentile bootstrap, kept only for ``n >= BOOTSTRAP_MIN_N`` units: with 3-5 seeds it
  covers ~76-83 % instead of 95 % and has zero width when the seeds agree (see ``tests/reproduce/test_stats.py``).

Units with ``nan`` are dropped by the scalar entry points of :mod:`.verdicts`, not here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats as sps

#: The percentile bootstrap is refused below this many units (its coverage approaches the nominal level only for
#: large n; Efron & Tibshirani 1993, ch. 13 and 22, and the coverage test here at n = 3 and 5).
BOOTSTRAP_MIN_N = 30

T_MEAN = "one-sample t interval"
WELCH = "Welch t interval (Welch-Satterthwaite df)"
PAIRED = "paired t interval over units"
FIELLER = "Fieller interval of a ratio (Welch-type df)"
WILSON = "Wilson score interval"
CLOPPER = "Clopper-Pearson exact interval"
NEWCOMBE = "Newcombe hybrid-score interval"
BOOTSTRAP = "percentile bootstrap"


class Interval(NamedTuple):
    """A point estimate with its two-sided interval and the name of the method."""

    estimate: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    method: str


def _z(confidence: float) -> float:
    return float(sps.norm.ppf(0.5 + confidence / 2))


def _t(df: float | np.ndarray, confidence: float) -> float | np.ndarray:
    return sps.t.ppf(0.5 + confidence / 2, df)


def t_mean(x: np.ndarray | list[float], confidence: float = 0.95) -> Interval:
    """Student t interval of the mean over the last axis (``n >= 2``; ``n = 1`` gives ``nan`` limits).

    Example::

        >>> r = t_mean([1.0, 2.0, 3.0])
        >>> round(float(r.low), 4), round(float(r.high), 4)
        (-0.4841, 4.4841)
    """
    a = np.asarray(x, dtype=float)
    n = a.shape[-1]
    m = a.mean(-1)
    if n < 2:
        nan = np.full_like(m, np.nan)
        return Interval(m, nan, nan, T_MEAN)
    half = _t(n - 1, confidence) * a.std(-1, ddof=1) / math.sqrt(n)
    return Interval(m, m - half, m + half, T_MEAN)


def welch_diff(a: np.ndarray | list[float], b: np.ndarray | list[float], confidence: float = 0.95) -> Interval:
    """Welch interval of ``mean(a) - mean(b)`` over the last axes, independent samples of sizes >= 2.

    The df is Welch-Satterthwaite's; when both variances are 0 the interval is the point (nothing varies).

    Example::

        >>> r = welch_diff([1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 1.0])
        >>> round(float(r.estimate), 4), round(float(r.low), 4), round(float(r.high), 4)
        (2.0, 0.051, 3.949)
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = x.shape[-1], y.shape[-1]
    d = x.mean(-1) - y.mean(-1)
    if na < 2 or nb < 2:
        nan = np.full_like(d, np.nan)
        return Interval(d, nan, nan, WELCH)
    va, vb = x.var(-1, ddof=1) / na, y.var(-1, ddof=1) / nb
    se2 = va + vb
    with np.errstate(invalid="ignore", divide="ignore"):
        df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    df = np.where(se2 > 0, df, na + nb - 2)
    half = _t(df, confidence) * np.sqrt(se2)
    return Interval(d, d - half, d + half, WELCH)


def paired_t(a: np.ndarray | list[float], b: np.ndarray | list[float], confidence: float = 0.95) -> Interval:
    """Student t interval of the mean of ``a - b``, paired along the last axis (one pair per unit)."""
    r = t_mean(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), confidence)
    return Interval(r.estimate, r.low, r.high, PAIRED)


def fieller_ratio(a: list[float] | np.ndarray, b: list[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Fieller interval of ``mean(a) / mean(b)`` for independent samples.

    The limits are the roots of ``(m_a - r m_b)^2 = t^2 (s_a^2/n_a + r^2 s_b^2/n_b)`` with the Welch-type df of
    ``a - r b`` at the point ratio. When ``mean(b)`` is not significantly non-zero the set is unbounded: the limits
    are ``-inf, +inf``.

    Example::

        >>> r = fieller_ratio([2.0, 2.2, 1.8], [1.0, 1.1, 0.9])
        >>> round(r.estimate, 4), round(r.low, 4), round(r.high, 4)
        (2.0, 1.5904, 2.5151)
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = x.size, y.size
    ma, mb = float(x.mean()), float(y.mean())
    ratio = ma / mb if mb != 0 else math.nan
    if na < 2 or nb < 2 or not math.isfinite(ratio):
        return Interval(ratio, math.nan, math.nan, FIELLER)
    sa, sb = float(x.var(ddof=1)) / na, float(y.var(ddof=1)) / nb
    num = sa + ratio**2 * sb
    den = sa**2 / (na - 1) + ratio**4 * sb**2 / (nb - 1)
    df = num**2 / den if den > 0 else na + nb - 2
    t2 = float(_t(df, confidence)) ** 2
    qa, qb, qc = mb**2 - t2 * sb, -2 * ma * mb, ma**2 - t2 * sa
    disc = qb**2 - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return Interval(ratio, -math.inf, math.inf, FIELLER)
    root = math.sqrt(disc)
    return Interval(ratio, (-qb - root) / (2 * qa), (-qb + root) / (2 * qa), FIELLER)


def wilson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of the rate ``k / n`` (``nan`` when ``n == 0``).

    Example::

        >>> [round(v, 4) for v in wilson(3, 10)[:3]]
        [0.3, 0.1078, 0.6032]
    """
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, WILSON)
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), WILSON)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Exact (Clopper-Pearson) interval of the rate ``k / n``, the same as ``scipy.stats.binomtest``'s."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, CLOPPER)
    ci = sps.binomtest(k, n).proportion_ci(confidence, method="exact")
    return Interval(k / n, float(ci.low), float(ci.high), CLOPPER)


def newcombe_diff(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> Interval:
    """Newcombe's hybrid-score interval of ``k1/n1 - k2/n2`` (independent rates), from the two Wilson intervals.

    ``low = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)``, ``high = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)`` (Newcombe 1998,
    method 10).

    Example (Newcombe 1998, Table II, example (b): 9/10 vs 3/10)::

        >>> [round(v, 4) for v in newcombe_diff(9, 10, 3, 10)[:3]]
        [0.6, 0.1705, 0.809]
    """
    if n1 == 0 or n2 == 0:
        return Interval(math.nan, math.nan, math.nan, NEWCOMBE)
    p1, l1, u1, _ = wilson(k1, n1, confidence)
    p2, l2, u2, _ = wilson(k2, n2, confidence)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Interval(d, low, high, NEWCOMBE)


def fisher_one_sided(k1: int, n1: int, k2: int, n2: int, greater: bool = True) -> float:
    """Fisher's exact p-value that the rate ``k1/n1`` is greater (``greater``) or less than ``k2/n2``.

    Example::

        >>> round(fisher_one_sided(3, 12, 0, 12), 3), round(fisher_one_sided(3, 6, 0, 6), 3)
        (0.109, 0.091)
    """
    if n1 == 0 or n2 == 0:
        return math.nan
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    return float(sps.fisher_exact(table, alternative="greater" if greater else "less").pvalue)


def bootstrap_mean(
    x: np.ndarray | list[float],
    b: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
    allow_small: bool = False,
) -> Interval:
    """Percentile-bootstrap interval of the mean over the last axis; refused below ``BOOTSTRAP_MIN_N`` units.

    ``allow_small`` exists only so the tests can show how badly it covers at n = 3 (never use it for a verdict).

    Raises:
        ValueError: when ``n < BOOTSTRAP_MIN_N`` and ``allow_small`` is false.
    """
    a = np.asarray(x, dtype=float)
    n = a.shape[-1]
    if n < BOOTSTRAP_MIN_N and not allow_small:
        raise ValueError(
            f"percentile bootstrap needs n >= {BOOTSTRAP_MIN_N} units, got n = {n}; use t_mean / welch_diff "
            "(means) or wilson / newcombe_diff (rates)"
        )
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(b, n))
    means = a[..., idx].mean(-1)  # [..., b]
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=-1, method="inverted_cdf")
    return Interval(a.mean(-1), lo, hi, f"{BOOTSTRAP} (B = {b}, n >= {BOOTSTRAP_MIN_N})")
