"""Estimators and the three-valued verdict logic, against hand computations and scipy."""

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
        (">", 0.0, 0.1, 0.5, State.MET),
        (">", 0.0, -0.1, 0.5, State.UNSURE),
        (">", 0.0, -0.5, 0.0, State.FAILED),
        (">", 0.0, 0.0, 0.0, State.FAILED),
        (">=", 0.97, 0.97, 0.99, State.MET),
        (">=", 0.97, 0.90, 0.969, State.FAILED),
        ("<", 0.2, -0.3, 0.19, State.MET),
        ("<", 0.2, 0.2, 0.4, State.FAILED),
        ("<", 0.2, 0.1, 0.3, State.UNSURE),
        ("<=", 0.0288, 0.01, 0.0288, State.MET),
        ("<=", 0.0288, 0.03, 0.04, State.FAILED),
        ("within", (-0.5, 0.5), -0.2, 0.3, State.MET),
        ("within", (-0.5, 0.5), 0.6, 0.9, State.FAILED),
        ("within", (-0.5, 0.5), 0.4, 0.9, State.UNSURE),
        ("within", (-2.5, -1.5), math.inf, math.inf, State.FAILED),
    ],
)
def test_judge_reads_the_whole_interval(op: str, t: object, lo: float, hi: float, state: State) -> None:
    assert V.judge(E(lo, hi), op, t) is state  # type: ignore[arg-type]


def test_judge_refuses_bad_operators_and_thresholds() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        V.judge(E(0, 1), "!=", 0.0)
    with pytest.raises(ValueError, match="within"):
        V.judge(E(0, 1), "within", 0.5)
    assert V.judge(V.MISSING, ">", 0.0) is State.MISSING


def test_mean_and_difference_estimators_match_scipy() -> None:
    x = np.array([0.91, 0.95, 0.93, 0.99, 0.90])
    y = np.array([0.80, 0.86, 0.83])
    e = V.mean_interval(x)
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    assert (e.value, e.n, e.method) == (pytest.approx(x.mean()), 5, "t")
    assert (e.lo, e.hi) == pytest.approx((ref.low, ref.high))
    d = V.difference_of_means(x, y)
    ref = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
    assert (d.lo, d.hi, d.n, d.method) == (pytest.approx(ref.low), pytest.approx(ref.high), 3, "Welch")
    p = V.paired_difference(x[:3], y)
    ref = stats.ttest_rel(x[:3], y).confidence_interval(0.95)
    assert (p.lo, p.hi, p.method) == (pytest.approx(ref.low), pytest.approx(ref.high), "paired t")
    r = V.log10_ratio_of_means([10.0, 12.0, 9.0], [1.0, 1.1, 0.9])
    ref = stats.ttest_ind(np.log10([10.0, 12.0, 9.0]), np.log10([1.0, 1.1, 0.9]), equal_var=False)
    assert (r.lo, r.hi) == pytest.approx(tuple(ref.confidence_interval(0.95)))
    f = V.ratio_of_means([2.0, 2.2, 1.8], [1.0, 1.1, 0.9])
    assert f.value == pytest.approx(2.0) and f.lo < 2.0 < f.hi and f.method == "Fieller"


def test_degenerate_and_missing() -> None:
    e = V.mean_interval([2.0, 2.0, 2.0, float("nan")])
    assert (e.value, e.lo, e.hi, e.n) == (2.0, 2.0, 2.0, 3)  # nothing varies: the t interval is the point
    assert V.mean_interval([]).missing and V.mean_interval([float("nan")]).missing
    one = V.mean_interval([0.3])  # one seed decides nothing
    assert one.value == 0.3 and one.n == 1 and np.isnan(one.lo) and V.judge(one, ">", 0.0) is State.MISSING
    res = V.claim_result(_rule(Criterion("a", ">", 0.0)), {("a", ""): V.difference_of_means([1.0], [0.0, 0.1])})
    assert res.verdict == V.NOT_COMPARABLE and "only one seed" in res.why
    assert V.difference_of_means([1.0], []).missing and V.ratio_of_means([], [1.0]).missing


def test_bootstrap_is_refused_at_small_n() -> None:
    with pytest.raises(ValueError, match="n >= 30"):
        V.bootstrap_mean([1.0, 2.0, 3.0, 4.0, 5.0])
    e = V.bootstrap_mean(np.linspace(0.0, 1.0, 40))
    assert e.lo < 0.5 < e.hi and "n >= 30" in e.method


def test_rate_difference_needs_every_analysis_to_agree() -> None:
    # v2's PDE sweep: 3/12 vs 0/12, every seed the same (the t interval alone would be [0.25, 0.25])
    e = V.rate_difference((3, 12, 0, 12), [0.25, 0.25, 0.25])
    assert e.lo < 0 < e.hi and e.p == pytest.approx(0.1087, abs=1e-4)
    assert V.judge(e, ">", 0.0) is State.UNSURE
    # 3/6 vs 0/6: Newcombe's lower limit is just above 0, but Fisher's p = 0.091 does not confirm it
    e = V.rate_difference((3, 6, 0, 6), [0.5, 0.5, 0.5])
    assert e.lo > 0 and V.judge(e, ">", 0.0) is State.UNSURE
    # v2's no-LayerNorm sweep: Fisher alone would hold (p = 0.0015); the seeds disagree (t [-0.03, 0.92])
    e = V.rate_difference((8, 18, 0, 18), [1 / 3, 1 / 3, 2 / 3])
    assert e.p < 0.01 and e.lo == pytest.approx(-0.0336, abs=1e-3) and V.judge(e, ">", 0.0) is State.UNSURE
    # a clear difference holds; a reversed one does not
    assert V.judge(V.rate_difference((30, 45, 0, 45), [2 / 3] * 5), ">", 0.0) is State.MET
    assert V.judge(V.rate_difference((0, 45, 30, 45), [-2 / 3] * 5), ">", 0.0) is State.FAILED


def test_margin_lets_a_narrow_interval_fail_and_invalid_is_not_comparable() -> None:
    assert V.judge(E(-0.01, 0.03), ">", 0.0) is State.UNSURE
    assert V.judge(E(-0.01, 0.03), ">", 0.0, margin=0.05) is State.FAILED
    assert V.judge(E(0.01, 0.03), ">", 0.0, margin=0.05) is State.MET
    assert V.judge(E(-0.03, 0.01), "<", 0.0, margin=0.05) is State.FAILED
    bad = V.invalid_unless(E(0.1, 0.2), False, "below the bound's bias")
    assert V.judge(bad, ">", 0.0) is State.INVALID
    res = V.claim_result(_rule(Criterion("a", ">", 0.0)), {("a", ""): bad})
    assert res.verdict == V.NOT_COMPARABLE and "below the bound's bias" in res.why


def test_every_verdict_names_its_interval_method() -> None:
    res = V.claim_result(_rule(Criterion("a", ">", 0.0)), {("a", ""): V.difference_of_means([1.0, 1.2], [0.1, 0.2])})
    assert res.methods == ["Welch"] and res.why.endswith("Interval method: Welch.")
    assert "(n=2, Welch)" in res.why


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
    node = AllOf(
        (AtLeast(2, tuple(Criterion("r", "within", (0.9, 1.0), f"b{i}") for i in range(3))), Criterion("d", ">", 0.0))
    )
    text = V.rule_text(node)
    assert "r within [0.9000, 1.0000] at ≥ 2 of 3 of b0, b1, b2" in text and "d > 0.0000" in text
