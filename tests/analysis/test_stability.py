"""analysis.stability: spectral norms to a tolerance (issue 12), eq. (21), loss scans, the representation statistics."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import Tensor

from pdelightning.analysis import stability
from pdelightning.analysis.cka import linear_cka
from pdelightning.analysis.representation import pool_tokens
from pdelightning.analysis.stability import (
    EXACT_MAX_DIM,
    attention_spectra,
    eq21_number,
    exact_spectral_norm,
    relative_drift,
    representation_sums,
    scan_losses,
    spectral_norm_power,
    summarize_representations,
)


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


# ---- moved from tests/callbacks/test_stability_monitor.py (the pure functions StabilityMonitor uses) ----------
def test_spectral_norm_power_against_matrix_norm() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 24, generator=g)
    true = float(torch.linalg.matrix_norm(W, ord=2))
    sigma, v = spectral_norm_power(W, None, 200)
    assert abs(float(sigma) - true) / true < 1e-4
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(spectral_norm_power(W, None, 3)[0]) <= true * (1 + 1e-6)  # a lower bound at every iteration
    # warm start: the weights moved a little since the last probe; 2 iterations from the old vector suffice
    W2 = W + 1e-2 * torch.randn(32, 24, generator=g)
    true2 = float(torch.linalg.matrix_norm(W2, ord=2))
    warm = abs(float(spectral_norm_power(W2, v, 2)[0]) - true2) / true2
    cold = abs(float(spectral_norm_power(W2, None, 2)[0]) - true2) / true2
    assert warm < 1e-4 < 1e-2 < cold
    # unusable warm starts fall back to the seeded cold start
    for bad in (torch.zeros(24), torch.ones(7), torch.full((24,), float("nan"))):
        assert float(spectral_norm_power(W, bad, 5)[0]) == float(spectral_norm_power(W, None, 5)[0])
    assert float(spectral_norm_power(torch.diag(torch.tensor([3.0, -5.0, 1.0])), None, 50)[0]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="expected a matrix"):
        spectral_norm_power(torch.ones(3))
    with pytest.raises(ValueError, match="n_iter=0"):
        spectral_norm_power(W, None, 0)


def test_eq21_number_by_hand() -> None:
    # 2 * 0.5 * 0.1 / 0.5**2 + |-2| * 0.1 * 3 = 0.4 + 0.6
    assert eq21_number(torch.tensor([0.1, 0.5, 0.2]), -2.0, 0.1, 0.5, 3.0) == pytest.approx(1.0)
    assert eq21_number(torch.tensor([0.0]), 1.0, 0.25, 1.0, 2.0) == pytest.approx(0.5)  # no diffusion
    assert eq21_number(0.25, 0.0, 1.0, 1.0, 10.0) == pytest.approx(0.5)  # scalar D, no attention


def test_scan_losses() -> None:
    scan = scan_losses([1.0, float("inf"), 1.0, 1.0, 10.0, 1.0], None, 0, decay=0.9, spike_factor=3.0, warmup=3)
    assert [i for i, _ in scan.nonfinite] == [1]
    assert scan.spikes == [(4, 10.0, pytest.approx(1.0))]
    # the spike enters clipped to 3 x EMA: 0.9 + 0.1 * 3 = 1.2, then 0.9 * 1.2 + 0.1 = 1.18
    assert scan.ema == pytest.approx(1.18) and scan.count == 5
    # no spikes before the warm-up, none at all without a factor, the state carries over between calls
    assert not scan_losses([1.0, 10.0], None, 0, warmup=3).spikes
    assert not scan_losses([1.0] * 5 + [100.0], None, 0, spike_factor=None, warmup=0).spikes
    assert scan_losses([10.0], 1.0, 50, decay=0.5, warmup=3).spikes == [(0, 10.0, 1.0)]


def test_relative_drift_and_pooling() -> None:
    g = torch.Generator().manual_seed(0)
    u0, h = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g)
    assert relative_drift(h, u0) == pytest.approx(float((h - u0).flatten().norm() / u0.flatten().norm()), rel=1e-6)
    assert relative_drift(u0, u0) == 0.0
    assert torch.equal(pool_tokens(h), h.mean(1)) and torch.equal(pool_tokens(h[:, 0]), h[:, 0])


def test_noise_around_a_small_loss_is_not_a_spike() -> None:
    # 0.44 is 7x an EMA of 0.06 but only 0.38 above it: batch noise late in training, not an instability.
    quiet = scan_losses([0.06] * 30 + [0.44, 0.06], ema=None, count=0, decay=0.9, spike_factor=3.0, warmup=20)
    assert quiet.spikes == []
    loud = scan_losses([0.06] * 30 + [2.5, 0.06], ema=None, count=0, decay=0.9, spike_factor=3.0, warmup=20)
    assert [i for i, _, _ in loud.spikes] == [30]
    # with atol=0 the relative rule alone decides
    strict = scan_losses([0.06] * 30 + [0.44], ema=None, count=0, decay=0.9, spike_factor=3.0, warmup=20, atol=0.0)
    assert [i for i, _, _ in strict.spikes] == [30]


# ---- the representation statistics of StabilityMonitor ---------------------------------------------------------
def _sums_over(batches: list[tuple[Tensor, list[Tensor], Tensor | None]], names: list[str]) -> dict[str, Tensor]:
    """:func:`representation_sums` of every batch, concatenated over samples (what the gathered store holds)."""
    parts: dict[str, list[Tensor]] = {}
    for u0, hs, valid in batches:
        update = representation_sums(names[0], u0, None, valid)
        for n, h in zip(names[1:], hs, strict=True):
            update |= representation_sums(n, h, u0, valid)
        for k, v in update.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def test_summary_matches_a_direct_computation_over_the_whole_probe_set() -> None:
    g = torch.Generator().manual_seed(1)
    u0, h = torch.randn(10, 5, 3, generator=g), torch.randn(10, 5, 3, generator=g)
    wide = torch.randn(10, 2, 6, generator=g)  # another shape (a stage after patch merging): no drift
    names = ["embedding", "a", "wide"]
    sums = _sums_over([(u0[:4], [h[:4], wide[:4]], None), (u0[4:], [h[4:], wide[4:]], None)], names)
    emb, a, w = summarize_representations(sums, names)
    rms0 = float(u0.pow(2).mean().sqrt())
    assert emb.rms == pytest.approx(rms0, rel=1e-6) and emb.drift is None and emb.cka is None
    assert a.drift == pytest.approx(relative_drift(h, u0), rel=1e-5)
    assert a.rms == pytest.approx(float(h.pow(2).mean().sqrt()), rel=1e-6)
    assert a.rms_growth == pytest.approx(a.rms / emb.rms, rel=1e-12)
    assert a.cka == pytest.approx(float(linear_cka(u0.mean(1), h.mean(1))), abs=1e-5)
    assert w.drift is None and w.cka == pytest.approx(float(linear_cka(u0.mean(1), wide.mean(1))), abs=1e-5)
    assert a.count == 150 and a.bad == 0 and a.nonfinite == 0.0


def test_summary_counts_valid_tokens_and_non_finite_values_only() -> None:
    u0 = torch.ones(2, 3, 2)
    h = torch.full((2, 3, 2), 2.0)
    h[0, 2] = float("nan")  # at a padding position: not counted
    h[1, 0, 1] = float("inf")  # at a valid one: 1 bad value
    valid = torch.tensor([[True, True, False], [True, True, True]])
    names = ["embedding", "a"]
    emb, a = summarize_representations(_sums_over([(u0, [h], valid)], names), names)
    assert emb.count == a.count == 10  # 5 valid tokens x 2 features
    assert a.bad == 1 and a.nonfinite == pytest.approx(0.1)
    assert emb.cka is None  # fewer than 4 samples
    clean = h.clone()
    clean[1, 0, 1] = 2.0
    _, c = summarize_representations(_sums_over([(u0, [clean], valid)], names), names)
    assert c.rms == pytest.approx(2.0) and c.rms_growth == pytest.approx(2.0)
    assert c.drift == pytest.approx(1.0)  # ||2 - 1|| / ||1|| over the valid tokens


def test_attention_spectra_against_matrix_norm() -> None:
    g = torch.Generator().manual_seed(2)
    w_o, w_v = torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    s_o, s_vo = attention_spectra(w_o, w_v)
    assert s_o == pytest.approx(float(torch.linalg.matrix_norm(w_o, ord=2)), rel=1e-5)
    assert s_vo == pytest.approx(float(torch.linalg.matrix_norm(w_o @ w_v, ord=2)), rel=1e-5)
    assert attention_spectra(w_o, None)[1] is None and attention_spectra(w_o, torch.ones(3, 6))[1] is None
    bad = w_o.clone()
    bad[0, 0] = float("nan")
    assert attention_spectra(bad, w_v) == (math.inf, math.inf)
