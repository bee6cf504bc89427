"""The information estimators against known answers: plug-in entropies, binning, the KDE bound's limits, the
held-out probe (moved here from tests/callbacks/test_layer_mutual_information.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pdelightning.analysis.information import (
    binning_mutual_information,
    entropy_bits,
    is_saturated,
    kde_mutual_information,
    probe_mutual_information,
    split_halves,
)


def _labels(n: int = 240, seed: int = 0) -> torch.Tensor:
    """Labels with a non-uniform distribution (so H(Y) is not just log2 of the class count)."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), n, replacement=True, generator=g)


def test_entropy_bits() -> None:
    assert entropy_bits(torch.tensor([0, 0, 1, 1])) == 1.0
    assert entropy_bits(torch.tensor([3, 3, 3])) == 0.0
    p = torch.tensor([0.5, 0.25, 0.25])
    assert entropy_bits(torch.tensor([0, 0, 1, 2])) == pytest.approx(float(-(p * p.log2()).sum()))


def test_binning_of_a_deterministic_code_of_y() -> None:
    y = _labels()
    h_y = entropy_bits(y)
    # T = one-hot(Y), all units binned: each class is one cell.
    i_xt, i_ty = binning_mutual_information(F.one_hot(y).float(), y, n_bins=10, n_components=None)
    assert i_ty == pytest.approx(h_y, abs=1e-9)
    assert i_xt == pytest.approx(h_y, abs=1e-9)  # I(X;T) = H(T) = H(Y) for a code of Y
    # T = Y embedded in 16 dims, binned on principal components: still one cell per class.
    emb = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    for k in (2, 3):
        i_xt, i_ty = binning_mutual_information(emb[y], y, n_bins=8, n_components=k)
        assert i_ty == pytest.approx(h_y, abs=1e-9)
        assert i_xt == pytest.approx(h_y, abs=1e-9)


def test_binning_of_distinct_points_saturates() -> None:
    n = 64
    t = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 4
    i_xt, i_ty = binning_mutual_information(t, y, n_bins=1000, n_components=None)
    assert i_xt == pytest.approx(math.log2(n))
    assert i_ty == pytest.approx(entropy_bits(y))
    assert is_saturated(i_xt, math.log2(n))
    # Coarse bins on two components stay below the ceiling and are not flagged.
    i_xt, _ = binning_mutual_information(t, y, n_bins=3, n_components=2)
    assert i_xt <= math.log2(9) + 1e-9
    assert not is_saturated(i_xt, math.log2(n))


def test_kde_limits() -> None:
    y = _labels(200)
    t = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    i_xt, i_ty = kde_mutual_information(t, y, noise_variance=1e8)
    assert 0.0 <= i_xt < 1e-6 and 0.0 <= i_ty < 1e-6
    i_xt, i_ty = kde_mutual_information(t, y, noise_variance=1e-4)
    assert i_xt == pytest.approx(math.log2(200), abs=1e-6)
    assert i_ty == pytest.approx(entropy_bits(y), abs=1e-6)
    assert is_saturated(i_xt, math.log2(200))
    # In between: a bound strictly inside (0, log2 N), with I(T;Y) <= H(Y).
    i_xt, i_ty = kde_mutual_information(t, y, noise_variance=4.0)
    assert 0.1 < i_xt < math.log2(200) - 0.5 and 0.0 <= i_ty <= entropy_bits(y)


def test_probe_known_answers_and_ranking() -> None:
    g = torch.Generator().manual_seed(0)
    y = _labels(400)
    separable = 4.0 * F.one_hot(y).float() + 0.1 * torch.randn(400, 4, generator=g)
    independent = torch.randn(400, 8, generator=g)
    i_sep, h_y = probe_mutual_information(separable, y, l2=1e-5)
    assert h_y == pytest.approx(entropy_bits(y[~split_halves(y)]))
    assert i_sep == pytest.approx(h_y, abs=0.05)
    i_ind, _ = probe_mutual_information(independent, y)
    assert 0.0 <= i_ind < 0.1
    # A noisier copy of the same code carries less label information, and the probe ranks it so.
    informative = F.one_hot(y).float() + 0.5 * torch.randn(400, 4, generator=g)
    noisier = F.one_hot(y).float() + 2.0 * torch.randn(400, 4, generator=g)
    i_hi, _ = probe_mutual_information(informative, y)
    i_lo, _ = probe_mutual_information(noisier, y)
    assert i_sep > i_hi > i_lo > i_ind - 1e-9


def test_split_halves_is_stratified_and_deterministic() -> None:
    y = torch.arange(96) % 4  # periodic labels: an even/odd split would separate the classes
    fit = split_halves(y, seed=3)
    assert torch.equal(fit, split_halves(y, seed=3))
    for c in range(4):
        assert int(fit[y == c].sum()) == 12
    assert not torch.equal(fit, split_halves(y, seed=4))
