"""The perturbation math of PerturbationEval against known answers (moved here from tests/callbacks/)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from pdelightning.analysis import perturbation
from pdelightning.analysis.perturbation import (
    DEFAULT_EPSILONS,
    amplification,
    copies_per_forward,
    correct_predictions,
    critical_epsilon,
    finite_mean,
    format_eps,
    gaussian_noise,
    per_sample_rms,
    scale_rows,
)


def test_doctests() -> None:
    assert doctest.testmod(perturbation, raise_on_error=False).failed == 0


def test_format_eps() -> None:
    assert format_eps(1e-3) == "1e-03"
    assert format_eps(1.0) == "1e+00"
    assert format_eps(10**-3.5) == "3.16e-04"
    assert len({format_eps(e) for e in DEFAULT_EPSILONS}) == 11


def test_critical_epsilon_on_hand_made_curves() -> None:
    eps = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert critical_epsilon(eps, [1.0, 1.1, 1.9, 2.1, 5.0], 1.0) == 1e-1
    assert critical_epsilon(eps, [1.0, 1.1, 1.9, 2.1, 5.0], 1.0, factor=1.5) == 1e-2
    assert critical_epsilon(eps, [1.0, 1.1, 2.0, 2.0, 2.0], 1.0) != critical_epsilon(
        eps, [1.0, 1.1, 2.0, 2.0, 2.1], 1.0
    )
    assert math.isnan(critical_epsilon(eps, [1.0, 1.1, 2.0, 2.0, 2.0], 1.0))  # exactly 2x does not depart
    assert critical_epsilon(eps, [1.0, float("inf"), 1.0, 1.0, 1.0], 1.0) == 1e-3  # a diverged forward departs
    assert critical_epsilon(eps[::-1], [5.0, 2.1, 1.9, 1.1, 1.0], 1.0) == 1e-1  # order of the grid does not matter
    assert math.isnan(critical_epsilon(eps, [1.0] * 5, float("nan")))
    with pytest.raises(ValueError, match="2 losses"):
        critical_epsilon(eps, [1.0, 2.0], 1.0)


def test_noise_is_per_sample_and_shard_invariant() -> None:
    idx = torch.arange(8)
    z = gaussian_noise(idx, [5, 3], seed=3)
    for rank in range(2):  # a strided shard as ProbeSet makes them
        assert torch.equal(gaussian_noise(idx[rank::2], [5, 3], seed=3), z[rank::2])
    assert torch.equal(gaussian_noise(idx, [5, 3], seed=3), z)  # deterministic
    assert not torch.equal(gaussian_noise(idx, [5, 3], seed=4), z)  # the seed matters
    assert not torch.equal(z[0], z[1])  # samples differ
    # with a padding mask: zero at padding, and the same draws whatever the padded length
    valid = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    zm = gaussian_noise(idx[:2], [5, 3], seed=3, valid=valid)
    assert zm[0, 2:].abs().sum() == 0 and zm[1, 4:].abs().sum() == 0
    longer = torch.cat([valid, torch.zeros(2, 3, dtype=torch.bool)], 1)
    assert torch.equal(gaussian_noise(idx[:2], [8, 3], seed=3, valid=longer)[:, :5], zm)


def test_per_sample_rms_and_amplification() -> None:
    u = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    assert torch.allclose(per_sample_rms(u), torch.tensor([2.5, 1.0]))
    valid = torch.tensor([[True, False], [True, True]])
    assert torch.allclose(per_sample_rms(u, valid), torch.tensor([12.5**0.5, 1.0]))
    dh0 = torch.randn(3, 4, 5)
    assert torch.equal(amplification(dh0, dh0), torch.ones(3))  # identity layer
    assert torch.equal(amplification(2 * dh0, dh0), torch.full((3,), 2.0))  # doubling layer
    dh = dh0.clone()
    dh[:, 3] = 100.0  # a change at a padded position is not counted
    assert torch.allclose(amplification(dh, dh0, torch.tensor([[True, True, True, False]] * 3)), torch.ones(3))
    assert torch.isnan(amplification(dh0, torch.zeros(3, 4, 5))).all()


def test_batching_helpers() -> None:
    # 2^25 attention elements: T = 1024 allows 32 rows, so 4 copies of an 8-row batch; never fewer than one copy
    assert copies_per_forward(8, 1024, 4096) == 4 and copies_per_forward(64, 1024, 4096) == 1
    assert copies_per_forward(8, 1, 20) == 2  # max_rows binds for short inputs
    x = torch.ones(3, 2, 2, dtype=torch.float64)
    assert (scale_rows(torch.tensor([1.0, 2.0, 3.0]), x) * x).sum((1, 2)).tolist() == [4.0, 8.0, 12.0]
    assert scale_rows(torch.tensor([1.0, 2.0, 3.0]), x).dtype == torch.float64
    logits, labels = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])
    assert correct_predictions(logits, labels).tolist() == [1.0, 1.0, 0.0]
    assert torch.isnan(correct_predictions(torch.zeros(3, 4, 2), labels)).all()  # not a classifier's output
    assert finite_mean(torch.tensor([1.0, float("nan"), 3.0, float("-inf")])) == 2.0
    assert math.isnan(finite_mean(torch.tensor([])))
