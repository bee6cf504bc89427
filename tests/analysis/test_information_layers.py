"""The all-layers estimators equal their one-layer counterparts, layer by layer (the callback's values unchanged)."""

from __future__ import annotations

import doctest

import pytest
import torch

from pdelightning.analysis import information_layers
from pdelightning.analysis.information import kde_mutual_information
from pdelightning.analysis.information_layers import (
    crossfit_probe_information_layers,
    kde_information_layers,
    kde_mutual_information_layers,
)
from pdelightning.analysis.linear_probe import crossfit_probe_information


def _layers(n: int = 120, d: int = 16, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Four layers on the same samples: noise, an offset and scaled cloud, a class code, a constant layer."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    code = torch.nn.functional.one_hot(y, d).double() * 3 + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.stack([noise, 50.0 + 7.0 * noise.roll(1, 0), code, torch.ones(n, d, dtype=torch.float64)])
    return t, y


def test_doctests() -> None:
    assert doctest.testmod(information_layers).failed == 0


@pytest.mark.parametrize("noise_variance, relative", [(0.12, True), (0.1, False), (40.0, False)])
def test_kde_of_all_layers_equals_each_layer(noise_variance: float, relative: bool) -> None:
    t, y = _layers()
    i_xt, i_ty = kde_mutual_information_layers(t, y, noise_variance, relative)
    for layer in range(len(t)):
        expected = kde_mutual_information(t[layer], y, noise_variance, relative)
        assert (float(i_xt[layer]), float(i_ty[layer])) == pytest.approx(expected, abs=1e-9)
    assert float(i_xt[3]) == pytest.approx(0.0, abs=1e-12)  # one point: no spread, no information
    assert torch.equal(kde_information_layers(t, noise_variance, relative), i_xt)  # I(X;T) alone: the same


@pytest.mark.parametrize("folds", [2, 5])
def test_crossfit_probe_of_all_layers_equals_each_layer(folds: int) -> None:
    t, y = _layers()
    bound, h_y = crossfit_probe_information_layers(t, y, folds=folds, seed=3)
    for layer in range(len(t)):
        expected = crossfit_probe_information(t[layer], y, folds=folds, seed=3)
        assert (float(bound[layer]), h_y) == pytest.approx(expected, abs=1e-9)
    assert float(bound[2]) > 1.5 > float(bound[0])  # the class code carries the labels, the noise does not


def test_crossfit_refuses_a_single_layer_shape() -> None:
    with pytest.raises(ValueError, match=r"expected t \[L, N, d\]"):
        crossfit_probe_information_layers(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long))
