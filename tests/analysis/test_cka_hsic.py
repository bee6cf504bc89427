"""CKA and HSIC estimators against their definitions (moved here from tests/callbacks/test_information_flow.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from pdelightning.analysis.cka import cka_matrix, gram_linear, hsic_biased, hsic_unbiased, linear_cka


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hsic_u_statistic(K: Tensor, L: Tensor) -> float:
    """Song et al. (2012) HSIC_1 by its definition: the U-statistic over ordered distinct 4-tuples."""
    K, L = K.double().tolist(), L.double().tolist()
    n = len(K)
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i][j] * L[i][j] + K[i][j] * L[q][r] - 2 * K[i][j] * L[i][q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def _hsic_closed_form_loops(K: Tensor, L: Tensor) -> float:
    """The closed form of Song et al. (2012, eq. 5), written with plain loops over entries."""
    K, L = K.double().tolist(), L.double().tolist()
    n = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, Kt))
    sum_l = sum(map(sum, Lt))
    one_kl_one = sum(Kt[i][j] * Lt[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * one_kl_one) / (n * (n - 3))


def test_hsic_unbiased_matches_u_statistic_and_loop_formula():
    g = _gen(1)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 5, generator=g)
    y = y + x[:, :1]  # dependent, so the value is not ≈ 0
    K, L_ = gram_linear(x), gram_linear(y)
    got = float(hsic_unbiased(K, L_))
    assert got == pytest.approx(_hsic_u_statistic(K, L_), rel=1e-10)
    assert got == pytest.approx(_hsic_closed_form_loops(K, L_), rel=1e-10)
    # a non-linear (RBF) kernel too: the estimator is kernel-agnostic
    rbf = torch.exp(-(torch.cdist(x.double(), x.double()) ** 2))
    assert float(hsic_unbiased(rbf, L_)) == pytest.approx(_hsic_u_statistic(rbf, L_), rel=1e-10)


def test_hsic_biased_matches_centering_matrix():
    g = _gen(2)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64)
    K, L_ = x @ x.T, y @ y.T
    H = torch.eye(9, dtype=torch.float64) - 1.0 / 9
    assert float(hsic_biased(K, L_)) == pytest.approx(float(torch.trace(K @ H @ L_ @ H)) / 64, rel=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_identity_orthogonal_and_scaling_invariance(unbiased: bool):
    g = _gen(3)
    x = torch.randn(50, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert float(linear_cka(x, x, unbiased)) == pytest.approx(1.0, abs=1e-6)
    assert float(linear_cka(x, x @ q, unbiased)) == pytest.approx(1.0, abs=1e-5)
    assert float(linear_cka(x, -3.7 * x, unbiased)) == pytest.approx(1.0, abs=1e-6)
    y = torch.randn(50, 6, generator=g)
    base = float(linear_cka(x, y, unbiased))
    assert float(
        linear_cka(2.5 * x @ q, y @ torch.linalg.qr(torch.randn(6, 6, generator=g))[0], unbiased)
    ) == pytest.approx(base, abs=1e-5)
    # not invariant to a general (non-orthogonal) linear map: CKA is not just a rank test
    skew = torch.diag(torch.logspace(0, 3, 12))
    assert float(linear_cka(x, x @ skew, unbiased)) < 0.99


def test_cka_of_independent_representations_unbiased_near_zero_biased_not():
    g = _gen(4)
    unb, bia = [], []
    for _ in range(5):
        x, y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
        unb.append(float(linear_cka(x, y)))
        bia.append(float(linear_cka(x, y, unbiased=False)))
    assert max(abs(v) for v in unb) < 0.06
    assert min(bia) > 0.5  # the biased estimator's known inflation when features outnumber samples


def test_cka_matrix_matches_pairwise_and_dtype():
    g = _gen(5)
    xs = [torch.randn(20, p, generator=g) for p in (5, 7, 3)]
    xs.append(xs[0] @ torch.randn(5, 5, generator=g))
    for unbiased in (True, False):
        m = cka_matrix(xs, unbiased=unbiased)
        ref = torch.tensor([[float(linear_cka(a, b, unbiased)) for b in xs] for a in xs])
        torch.testing.assert_close(m, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(m.diagonal(), torch.ones(4), atol=1e-6, rtol=0)
        torch.testing.assert_close(m, m.T)
        rect = cka_matrix(xs[:2], xs[1:], unbiased=unbiased)
        assert rect.shape == (2, 3)
        torch.testing.assert_close(rect, ref[:2, 1:], atol=1e-6, rtol=0)
    assert m.dtype == torch.float32
    assert linear_cka(xs[0].double(), xs[1].double()).dtype == torch.float64


def test_cka_errors_and_constant_representation():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(x, x)
    assert float(linear_cka(x, x, unbiased=False)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="same n samples"):
        cka_matrix([torch.randn(5, 2), torch.randn(6, 2)])
    with pytest.raises(ValueError, match="at least one"):
        cka_matrix([])
    assert math.isnan(float(linear_cka(torch.ones(8, 3), torch.randn(8, 3))))
