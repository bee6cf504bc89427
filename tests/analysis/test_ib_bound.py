"""I(T;Y) as a lower bound (issue 18, item 2): planted channels with an exactly known I(T;Y)."""

from __future__ import annotations

import doctest
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pdelightning.analysis import ib_bound
from pdelightning.analysis.ib_bound import (
    bound_from_scores,
    bound_status,
    crossfit_bound,
    fit_temperature,
    head_bound,
    label_log2_marginal,
)

MU = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)  # T | Y=c ~ N(MU[c], 1), Y uniform on 3 classes
CHANNEL = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])  # p(y | x), x uniform


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small problems: one torch and one BLAS thread (on a busy machine more threads only wait on each other)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def mixture_information() -> float:
    """I(T;Y) of the Gaussian mixture by numerical integration: log2 3 - ∫ p(t) H(Y | T=t) dt."""

    def integrand(t: float) -> float:
        joint = stats.norm.pdf(t, MU.numpy(), 1.0) / 3.0
        post = joint / joint.sum()
        return float(joint.sum() * -(post * np.log2(np.clip(post, 1e-300, None))).sum())

    return math.log2(3.0) - integrate.quad(integrand, -12.0, 12.0, limit=200)[0]


def draw_mixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return MU[y] + torch.randn(n, generator=g, dtype=torch.float64), y


def _col(ty: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [N], y)`` -> ``(t [N, 1], y)``."""
    return ty[0][:, None], ty[1]


def channel_information() -> float:
    """I(X;Y) of the discrete channel by hand: sum p(x, y) log2 p(x, y) / (p(x) p(y))."""
    joint = CHANNEL / 4.0
    return float((joint * np.log2(joint / (joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)))).sum())


def draw_channel(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, n)
    y = np.array([rng.choice(3, p=CHANNEL[k]) for k in x])
    return torch.eye(4, dtype=torch.float64)[torch.from_numpy(x)], torch.from_numpy(y)


def test_truths_by_hand() -> None:
    # the last channel row is pure noise; the others give 0.8 / 0.1 / 0.1 and 0.6 / 0.2 / 0.2
    h_y = -sum(p * math.log2(p) for p in CHANNEL.mean(0))
    h_rows = [-sum(p * math.log2(p) for p in row) for row in CHANNEL]
    assert channel_information() == pytest.approx(h_y - sum(h_rows) / 4.0, abs=1e-12)
    # by hand: p(y) = (0.3583, 0.3583, 0.2833), H(Y) = 1.5766; H(Y|X) = (2 x 0.9219 + 1.3710 + 1.5850) / 4 = 1.1999
    assert channel_information() == pytest.approx(1.5766 - 1.1999, abs=2e-4)
    assert 0.0 < mixture_information() < math.log2(3.0)
    # the mixture's truth three ways: the integral, and a Monte Carlo of E[log2 p(y|t) - log2 p(y)] (below)
    t, y = draw_mixture(40_000, 7)
    exact = head_bound(-0.5 * (t[:, None] - MU) ** 2, y, floor=0.0)
    assert abs(exact.estimate - mixture_information()) < 3.0 * (exact.upper - exact.estimate) / 1.645


def test_label_entropy_by_hand() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # p = 3/8, 2/8, 1/8, 2/8
    by_hand = 3 / 8 * math.log2(8 / 3) + 2 * (2 / 8 * 2) + 1 / 8 * 3
    assert -float(label_log2_marginal(y).mean()) == pytest.approx(by_hand)
    assert head_bound(torch.zeros(8, 4), y).h_y == pytest.approx(by_hand)
    b = crossfit_bound(torch.randn(8, 2, dtype=torch.float64), y, folds=2, inner_folds=2)
    assert b.h_y == pytest.approx(by_hand)
    # a head that ignores T and predicts the observed frequencies scores exactly H(Y) - CE = 0
    freq = torch.tensor([3, 2, 1, 2], dtype=torch.float64).log().expand(8, 4)
    assert head_bound(freq, y, floor=0.0).estimate == pytest.approx(0.0, abs=1e-12)


def test_confidence_limits_by_hand() -> None:
    s = torch.tensor([0.5, 1.5, 1.0, 1.0])  # mean 1, sd sqrt(0.5 / 3), t(0.95, 3) = 2.353363
    b = bound_from_scores(s, h_y=2.0)
    half = 2.353363 * math.sqrt(0.5 / 3) / 2.0
    assert (b.estimate, b.cross_entropy) == (1.0, 1.0)
    assert b.lower == pytest.approx(1.0 - half, abs=1e-6) and b.upper == pytest.approx(1.0 + half, abs=1e-6)
    f = bound_from_scores(s, 2.0, method="folds", groups=torch.tensor([0, 1, 0, 1]))  # fold means 0.75 and 1.25
    assert f.folds == 2 and f.lower == pytest.approx(1.0 - 6.313752 * 0.25, abs=1e-6)
    assert bound_from_scores(s, 2.0, 0.25).lower > b.lower  # a 75 % limit is closer than a 95 % one
    assert bound_status(0.1, 0.3) == "informative" and bound_status(-0.1, 0.3) == "inconclusive"
    assert bound_status(-0.3, -0.1) == "outside_valid_range" and bound_status(math.nan, 1.0) == "not_finite"


def test_gaussian_mixture_bound_is_below_the_truth_and_approaches_it() -> None:
    truth = mixture_information()  # 0.893 bits
    small = [crossfit_bound(*_col(draw_mixture(90, s))) for s in range(10)]
    large = [crossfit_bound(*_col(draw_mixture(3000, s))) for s in range(2)]
    assert all(b.status == "informative" for b in small + large)
    # a lower bound up to sampling error: a lucky sample can put the 95 % limit above the truth (seed 2 at n = 90:
    # there even the exact posterior's limit is 0.96 > 0.89), about 1 in 20; 3 or more of 10 has probability 0.012
    assert sum(b.lower > truth for b in small) <= 2 and all(b.lower <= truth for b in large)
    gap_small = truth - np.mean([b.estimate for b in small])
    gap_large = truth - np.mean([b.estimate for b in large])
    assert 0.0 <= gap_large < 0.03  # LDA is the Bayes posterior here: the gap is the fitting error
    assert gap_large < gap_small
    assert all(abs(b.tau - 1.0) < 0.1 for b in large)  # a well-specified probe is left as it is


def test_discrete_channel_bound_with_a_logistic_probe() -> None:
    # softmax(W onehot(x) + b) can be any table p(y|x): the probe family holds the truth, the gap is fitting error
    truth = channel_information()  # 0.377 bits
    est, se = {}, {}
    for n in (150, 4000):
        bounds = [crossfit_bound(*draw_channel(n, s), probe="logistic", l2=1e-4) for s in range(3)]
        assert all(b.lower <= truth for b in bounds)
        est[n] = np.mean([b.estimate for b in bounds])
        se[n] = math.sqrt(sum(((b.upper - b.estimate) / 1.645) ** 2 for b in bounds)) / 3.0
    assert abs(est[4000] - truth) < 3.0 * se[4000] and se[4000] < 0.01  # within the sampling error of 12000 scores
    assert est[150] < truth - 0.05 < est[4000]  # far below at n = 150 (fitting 12 weights on 120): approaches


def test_independent_t_and_y_give_zero_with_an_interval_covering_it() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(300, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    for probe in ("lda", "logistic"):
        b = crossfit_bound(t, y, probe=probe)
        assert b.lower <= 0.0 <= b.upper and b.status == "inconclusive"
        assert abs(b.estimate) < 0.03 and b.tau < 0.5  # the calibration shrank the probe to the prior
    raw = crossfit_bound(t, y, calibrate=False)  # the uncalibrated probe over-fits 20 noise dimensions
    assert raw.estimate < -0.1 and raw.status == "outside_valid_range"


def test_head_bound_of_a_wrong_head_is_outside_the_valid_range_and_calibration_repairs_it() -> None:
    y = torch.arange(200) % 4
    wrong = 5.0 * torch.eye(4)[(y + 1) % 4]  # confident and always wrong
    raw = head_bound(wrong, y)
    assert raw.upper < 0 and raw.status == "outside_valid_range"
    cal = head_bound(wrong, y, calibrate=True)
    assert cal.tau < 0.01 and cal.status == "inconclusive" and abs(cal.estimate) < 0.01
    good = head_bound(3.0 * torch.eye(4)[y], y, calibrate=True)  # right but under-confident: sharpened
    assert good.tau > 1.5 and good.estimate > head_bound(3.0 * torch.eye(4)[y], y).estimate
    assert good.estimate <= 2.0


@pytest.mark.parametrize("method", ["examples", "folds"])
def test_coverage_of_the_lower_limit_with_the_exact_posterior(method: str) -> None:
    # with q the true posterior the bound is tight: E[score] = I(T;Y), so the one-sided 95 % lower limit exceeds
    # the truth about 5 % of the time; the check fails if it does so much more often, or (a vacuous limit) never
    truth, runs = mixture_information(), 300
    above = 0
    for s in range(runs):
        t, y = draw_mixture(200, 100 + s)
        above += head_bound(-0.5 * (t[:, None] - MU) ** 2, y, method=method).lower > truth
    sim_se = math.sqrt(0.05 * 0.95 / runs)
    assert 0.05 - 3.0 * sim_se < above / runs < 0.05 + 3.0 * sim_se


def test_coverage_of_the_crossfitted_lower_limit() -> None:
    truth, runs = mixture_information(), 40
    above = sum(crossfit_bound(*_col(draw_mixture(120, 500 + s))).lower > truth for s in range(runs))
    assert above / runs <= 0.05 + 3.0 * math.sqrt(0.05 * 0.95 / runs)


def test_fit_temperature_keeps_a_good_probe_and_drops_a_useless_one() -> None:
    t, y = draw_mixture(2000, 1)
    log_post = torch.log_softmax(-0.5 * (t[:, None] - MU) ** 2, -1)
    prior = torch.full((3,), -math.log(3.0), dtype=torch.float64)
    assert fit_temperature(log_post, y, prior) == pytest.approx(1.0, abs=0.1)
    assert fit_temperature(log_post[torch.randperm(2000)], y, prior) < 0.05


def test_non_finite_features_give_nan() -> None:
    t, y = draw_mixture(40, 0)
    t = t[:, None].clone()
    t[3] = math.nan
    b = crossfit_bound(t, y)
    assert math.isnan(b.estimate) and b.status == "not_finite" and b.h_y > 0
    assert head_bound(torch.full((40, 3), math.inf), y).status == "not_finite"


def test_bad_arguments_are_named() -> None:
    t, y = draw_mixture(40, 0)
    with pytest.raises(ValueError, match=r"probe='svm' is not one of \('lda', 'logistic'\)"):
        crossfit_bound(t[:, None], y, probe="svm")
    with pytest.raises(ValueError, match=r"method='bootstrap' is not one of \('examples', 'folds'\)"):
        head_bound(torch.zeros(40, 3), y, method="bootstrap")
    with pytest.raises(ValueError, match=r"alpha=0\.7"):
        bound_from_scores(torch.zeros(5), 0.0, alpha=0.7)
    with pytest.raises(ValueError, match="folds=30 needs"):
        crossfit_bound(t[:, None], y, folds=30)
    with pytest.raises(ValueError, match="inner_folds=1 must be >= 2"):
        crossfit_bound(t[:, None], y, inner_folds=1)
    with pytest.raises(ValueError, match="expected t"):
        crossfit_bound(t, y)
    with pytest.raises(ValueError, match="needs groups"):
        bound_from_scores(torch.zeros(5), 0.0, method="folds")


def test_doctests() -> None:
    result = doctest.testmod(ib_bound, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
