"""Intervals over seeds and the verdict logic of :mod:`pdelightning_reproduce.rules`, as pure functions.

* :class:`Estimate`: a value with its 95 % interval, the number of units behind it (seeds or pair units), the name
  of the interval method, and, where it applies, an exact p-value or the reason it lies outside its estimator's
  valid range.
* Estimators (small-sample methods of :mod:`pdelightning_reproduce.stats`): :func:`mean_interval` (t),
  :func:`difference_of_means` (Welch), :func:`paired_difference` (paired t), :func:`log10_ratio_of_means` (Welch
  on log10), :func:`ratio_of_means` (Fieller), :func:`rate_difference` (Newcombe + Fisher on run counts, enveloped
  with the seed-paired t), :func:`seed_range` (``[min, max]``: every seed must pass) and :func:`bootstrap_mean`
  (only for ``n >= stats.BOOTSTRAP_MIN_N``).
* :func:`judge` and :func:`evaluate`: a leaf is met / failed / unsure / invalid from its interval, and a rule's tree
  combines them in three-valued logic into a verdict. Missing data never fails a rule: a decision that hinges on it
  is ``not comparable``, as is one that reads an estimate outside its valid range (with the reason); ``inconclusive``
  is kept for intervals that straddle a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Literal

import numpy as np

from pdelightning_reproduce import stats
from pdelightning_reproduce.rules import CONFIDENCE, AllOf, AtLeast, Criterion, Node, Rule

Verdict = Literal["holds", "does not hold", "inconclusive", "not comparable"]
HOLDS: Verdict = "holds"
FAILS: Verdict = "does not hold"
INCONCLUSIVE: Verdict = "inconclusive"
NOT_COMPARABLE: Verdict = "not comparable"
VERDICTS: tuple[Verdict, ...] = (HOLDS, FAILS, INCONCLUSIVE, NOT_COMPARABLE)
#: Short method names printed with every estimate.
T, WELCH, PAIRED, FIELLER, RANGE = "t", "Welch", "paired t", "Fieller", "range over seeds"


@dataclass(frozen=True)
class Estimate:
    """A point value with its interval ``[lo, hi]`` from ``n`` independent units (seeds or pair units).

    ``n == 0`` means missing (``value``, ``lo``, ``hi`` are ``nan``). ``p``: an exact one-sided p-value in the
    claim's direction that must also be below ``(1 - CONFIDENCE) / 2`` for a directional leaf to be met (``None``:
    no such test). ``invalid``: why the estimate lies outside its estimator's valid range ("" when it does not).
    """

    value: float
    lo: float
    hi: float
    n: int
    method: str = T
    p: float | None = None
    invalid: str = ""

    @property
    def missing(self) -> bool:
        """Whether there was no data."""
        return self.n == 0

    def __str__(self) -> str:
        if self.missing:
            return "—"
        if self.n == 1:
            return f"{fmt(self.value)} (n=1, no interval)"
        p = f", p = {self.p:.3g}" if self.p is not None else ""
        return f"{interval_text(self.value, self.lo, self.hi)} (n={self.n}, {self.method}{p})"


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


def interval_text(value: float, lo: float, hi: float) -> str:
    """``value [lo, hi]`` with enough digits that two different limits never print alike; an interval of width 0
    (every unit equal) says so instead of printing ``[x, x]``.

    Example::

        >>> interval_text(9.83741, 9.83738, 9.83744), interval_text(0.0, 0.0, 0.0)
        ('9.837410 [9.837380, 9.837440]', '0.0000 (every unit equal: no spread)')
    """
    if lo == hi:
        return f"{fmt(value)} (every unit equal: no spread)"
    text = [fmt(value), fmt(lo), fmt(hi)]
    digits = 4
    while text[1] == text[2] and digits < 12 and all(map(math.isfinite, (value, lo, hi))):
        digits += 2
        text = [f"{x:.{digits}f}" if 1e-3 <= abs(x) < 1e4 else f"{x:.{digits - 1}g}" for x in (value, lo, hi)]
    return f"{text[0]} [{text[1]}, {text[2]}]"


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).ravel()
    return v[~np.isnan(v)]


def _wrap(r: stats.Interval, n: int, method: str) -> Estimate:
    return Estimate(float(r.estimate), float(r.low), float(r.high), n, method)


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """Seed mean with its one-sample t interval (``nan`` entries dropped; one value: no interval, ``nan`` limits, so
    no rule can be decided on one seed).

    Example::

        >>> e = mean_interval([1.0, 2.0, 3.0])
        >>> (e.value, round(e.lo, 4), round(e.hi, 4), e.n, e.method)
        (2.0, -0.4841, 4.4841, 3, 't')
    """
    v = _clean(values)
    if v.size == 0:
        return MISSING
    if v.size == 1:
        return Estimate(float(v[0]), math.nan, math.nan, 1, T)
    return _wrap(stats.t_mean(v, confidence), int(v.size), T)


def difference_of_means(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> Estimate:
    """``mean(a) - mean(b)`` of two independent settings with Welch's interval; ``n`` is the smaller group."""
    x, y = _clean(a), _clean(b)
    if x.size == 0 or y.size == 0:
        return MISSING
    n = int(min(x.size, y.size))
    if n < 2:
        return Estimate(float(x.mean() - y.mean()), math.nan, math.nan, 1, WELCH)
    return _wrap(stats.welch_diff(x, y, confidence), n, WELCH)


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> Estimate:
    """Mean of ``a - b`` per unit (units where either is ``nan`` dropped) with the paired t interval."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    e = mean_interval(d, confidence)
    return e if e.missing else replace(e, method=PAIRED)


def log10_ratio_of_means(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> Estimate:
    """``mean(log10 a) - mean(log10 b)`` for positive quantities (the log10 ratio of geometric means), Welch."""
    x, y = _clean(a), _clean(b)
    x, y = x[x > 0], y[y > 0]
    e = difference_of_means(np.log10(x), np.log10(y), confidence)
    return e if e.missing else replace(e, method=f"{WELCH} on log10")


def ratio_of_means(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> Estimate:
    """``mean(a) / mean(b)`` of two independent settings with Fieller's interval (unbounded: ``-inf, +inf``)."""
    x, y = _clean(a), _clean(b)
    if x.size == 0 or y.size == 0:
        return MISSING
    n = int(min(x.size, y.size))
    if n < 2:
        r = float(x.mean() / y.mean()) if y.mean() != 0 else math.nan
        return Estimate(r, math.nan, math.nan, 1, FIELLER)
    return _wrap(stats.fieller_ratio(x, y, confidence), n, FIELLER)


def rate_difference(
    counts: tuple[int, int, int, int],
    per_seed: Sequence[float] | np.ndarray,
    greater: bool = True,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Difference of two divergence rates, judged on the run counts and per seed.

    Args:
        counts: ``(k1, n1, k2, n2)``: diverged and trained runs of the two groups, pooled over their cells.
        per_seed: per seed, its rate in group 1 minus its rate in group 2 (the seed is the independent unit).
        greater: the claim's direction (rate 1 > rate 2); the Fisher p-value is one-sided that way.
        confidence: level of both intervals.

    Returns:
        value: the pooled difference; interval: the envelope of Newcombe's interval on the counts and the paired t
        interval of ``per_seed`` (both must exclude the threshold); ``p``: Fisher's exact one-sided p.

    Example (the v2 PDE sweep: 3 of 12 runs diverged without stabilizers, 0 of 12 with)::

        >>> e = rate_difference((3, 12, 0, 12), [0.25, 0.25, 0.25])
        >>> round(e.value, 4), round(e.lo, 4), round(e.hi, 4), round(e.p, 3)
        (0.25, -0.0411, 0.5323, 0.109)
    """
    k1, n1, k2, n2 = counts
    if n1 == 0 or n2 == 0:
        return MISSING
    nc = stats.newcombe_diff(k1, n1, k2, n2, confidence)
    seeds = mean_interval(per_seed, confidence)
    lo, hi = float(nc.low), float(nc.high)
    if not seeds.missing and seeds.n > 1:
        lo, hi = min(lo, seeds.lo), max(hi, seeds.hi)
    p = stats.fisher_one_sided(k1, n1, k2, n2, greater)
    method = f"Newcombe {k1}/{n1} vs {k2}/{n2} + Fisher, with paired t over {seeds.n} seeds"
    return Estimate(float(nc.estimate), lo, hi, max(seeds.n, 1), method, p)


def seed_range(values: Sequence[float]) -> Estimate:
    """``[min, max]`` over seeds with the mean as the value: a test on it asks that EVERY seed passes."""
    v = _clean(values)
    if v.size == 0:
        return MISSING
    return Estimate(float(v.mean()), float(v.min()), float(v.max()), int(v.size), RANGE)


def bootstrap_mean(values: Sequence[float] | np.ndarray, b: int = 10_000, seed: int = 20240818) -> Estimate:
    """Percentile-bootstrap interval of the mean, only for ``n >= stats.BOOTSTRAP_MIN_N`` units.

    Raises:
        ValueError: with fewer units (use :func:`mean_interval`).
    """
    v = _clean(values)
    r = stats.bootstrap_mean(v, b=b, seed=seed, confidence=CONFIDENCE)
    return _wrap(r, int(v.size), f"percentile bootstrap, n >= {stats.BOOTSTRAP_MIN_N}")


def invalid_unless(estimate: Estimate, ok: bool, reason: str) -> Estimate:
    """``estimate`` marked outside its valid range with ``reason`` unless ``ok`` (missing estimates unchanged)."""
    return estimate if ok or estimate.missing else replace(estimate, invalid=reason)


# ---- judging ------------------------------------------------------------------------------------------------------
class State(Enum):
    """Three-valued outcome of a criterion or subtree, plus missing data."""

    MET = "met"
    FAILED = "failed"
    UNSURE = "unsure"
    MISSING = "missing"
    INVALID = "invalid"


def judge(estimate: Estimate, op: str, threshold: float | tuple[float, float], margin: float = 0.0) -> State:
    """Whether the interval of ``estimate`` lies on the claim's side of ``threshold`` (see :mod:`.rules`).

    With ``margin`` a directional leaf also fails when its interval excludes every effect as large as the margin;
    with an exact ``estimate.p`` a met leaf also needs ``p < (1 - CONFIDENCE) / 2``; an ``estimate.invalid`` one is
    :attr:`State.INVALID` whatever its interval.

    Example::

        >>> judge(Estimate(0.5, 0.2, 0.8, 5), ">", 0.1), judge(Estimate(0.5, 0.2, 0.8, 5), ">", 0.5)
        (<State.MET: 'met'>, <State.UNSURE: 'unsure'>)

    Raises:
        ValueError: for an unknown operator or a malformed threshold.
    """
    if estimate.invalid:
        return State.INVALID
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
        met, failed = lo > t, hi <= t + margin
    elif op == ">=":
        met, failed = lo >= t, hi < t + margin
    elif op == "<":
        met, failed = hi < t, lo >= t - margin
    elif op == "<=":
        met, failed = hi <= t, lo > t - margin
    else:
        raise ValueError(f"unknown operator {op!r}; valid: '>', '>=', '<', '<=', 'within'")
    if met and estimate.p is not None and not estimate.p < (1.0 - CONFIDENCE) / 2:
        met = False  # the exact test does not confirm the direction
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
        state = judge(est, node.op, node.threshold, node.margin)
        leaves.append(Leaf(node, est, state))
        return state
    states = [_combine(c, lookup, leaves) for c in node.children]
    met = sum(s is State.MET for s in states)
    failed = sum(s is State.FAILED for s in states)
    missing = sum(s in (State.MISSING, State.INVALID) for s in states)
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
    verdicts = {State.MET: HOLDS, State.FAILED: FAILS, State.UNSURE: INCONCLUSIVE}
    return verdicts.get(state, NOT_COMPARABLE), leaves


# ---- words ----------------------------------------------------------------------------------------------------------
def _threshold_text(op: str, t: float | tuple[float, float]) -> str:
    if op == "within" and isinstance(t, tuple):
        return f"within [{fmt(t[0])}, {fmt(t[1])}]"
    return f"{op} {fmt(float(t))}"  # type: ignore[arg-type]


def criterion_text(c: Criterion) -> str:
    """``key[item] op threshold``."""
    where = f"[{c.item}]" if c.item else ""
    margin = f" (fails if the interval excludes an effect of {fmt(c.margin)})" if c.margin else ""
    return f"{c.key}{where} {_threshold_text(c.op, c.threshold)}{margin}"


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
        why: the rule and the outcome in words, ending with the interval method(s) the verdict used.
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

    @property
    def methods(self) -> list[str]:
        """The interval methods of the judged leaves, each once, in order (``[]`` for a rule without a test)."""
        return list(dict.fromkeys(lf.estimate.method for lf in self.leaves if not lf.estimate.missing))


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
        invalid = list(dict.fromkeys(lf.estimate.invalid for lf in leaves if lf.state is State.INVALID))
        if verdict == NOT_COMPARABLE:
            single = any(lf.estimate.n == 1 for lf in leaves)
            fallback = "only one seed or pair unit: no interval" if single else "the runs or quantities are missing"
            reason = "; ".join(invalid) or missing_reason or fallback
            why += f" Not comparable: {reason}."
    result = ClaimResult(rule, verdict, leaves, ours, null, ceiling, accuracy, why, dict(estimates or {}))
    if rule.test is not None:
        none = "none yet (no estimate; the rule's interval is named in its quantities, in the appendix)"
        result.why += f" Interval method: {'; '.join(result.methods) or none}."
    return result
