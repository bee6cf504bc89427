"""CKA with large common offsets (issue 12, defect 2): centring the features keeps it exact."""

from __future__ import annotations

import doctest

import pytest
import torch

from pdelightning.analysis import cka
from pdelightning.analysis.cka import centered_gram, cka_matrix, gram_linear, hsic_unbiased, linear_cka


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64)
    y = x @ torch.randn(32, 48, generator=g, dtype=torch.float64) + 2.0 * torch.randn(256, 48, generator=g).double()
    return x, y


@pytest.mark.parametrize("unbiased", [True, False])
def test_common_offset_does_not_change_cka(unbiased: bool) -> None:
    """Before the fix (uncentred Gram matrices), unbiased linear_cka(X + c, Y + c) for c = 0, 500, 1000, 3000 was
    0.759222, 0.759034, 0.760246, 0.777063 and cka_matrix 0.759222, 0.760623, 0.769307, 0.397848 on this pair."""
    x, y = _pair()
    ref = float(linear_cka(x, y, unbiased))
    assert 0.7 < ref < 0.8
    for c in (0.0, 500.0, 1000.0, 3000.0):
        assert float(linear_cka(x + c, y + c, unbiased)) == pytest.approx(ref, abs=1e-10)
        assert float(cka_matrix([x + c, y + c], unbiased=unbiased)[0, 1]) == pytest.approx(ref, abs=1e-10)
        assert float(cka_matrix([x + c], [y - c], unbiased=unbiased)[0, 0]) == pytest.approx(ref, abs=1e-10)


def test_centring_is_a_no_op_for_the_unbiased_estimator() -> None:
    """HSIC_1(K, L) = HSIC_1(HKH, L): centring changes the numbers only through rounding."""
    x, y = _pair()
    x, y = x[:40], y[:40]
    torch.testing.assert_close(
        hsic_unbiased(gram_linear(x), gram_linear(y)), hsic_unbiased(centered_gram(x), centered_gram(y))
    )
    xc = x - x.mean(0)
    torch.testing.assert_close(centered_gram(x), xc @ xc.T)


def test_constant_representation_is_nan() -> None:
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    assert torch.isnan(linear_cka(torch.ones(16, 4) * 7.0, x))


def test_doctests() -> None:
    assert doctest.testmod(cka, raise_on_error=False).failed == 0
