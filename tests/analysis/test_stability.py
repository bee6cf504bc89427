"""Spectral norms to a tolerance (issue 12, defect 1), against torch.linalg and the issue's reproduction."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import Tensor

from pdelightning.analysis import stability
from pdelightning.analysis.stability import EXACT_MAX_DIM, exact_spectral_norm, spectral_norm_power


def _with_singular_values(s: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``U diag(s) Vᵀ`` with seeded random orthogonal ``U``, ``V`` (float64), and ``U``, ``V``."""
    g = torch.Generator().manual_seed(seed)
    n = len(s)
    u = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (u * s) @ v.T, u, v


def test_issue_reproduction_warm_power_iteration_misses_an_overtaking_singular_value() -> None:
    """Issue 12: 64x64, singular values linspace(1, 0.1), warm start, then sigma_2 raised to 1.05."""
    s = torch.linspace(1.0, 0.1, 64, dtype=torch.float64)
    w_old, u, v = _with_singular_values(s)
    _, warm = spectral_norm_power(w_old.float(), None, 500)  # the previous probe's converged vector
    s_new = s.clone()
    s_new[1] = 1.05  # known answer: ||W_new||_2 = 1.05
    w_new = ((u * s_new) @ v.T).float()
    # before (the StabilityMonitor's method): 5 warm iterations stay on the old direction and read 1.0000
    before = float(spectral_norm_power(w_new, warm, 5)[0])
    assert before == pytest.approx(1.0, abs=1e-4)
    # after: exact at this size, and the tolerance-driven subspace iteration from the same warm start
    exact = exact_spectral_norm(w_new)
    assert exact.method == "exact" and float(exact.sigma) == pytest.approx(1.05, rel=1e-6)
    it = exact_spectral_norm(w_new, warm, exact_max_dim=0, rtol=1e-6)
    assert it.method == "subspace" and it.converged
    assert float(it.sigma) == pytest.approx(1.05, rel=1e-6)


@pytest.mark.parametrize("shape", [(48, 48), (80, 30), (30, 80)])
def test_subspace_iteration_meets_its_tolerance(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g)  # Gaussian: the top singular values are close (a hard case)
    true = float(torch.linalg.matrix_norm(w.double(), 2))
    for rtol in (1e-3, 1e-6):
        res = exact_spectral_norm(w, exact_max_dim=0, rtol=rtol)
        assert res.converged and res.iterations >= 1
        assert float(res.sigma) <= true * (1 + 1e-6)  # a Ritz value never exceeds the top singular value
        assert abs(float(res.sigma) - true) / true <= rtol / 2  # the stated guarantee
        assert res.v is not None and float(res.v.norm()) == pytest.approx(1.0)


def test_exact_path_up_to_the_threshold_and_dtypes() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20, 12, generator=g)
    res = exact_spectral_norm(w)
    assert res.method == "exact" and res.v is None and res.sigma.dtype == torch.float32
    torch.testing.assert_close(res.sigma, torch.linalg.matrix_norm(w, 2))
    assert exact_spectral_norm(w.double()).sigma.dtype == torch.float64
    assert exact_spectral_norm(w, exact_max_dim=11).method == "subspace"  # min(20, 12) = 12 > 11
    assert exact_spectral_norm(w, exact_max_dim=12).method == "exact"
    assert EXACT_MAX_DIM >= 512


def test_max_iter_reports_non_convergence() -> None:
    s = torch.cat([torch.tensor([1.0, 0.999, 0.998]), torch.linspace(0.9, 0.1, 61)]).double()
    w, _, _ = _with_singular_values(s, seed=3)
    res = exact_spectral_norm(w, exact_max_dim=0, subspace_size=2, max_iter=2, rtol=1e-12)
    assert not res.converged and res.iterations == 2 and float(res.sigma) <= 1.0 + 1e-12


def test_warm_start_changes_nothing_but_the_start() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
    cold = exact_spectral_norm(w, exact_max_dim=0, rtol=1e-8)
    w2 = w + 1e-4 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    true = float(torch.linalg.matrix_norm(w2, 2))
    for v0 in (cold.v, torch.zeros(64), torch.full((64,), float("nan")), torch.ones(3)):  # usable or ignored
        warm = exact_spectral_norm(w2, v0, exact_max_dim=0, rtol=1e-8)
        assert warm.converged and float(warm.sigma) == pytest.approx(true, rel=1e-8)


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="expected a matrix"):
        exact_spectral_norm(torch.ones(3))
    with pytest.raises(ValueError, match="rtol=0 must be positive"):
        exact_spectral_norm(torch.ones(3, 3), rtol=0)
    with pytest.raises(ValueError, match="max_iter=0"):
        exact_spectral_norm(torch.ones(3, 3), max_iter=0)
    with pytest.raises(ValueError, match="subspace_size=1 must be >= 2"):
        exact_spectral_norm(torch.ones(3, 3), subspace_size=1)


def test_zero_matrix() -> None:
    assert float(exact_spectral_norm(torch.zeros(4, 3)).sigma) == 0.0
    assert float(exact_spectral_norm(torch.zeros(4, 3), exact_max_dim=0).sigma) == 0.0


def test_doctests() -> None:
    assert doctest.testmod(stability, raise_on_error=False).failed == 0
