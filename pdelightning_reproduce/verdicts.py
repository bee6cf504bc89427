"""Intervals over seeds and the verdict logic of :mod:`pdelightning_reproduce.rules`, as pure functions.

* :class:`Estimate`: a value with its 95 % interval and the number of seeds (or pair units) behind it.
* Bootstrap estimators: :func:`bootstrap_mean` (a setting's seed mean), :func:`bootstrap_groups` (any statistic of
  independently resampled groups, e.g. a difference or ratio of two settings' means), :func:`cluster_bootstrap`
  (rows resampled as clusters, e.g. seeds carrying all their grid cells) and :func:`seed_range` (``[min, max]``).
  All are percentile bootstraps (Efron & Tibshirani 1993, §13.3) with ``B`` resamples from
  ``numpy.random.default_rng(seed)``; quantiles by the inverted empirical CDF, so an infinite resample value (a
  "nowhere on the grid" answer) stays infinite instead of turning the interval into ``nan``.
* :func:`judge` and :func:`evaluate`: a leaf is met / failed / unsure from its interval, and a rule's tree combines
  them in three-valued logic into a :class:`Verdict`. Missing data never fails a rule: a decision that hinges on it
  is ``not comparable`` (and ``inconclusive`` is kept for intervals that straddle a threshold).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np

from pdelightning_reproduce.rules import (
    BOOTSTRAP_B,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    AllOf,
    AtLeast,
    Criterion,
    Node,
    Rule,
)

Verdict = Literal["holds", "does not hold", "inconclusive", "not comparable"]
HOLDS: Verdict = "holds"
FAILS: Verdict = "does not hold"
INCONCLUSIVE: Verdict = "inconclusive"
NOT_COMPARABLE: Verdict = "not comparable"
VERDICTS: tuple[Verdict, ...] = (HOLDS, FAILS, INCONCLUSIVE, NOT_COMPARABLE)


@dataclass(frozen=True)
class Estimate:
    """A point value with its interval ``[lo, hi]`` from ``n`` independent units (seeds or pair units).

    ``n == 0`` means missing (``value``, ``lo``, ``hi`` are ``nan``).
    """

    value: float
    lo: float
    hi: float
    n: int
    method: str = "bootstrap"

    @property
    def missing(self) -> bool:
        """Whether there was no data."""
        return self.n == 0

    def __str__(self) -> str:
        if self.missing:
            return "—"
        if self.n == 1:
            return f"{fmt(self.value)} (n=1, no interval)"
        return f"{fmt(self.value)} [{fmt(self.lo)}, {fmt(self.hi)}] (n={self.n})"


MISSING = Estimate(math.nan, math.nan, math.nan, 0, "missing")


def fmt(x: float | None) -> str:
    """Four decimals for ordinary magnitudes, three significant digits otherwise; ``—`` for ``None``."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4f}"
    return f"{x:.3g}"


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[~np.isnan(v)]


def _interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha], method="inverted_cdf")
    return float(lo), float(hi)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    b: int = BOOTSTRAP_B,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Percentile-bootstrap interval of the mean of ``values`` (``nan`` entries dropped).

    One value gives a degenerate interval at that value with ``n = 1``; none gives :data:`MISSING`.

    Example::

        >>> e = bootstrap_mean([1.0, 1.0, 1.0])
        >>> (e.value, e.lo, e.hi, e.n)
        (1.0, 1.0, 1.0, 3)
    """
    v = _clean(values)
    if v.size == 0:
        return MISSING
    if v.size == 1:
        return Estimate(float(v[0]), float(v[0]), float(v[0]), 1)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(b, v.size))].mean(axis=1)
    lo, hi = _interval(means, confidence)
    return Estimate(float(v.mean()), lo, hi, int(v.size))


def bootstrap_groups(
    groups: Sequence[Sequence[float] | np.ndarray],
    statistic: Callable[[list[np.ndarray]], float],
    b: int = BOOTSTRAP_B,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    drop_nan: bool = True,
    vectorized: bool = False,
) -> Estimate:
    """Percentile-bootstrap interval of ``statistic(groups)`` with every group resampled independently.

    ``groups`` are arrays whose first axis is the unit (seed); rows may be vectors (e.g. a curve per seed).
    ``n`` is the smallest group size. A missing group gives :data:`MISSING`. With ``vectorized`` the statistic is
    called once on all resamples, each group as ``[B, n, ...]``, and must return ``[B]`` (reducing over axis 1);
    the point value is then ``statistic`` of the groups with a leading axis of 1.

    Example::

        >>> e = bootstrap_groups([[2.0, 2.0], [0.5, 0.5]], lambda g: g[0].mean() - g[1].mean())
        >>> (e.value, e.lo, e.hi, e.n)
        (1.5, 1.5, 1.5, 2)
    """
    arrays = []
    for g in groups:
        a = np.asarray(g, dtype=float)
        if a.ndim == 1 and drop_nan:
            a = a[~np.isnan(a)]
        arrays.append(a)
    if any(a.shape[0] == 0 for a in arrays):
        return MISSING
    n = min(a.shape[0] for a in arrays)
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, a.shape[0], size=(b, a.shape[0])) for a in arrays]
    if vectorized:
        value = float(np.asarray(statistic([a[None] for a in arrays])).reshape(-1)[0])
        stats = np.asarray(statistic([a[ix] for a, ix in zip(arrays, idx, strict=True)]), dtype=float)
    else:
        value = float(statistic(arrays))
        stats = np.array([statistic([a[ix[k]] for a, ix in zip(arrays, idx, strict=True)]) for k in range(b)])
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return Estimate(value, math.nan, math.nan, n)
    lo, hi = _interval(stats, confidence)
    return Estimate(value, lo, hi, n)


def difference_of_means(a: Sequence[float], b_values: Sequence[float], **kw: float) -> Estimate:
    """``mean(a) - mean(b)``, the two settings' seeds resampled independently (see :func:`bootstrap_groups`)."""
    return bootstrap_groups([a, b_values], lambda g: g[0].mean(1) - g[1].mean(1), vectorized=True, **kw)  # type: ignore[arg-type]


def log10_ratio_of_means(a: Sequence[float], b_values: Sequence[float], **kw: float) -> Estimate:
    """``log10(mean(a) / mean(b))`` for positive quantities, seeds resampled independently."""
    return bootstrap_groups(
        [a, b_values],
        lambda g: float(np.log10(g[0].mean() / g[1].mean())),
        **kw,  # type: ignore[arg-type]
    )


def ratio_of_means(a: Sequence[float], b_values: Sequence[float], **kw: float) -> Estimate:
    """``mean(a) / mean(b)``, seeds resampled independently."""
    return bootstrap_groups([a, b_values], lambda g: g[0].mean(1) / g[1].mean(1), vectorized=True, **kw)  # type: ignore[arg-type]


def cluster_bootstrap(
    clusters: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    b: int = BOOTSTRAP_B,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    vectorized: bool = False,
) -> Estimate:
    """Percentile-bootstrap interval of ``statistic(clusters)``, resampling the first axis (clusters) whole.

    For a divergence rate pooled over grid cells, ``clusters[s]`` holds everything seed ``s`` contributes (all its
    cells, for every setting compared), so the correlation between a seed's runs is kept. With ``vectorized`` the
    statistic gets every resample at once, ``[B, n, ...]``, and returns ``[B]``.
    """
    c = np.asarray(clusters, dtype=float)
    if c.shape[0] == 0:
        return MISSING
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c.shape[0], size=(b, c.shape[0]))
    if vectorized:
        value = float(np.asarray(statistic(c[None])).reshape(-1)[0])
        stats = np.asarray(statistic(c[idx]), dtype=float)
    else:
        value = float(statistic(c))
        stats = np.array([statistic(c[ix]) for ix in idx])
    stats = stats[~np.isnan(stats)]
    lo, hi = _interval(stats, confidence) if stats.size else (math.nan, math.nan)
    return Estimate(value, lo, hi, int(c.shape[0]), "cluster bootstrap")


def seed_range(values: Sequence[float]) -> Estimate:
    """``[min, max]`` over seeds with the mean as the value: a test on it asks that EVERY seed passes."""
    v = _clean(values)
    if v.size == 0:
        return MISSING
    return Estimate(float(v.mean()), float(v.min()), float(v.max()), int(v.size), "range over seeds")


# ---- judging ------------------------------------------------------------------------------------------------------
class State(Enum):
    """Three-valued outcome of a criterion or subtree, plus missing data."""

    MET = "met"
    FAILED = "failed"
    UNSURE = "unsure"
    MISSING = "missing"


def judge(estimate: Estimate, op: str, threshold: float | tuple[float, float]) -> State:
    """Whether the interval of ``estimate`` lies on the claim's side of ``threshold`` (see :mod:`.rules`).

    Example::

        >>> judge(Estimate(0.5, 0.2, 0.8, 5), ">", 0.1), judge(Estimate(0.5, 0.2, 0.8, 5), ">", 0.5)
        (<State.MET: 'met'>, <State.UNSURE: 'unsure'>)

    Raises:
        ValueError: for an unknown operator or a malformed threshold.
    """
    if estimate.missing or math.isnan(estimate.lo) or math.isnan(estimate.hi):
        return State.MISSING
    lo, hi = estimate.lo, estimate.hi
    if op == "within":
        if not isinstance(threshold, tuple) or len(threshold) != 2:
            raise ValueError(f"op 'within' needs a (lo, hi) threshold, got {threshold!r}")
        a, b = threshold
        if a <= lo and hi <= b:
            return State.MET
        return State.FAILED if hi < a or lo > b else State.UNSURE
    if isinstance(threshold, tuple):
        raise ValueError(f"op {op!r} needs a number as threshold, got {threshold!r}")
    t = float(threshold)
    if op == ">":
        met, failed = lo > t, hi <= t
    elif op == ">=":
        met, failed = lo >= t, hi < t
    elif op == "<":
        met, failed = hi < t, lo >= t
    elif op == "<=":
        met, failed = hi <= t, lo > t
    else:
        raise ValueError(f"unknown operator {op!r}; valid: '>', '>=', '<', '<=', 'within'")
    return State.MET if met else State.FAILED if failed else State.UNSURE


@dataclass(frozen=True)
class Leaf:
    """One judged criterion: what was tested, the estimate, and the outcome."""

    criterion: Criterion
    estimate: Estimate
    state: State


Lookup = Callable[[Criterion], Estimate]


def _combine(node: Node, lookup: Lookup, leaves: list[Leaf]) -> State:
    if isinstance(node, Criterion):
        est = lookup(node)
        state = judge(est, node.op, node.threshold)
        leaves.append(Leaf(node, est, state))
        return state
    states = [_combine(c, lookup, leaves) for c in node.children]
    met = sum(s is State.MET for s in states)
    failed = sum(s is State.FAILED for s in states)
    missing = sum(s is State.MISSING for s in states)
    if isinstance(node, AllOf):
        if failed:
            return State.FAILED
        return State.MISSING if missing else State.MET if met == len(states) else State.UNSURE
    if isinstance(node, AtLeast):
        if met >= node.k:
            return State.MET
        if failed > len(states) - node.k:
            return State.FAILED
        # undecided: an interval straddling its threshold (unsure) or absent data (missing) is to blame
        return State.UNSURE if len(states) - failed - missing >= node.k else State.MISSING
    raise TypeError(f"unknown rule node {type(node).__name__}; expected Criterion, AllOf or AtLeast")


def evaluate(rule: Rule, lookup: Lookup | Mapping[tuple[str, str], Estimate]) -> tuple[Verdict, list[Leaf]]:
    """The verdict of ``rule`` given the estimates of its criteria.

    Args:
        rule: a rule of :mod:`pdelightning_reproduce.rules`.
        lookup: ``criterion -> Estimate``, or a mapping ``(key, item) -> Estimate`` (absent = missing).

    Returns:
        ``(verdict, leaves)``; a rule without a test is ``not comparable`` with no leaves.
    """
    if rule.test is None:
        return NOT_COMPARABLE, []
    if isinstance(lookup, Mapping):
        table = lookup
        lookup = lambda c: table.get((c.key, c.item), MISSING)  # noqa: E731
    leaves: list[Leaf] = []
    state = _combine(rule.test, lookup, leaves)
    return {State.MET: HOLDS, State.FAILED: FAILS, State.UNSURE: INCONCLUSIVE, State.MISSING: NOT_COMPARABLE}[
        state
    ], leaves


# ---- words ----------------------------------------------------------------------------------------------------------
def _threshold_text(op: str, t: float | tuple[float, float]) -> str:
    if op == "within" and isinstance(t, tuple):
        return f"within [{fmt(t[0])}, {fmt(t[1])}]"
    return f"{op} {fmt(float(t))}"  # type: ignore[arg-type]


def criterion_text(c: Criterion) -> str:
    """``key[item] op threshold``."""
    where = f"[{c.item}]" if c.item else ""
    return f"{c.key}{where} {_threshold_text(c.op, c.threshold)}"


def rule_text(node: Node | None) -> str:
    """The test in words, e.g. ``at least 7 of (…); and x > 0``."""
    if node is None:
        return "no test (not comparable by design)"
    if isinstance(node, Criterion):
        return criterion_text(node)
    if isinstance(node, AtLeast):
        inner = node.children
        if all(isinstance(c, Criterion) for c in inner):
            keys = {c.key for c in inner}  # type: ignore[union-attr]
            ops = {(c.op, c.threshold) for c in inner}  # type: ignore[union-attr]
            if len(keys) == 1 and len(ops) == 1:
                c0 = inner[0]
                assert isinstance(c0, Criterion)
                items = ", ".join(c.item for c in inner)  # type: ignore[union-attr]
                return f"{c0.key} {_threshold_text(c0.op, c0.threshold)} at ≥ {node.k} of {len(inner)} of {items}"
        return f"at least {node.k} of {len(inner)} of: " + "; ".join(f"({rule_text(c)})" for c in inner)
    return " and ".join(rule_text(c) if isinstance(c, Criterion) else f"({rule_text(c)})" for c in node.children)


def leaves_text(leaves: Sequence[Leaf], limit: int = 12) -> str:
    """The judged leaves, ``key[item] = estimate: state``, at most ``limit`` of them, then a count."""
    parts = [f"{criterion_text(lf.criterion)}: {lf.estimate} → {lf.state.value}" for lf in leaves[:limit]]
    if len(leaves) > limit:
        counts = {s: sum(lf.state is s for lf in leaves) for s in State}
        parts.append(f"… ({', '.join(f'{v} {k.value}' for k, v in counts.items() if v)} in all)")
    return "; ".join(parts)


@dataclass
class ClaimResult:
    """The structured result of one rule: what the report prints and the tests check.

    Attributes:
        rule: the rule.
        verdict: holds / does not hold / inconclusive / not comparable.
        leaves: every judged criterion.
        ours: the headline value(s) in words.
        null: null baselines in words ("" if none).
        ceiling: the ceiling in words ("" if none).
        accuracy: the accuracies of the models involved, in words.
        why: the rule and the outcome in words.
        estimates: the headline estimates by name (for figures and tests).
    """

    rule: Rule
    verdict: Verdict
    leaves: list[Leaf] = field(default_factory=list)
    ours: str = ""
    null: str = ""
    ceiling: str = ""
    accuracy: str = ""
    why: str = ""
    estimates: dict[str, Estimate] = field(default_factory=dict)


def claim_result(
    rule: Rule,
    lookup: Lookup | Mapping[tuple[str, str], Estimate],
    ours: str = "",
    null: str = "",
    ceiling: str = "",
    accuracy: str = "",
    estimates: Mapping[str, Estimate] | None = None,
    missing_reason: str = "",
) -> ClaimResult:
    """Evaluate ``rule`` and wrap the outcome with its words."""
    verdict, leaves = evaluate(rule, lookup)
    if rule.test is None:
        why = f"Not comparable: {rule.not_comparable}."
    else:
        why = f"Rule: holds if {rule_text(rule.test)}. Ours: {leaves_text(leaves)}."
        if verdict == NOT_COMPARABLE:
            why += f" Not comparable: {missing_reason or 'the runs or quantities are missing'}."
    return ClaimResult(rule, verdict, leaves, ours, null, ceiling, accuracy, why, dict(estimates or {}))
