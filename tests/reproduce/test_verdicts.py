"""Intervals and the three-valued verdict logic, against hand computations and scipy's bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pdelightning_reproduce import verdicts as V
from pdelightning_reproduce.rules import AllOf, AtLeast, Criterion, Quantity, Rule
from pdelightning_reproduce.verdicts import Estimate, State


def E(lo: float, hi: float, value: float | None = None) -> Estimate:
    return Estimate((lo + hi) / 2 if value is None else value, lo, hi, 5)


@pytest.mark.parametrize(
    ("op", "t", "lo", "hi", "state"),
    [
        (">", 0.0, 0.1, 0.5, State.MET), (">", 0.0, -0.1, 0.5, State.UNSURE), (">", 0.0, -0.5, 0.0, State.FAILED),
        (">", 0.0, 0.0, 0.0, State.FAILED), (">=", 0.97, 0.97, 0.99, State.MET),
        (">=", 0.97, 0.90, 0.969, State.FAILED),
        ("<", 0.2, -0.3, 0.19, State.MET), ("<", 0.2, 0.2, 0.4, State.FAILED), ("<", 0.2, 0.1, 0.3, State.UNSURE),
        ("<=", 0.0288, 0.01, 0.0288, State.MET), ("<=", 0.0288, 0.03, 0.04, State.FAILED),
        ("within", (-0.5, 0.5), -0.2, 0.3, State.MET), ("within", (-0.5, 0.5), 0.6, 0.9, State.FAILED),
        ("within", (-0.5, 0.5), 0.4, 0.9, State.UNSURE), ("within", (-2.5, -1.5), math.inf, math.inf, State.FAILED),
    ],
)  # fmt: skip
def test_judge_reads_the_whole_interval(op: str, t: object, lo: float, hi: float, state: State) -> None:
    assert V.judge(E(lo, hi), op, t) is state  # type: ignore[arg-type]


def test_judge_refuses_bad_operators_and_thresholds() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        V.judge(E(0, 1), "!=", 0.0)
    with pytest.raises(ValueError, match="within"):
        V.judge(E(0, 1), "within", 0.5)
    assert V.judge(V.MISSING, ">", 0.0) is State.MISSING


def test_bootstrap_mean_matches_scipy_percentile_interval() -> None:
    x = np.array([0.91, 0.95, 0.93, 0.99, 0.90])
    ours = V.bootstrap_mean(x, b=20_000)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", random_state=1).confidence_interval
    assert ours.value == pytest.approx(x.mean())
    assert ours.lo == pytest.approx(ref.low, abs=0.004) and ours.hi == pytest.approx(ref.high, abs=0.004)
    assert ours.n == 5


def test_bootstrap_degenerate_and_missing() -> None:
    e = V.bootstrap_mean([2.0, 2.0, 2.0, float("nan")])
    assert (e.value, e.lo, e.hi, e.n) == (2.0, 2.0, 2.0, 3)
    assert V.bootstrap_mean([]).missing and V.bootstrap_mean([float("nan")]).missing
    one = V.bootstrap_mean([0.3])
    assert (one.lo, one.hi, one.n) == (0.3, 0.3, 1)


def test_difference_and_ratio_resample_each_group() -> None:
    d = V.difference_of_means([1.0, 1.0, 1.0], [0.25, 0.25])
    assert (d.value, d.lo, d.hi, d.n) == (0.75, 0.75, 0.75, 2)
    r = V.log10_ratio_of_means([10.0, 10.0], [1.0, 1.0])
    assert r.value == pytest.approx(1.0) and r.lo == pytest.approx(1.0)
    # a real spread: the interval of a difference contains the point value and lies within the extreme resamples
    d = V.difference_of_means([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
    assert d.lo <= d.value <= d.hi and d.lo >= 1.0 - 1.0 and d.hi <= 3.0 - 0.0


def test_cluster_bootstrap_keeps_rows_together() -> None:
    # column 0 always equals column 1: any resample gives a difference of exactly 0
    m = np.array([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    e = V.cluster_bootstrap(m, lambda a: float(a[:, 0].mean() - a[:, 1].mean()))
    assert (e.value, e.lo, e.hi, e.n) == (0.0, 0.0, 0.0, 4)


def test_seed_range_is_min_max() -> None:
    e = V.seed_range([0.98, 0.975, 0.99])
    assert (e.lo, e.hi) == (0.975, 0.99) and V.judge(e, ">=", 0.97) is State.MET
    assert V.judge(V.seed_range([0.98, 0.96]), ">=", 0.97) is State.UNSURE


def _rule(test: object) -> Rule:
    return Rule("x", "s", "claim", "paper", "src", (Quantity("a", "a"),), test)  # type: ignore[arg-type]


def test_all_of_and_at_least_in_three_valued_logic() -> None:
    c = [Criterion("a", ">", 0.0, f"l{i}") for i in range(4)]
    est = {("a", "l0"): E(0.1, 0.2), ("a", "l1"): E(0.1, 0.2), ("a", "l2"): E(-0.1, 0.2), ("a", "l3"): E(-0.3, -0.1)}
    assert V.evaluate(_rule(AtLeast(2, tuple(c))), est)[0] == V.HOLDS
    assert V.evaluate(_rule(AtLeast(3, tuple(c))), est)[0] == V.INCONCLUSIVE  # l2 could still make it
    assert V.evaluate(_rule(AtLeast(4, tuple(c))), est)[0] == V.FAILS  # l3 failed: 4 of 4 impossible
    assert V.evaluate(_rule(AllOf(tuple(c[:3]))), est)[0] == V.INCONCLUSIVE
    assert V.evaluate(_rule(AllOf(tuple(c))), est)[0] == V.FAILS
    verdict, leaves = V.evaluate(_rule(AllOf((c[0], AtLeast(1, (c[2], c[3]))))), est)
    assert verdict == V.INCONCLUSIVE and [lf.state for lf in leaves] == [State.MET, State.UNSURE, State.FAILED]


def test_missing_data_is_not_comparable_never_a_failure() -> None:
    c = [Criterion("a", ">", 0.0, f"l{i}") for i in range(3)]
    assert V.evaluate(_rule(AllOf(tuple(c))), {("a", "l0"): E(0.1, 0.2)})[0] == V.NOT_COMPARABLE
    assert V.evaluate(_rule(AtLeast(2, tuple(c))), {("a", "l0"): E(0.1, 0.2)})[0] == V.NOT_COMPARABLE
    assert V.evaluate(_rule(AtLeast(1, tuple(c))), {("a", "l0"): E(0.1, 0.2)})[0] == V.HOLDS
    assert V.evaluate(_rule(None), {})[0] == V.NOT_COMPARABLE


def test_rule_text_names_every_threshold() -> None:
    node = AllOf((AtLeast(2, tuple(Criterion("r", "within", (0.9, 1.0), f"b{i}") for i in range(3))),
                  Criterion("d", ">", 0.0)))  # fmt: skip
    text = V.rule_text(node)
    assert "r within [0.9000, 1.0000] at ≥ 2 of 3 of b0, b1, b2" in text and "d > 0.0000" in text
