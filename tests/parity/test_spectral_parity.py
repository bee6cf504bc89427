"""Spectral norms against torch.linalg.matrix_norm(W, 2)."""

from __future__ import annotations

import pytest
import torch

from pdelightning.analysis.stability import eq21_number, exact_spectral_norm, spectral_norm_power


@pytest.mark.parametrize("shape", [(16, 16), (40, 24), (24, 40)])
def test_every_method_against_matrix_norm(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    true = float(torch.linalg.matrix_norm(w, 2))
    assert float(exact_spectral_norm(w).sigma) == pytest.approx(true, rel=1e-12)
    assert float(exact_spectral_norm(w, exact_max_dim=0, rtol=1e-9).sigma) == pytest.approx(true, rel=1e-9)
    assert float(spectral_norm_power(w, None, 400)[0]) == pytest.approx(true, rel=1e-4)


def test_known_answer_and_eq21() -> None:
    w = torch.diag(torch.tensor([0.5, -2.0, 1.0]))  # ||W||_2 = 2
    assert float(exact_spectral_norm(w).sigma) == 2.0
    # eq. (21): 2 D dt / dx^2 + |alpha| dt ||W_O||_2 = 2 * 0.3 * 0.5 / 1 + 1 * 0.5 * 2 = 1.3
    assert eq21_number(torch.tensor([0.1, 0.3]), alpha=-1.0, dt=0.5, dx=1.0, w_o_norm=2.0) == pytest.approx(1.3)
