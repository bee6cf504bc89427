"""Entropies against scipy; mutual-information estimators against Monte-Carlo MI of Gaussians with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import entropy

from pdelightning.analysis.information import ESTIMATOR_BIAS, entropy_bits, kde_mutual_information
from pdelightning.analysis.linear_probe import crossfit_probe_information
from pdelightning.analysis.mi_benchmark import GaussianClasses, gaussian_classes, true_label_information


def test_entropy_bits_matches_scipy() -> None:
    y = torch.randint(5, (200,), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(y).numpy()
    assert entropy_bits(y) == pytest.approx(entropy(counts, base=2), rel=1e-12)


def test_monte_carlo_information_of_two_gaussians() -> None:
    """Y uniform on {0, 1}, T | Y ~ N(±m, 1) in 1-D: I(T;Y) = 1 - E[h2(p(Y|T))] with p(1|t) = sigmoid(2 m t);
    by quadrature for m = 1: 0.4859 bits (known answer for the binary Gaussian channel at SNR 1)."""
    mix = GaussianClasses(torch.tensor([[-1.0], [1.0]], dtype=torch.float64))
    value, se = true_label_information(mix, n_mc=200_000)
    t = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = 0.5 * (torch.exp(-0.5 * (t - 1) ** 2) + torch.exp(-0.5 * (t + 1) ** 2)) / math.sqrt(2 * math.pi)
    p = torch.sigmoid(2 * t)
    h2 = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2)
    quad = 1.0 - float(torch.trapezoid(density * h2, t))
    assert quad == pytest.approx(0.4859, abs=1e-4)
    assert value == pytest.approx(quad, abs=4 * se)


@pytest.mark.parametrize("d", [8, 64])
def test_crossfit_probe_within_its_documented_bias(d: int) -> None:
    """Known answer I(T;Y) (Monte Carlo, 400k): 2.4862 bits at d = 8, 2.7985 at d = 64; N = 512."""
    truth = {8: 2.4862, 64: 2.7985}[d]
    mix = gaussian_classes(d)
    estimates = [crossfit_probe_information(*mix.sample(512, seed=s))[0] for s in range(3)]
    error = sum(estimates) / 3 - truth
    bias = ESTIMATOR_BIAS["probe"][(512, d)]  # -0.036 (d = 8), -0.250 (d = 64)
    assert error == pytest.approx(bias, abs=0.12)  # tolerance: ~3 standard errors of a 3-set mean
    assert error < 0.1  # a lower bound, up to sampling error


def test_kde_on_separated_clusters() -> None:
    """Four far-apart clusters of equal size, two per class: I(X;T) = log2 4 = 2 bits, I(T;Y) = H(Y) = 1 bit."""
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]], dtype=torch.float64)
    t = centres.repeat_interleave(10, 0) + 1e-3 * torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1]).repeat_interleave(10)
    i_xt, i_ty = kde_mutual_information(t, y, noise_variance=1.0)
    assert i_xt == pytest.approx(2.0, abs=1e-4) and i_ty == pytest.approx(1.0, abs=1e-4)
