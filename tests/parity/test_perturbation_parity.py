"""Critical ε, the departure summary and the grid extension against hand computations (issue 12, defect 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdelightning.analysis.perturbation import critical_epsilon, extend_epsilon_grid, loss_departure

GRID = [float(e) for e in np.logspace(-4, 0, 9)]  # PerturbationEval's default grid


def quickstart_like(eps: float) -> float:
    """Loss rising from 1.30 to 1.78 at ε = 1 (the issue's quickstart numbers): 1.30 + 0.48 ε²."""
    return 1.30 + 0.48 * eps**2


def test_default_grid_gives_nan_but_the_departure_says_where_the_curve_stands() -> None:
    losses = [quickstart_like(e) for e in GRID]
    # before: the only number, and it is nan at every quickstart probe
    assert math.isnan(critical_epsilon(GRID, losses, 1.30))
    d = loss_departure(GRID, losses, 1.30)
    assert math.isnan(d.critical_eps)
    assert d.max_loss == pytest.approx(1.78) and d.eps_at_max == 1.0
    assert d.departure_ratio == pytest.approx(1.78 / 1.30)  # 1.369
    assert d.threshold_fraction == pytest.approx(0.48 / 1.30)  # 0.369 of the way to 2 x 1.30


def test_departure_edge_cases() -> None:
    crossed = loss_departure([0.1, 1.0], [1.0, float("nan")], clean_loss=0.5)
    assert crossed.critical_eps == 1.0 and crossed.max_loss == math.inf and crossed.threshold_fraction == math.inf
    assert math.isnan(loss_departure([0.1], [1.0], clean_loss=float("nan")).departure_ratio)
    zero = loss_departure([0.1], [0.0], clean_loss=0.0)
    assert (zero.departure_ratio, zero.threshold_fraction) == (1.0, 0.0)
    at = loss_departure([0.1, 0.2], [0.75, 1.5], clean_loss=0.5, factor=3.0)  # exactly at the threshold: not past
    assert math.isnan(at.critical_eps) and at.threshold_fraction == pytest.approx(1.0)  # (1.5 - 0.5) / (2 * 0.5)
    past = loss_departure([0.1, 0.2], [0.75, 1.6], clean_loss=0.5, factor=3.0)
    assert past.critical_eps == 0.2 and past.threshold_fraction == pytest.approx(1.1)


def test_extension_finds_the_crossing() -> None:
    """1.30 + 0.48 ε² exceeds 2.60 for ε > sqrt(1.30 / 0.48) = 1.646: the next grid point √10 = 3.162 crosses."""
    calls: list[float] = []

    def loss(eps: float) -> float:
        calls.append(eps)
        return quickstart_like(eps)

    scan = extend_epsilon_grid(loss, GRID, 1.30, losses=[quickstart_like(e) for e in GRID])
    assert scan.stopped == "crossed" and not scan.saturated
    assert scan.departure.critical_eps == pytest.approx(10**0.5)
    assert calls == pytest.approx([10**0.5])  # the given losses are not recomputed


def test_extension_stops_when_the_loss_saturates_at_ln_c() -> None:
    """Loss -> ln 10 = 2.303 < 2 x 1.30: the threshold is unreachable; the scan says saturated."""
    ln_c = math.log(10)

    def loss(eps: float) -> float:
        return ln_c - (ln_c - 1.30) * math.exp(-eps)

    scan = extend_epsilon_grid(loss, GRID, 1.30, num_classes=10)
    assert scan.stopped == "saturated" and scan.saturated
    assert math.isnan(scan.departure.critical_eps)
    assert scan.losses[-1] == pytest.approx(ln_c, rel=0.02)
    assert scan.departure.threshold_fraction == pytest.approx((scan.losses[-1] - 1.30) / 1.30)


def test_extension_budget_and_checks() -> None:
    flat_low = extend_epsilon_grid(lambda e: 1.0, [0.1], 1.0, num_classes=10, max_eps=50.0)
    assert flat_low.stopped == "max_eps" and flat_low.epsilons[-1] <= 50.0  # flat, but far below ln C
    assert extend_epsilon_grid(lambda e: 1.0, [0.1], 1.0, max_points=3).stopped in {"saturated", "max_points"}
    with pytest.raises(ValueError, match="must be a non-empty list of positive numbers"):
        extend_epsilon_grid(lambda e: 1.0, [0.0], 1.0)
    with pytest.raises(ValueError, match=r"growth=1.0 and factor=2.0 must both be > 1"):
        extend_epsilon_grid(lambda e: 1.0, [0.1], 1.0, growth=1.0)
