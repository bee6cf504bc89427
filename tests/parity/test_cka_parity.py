"""HSIC and CKA against a brute-force U-statistic and a second, textbook CKA implementation."""

from __future__ import annotations

import itertools

import pytest
import torch

from pdelightning.analysis.cka import cka_matrix, gram_linear, hsic_biased, hsic_unbiased, linear_cka


def hsic_u_statistic(K: torch.Tensor, L: torch.Tensor) -> float:
    """Song et al. (2012): (1/(n)_4) sum over ordered distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = K.shape[0]
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += float(K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q])
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def cka_textbook(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (2019), eq. for linear CKA: ||Y_cᵀ X_c||²_F / (||X_cᵀ X_c||_F ||Y_cᵀ Y_c||_F)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))


@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    return x, x @ torch.randn(3, 4, generator=g, dtype=torch.float64) + torch.randn(7, 4, generator=g).double()


def test_unbiased_hsic_equals_the_u_statistic(xy) -> None:
    x, y = xy
    K, L = gram_linear(x), gram_linear(y)
    assert float(hsic_unbiased(K, L)) == pytest.approx(hsic_u_statistic(K, L), rel=1e-10)
    # invariant to K -> K + a 1ᵀ + 1 aᵀ (what a common offset does to a linear Gram matrix): why centring is free
    a = torch.arange(7, dtype=torch.float64)
    assert hsic_u_statistic(K + a[:, None] + a[None, :], L) == pytest.approx(hsic_u_statistic(K, L), rel=1e-9)


def test_biased_cka_equals_the_textbook_formula(xy) -> None:
    x, y = xy
    assert float(linear_cka(x, y, unbiased=False)) == pytest.approx(cka_textbook(x, y), rel=1e-10)
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    expected = float(torch.trace(gram_linear(x) @ h @ gram_linear(y) @ h)) / (n - 1) ** 2
    assert float(hsic_biased(gram_linear(x), gram_linear(y))) == pytest.approx(expected, rel=1e-10)


def test_unbiased_cka_from_the_u_statistic(xy) -> None:
    x, y = xy
    K, L = gram_linear(x), gram_linear(y)
    expected = hsic_u_statistic(K, L) / (hsic_u_statistic(K, K) * hsic_u_statistic(L, L)) ** 0.5
    assert float(linear_cka(x, y)) == pytest.approx(expected, rel=1e-9)
    assert float(cka_matrix([x, y])[0, 1]) == pytest.approx(expected, rel=1e-9)
