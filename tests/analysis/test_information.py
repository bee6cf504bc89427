"""Mutual-information estimators on Gaussian classes with a known I(T;Y) (issue 12, defect 7)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from pdelightning.analysis import estimator_bias as estimator_bias_module
from pdelightning.analysis import information, linear_probe, mi_benchmark
from pdelightning.analysis.information import (
    ESTIMATOR_BIAS,
    KDE_RELATIVE_NOISE,
    bias_is_large,
    binning_mutual_information,
    distinct_entropy_bits,
    entropy_bits,
    kde_mutual_information,
    known_bias,
    probe_mutual_information,
    quantile_bin_codes,
    split_halves,
)
from pdelightning.analysis.linear_probe import (
    crossfit_probe_information,
    fit_lda,
    probe_information,
    stratified_folds,
)
from pdelightning.analysis.mi_benchmark import estimator_bias, gaussian_classes, true_label_information

TRUTH = {8: 2.4862, 64: 2.7985}  # I(T;Y) in bits of gaussian_classes(d), Monte Carlo with 400k samples (± 0.002)


def test_true_information_of_the_test_bed() -> None:
    for d, truth in TRUTH.items():
        value, se = true_label_information(gaussian_classes(d), n_mc=100_000)
        assert se < 0.01 and value == pytest.approx(truth, abs=4 * se + 0.004)


# ---- the probe ----------------------------------------------------------------------------------------------------
def test_crossfit_probe_has_half_the_bias_of_the_halves_logistic_probe() -> None:
    """At N = 256, d = 64 (3 probe sets): the old estimator misses ~0.9 bits (-31 %), the new one ~0.5."""
    mix = gaussian_classes(64)
    old = estimator_bias("probe_logistic", 256, 64, repeats=3, mix=mix, truth=TRUTH[64])[0]
    new = estimator_bias("probe", 256, 64, repeats=3, mix=mix, truth=TRUTH[64])[0]
    assert old < -0.7 and -0.75 < new < 0.0 and new - old > 0.25
    assert new == pytest.approx(ESTIMATOR_BIAS["probe"][(256, 64)], abs=0.15)  # the documented bias


def test_probe_information_is_unclipped_by_default() -> None:
    """An uninformative T: the bound is honestly negative (the price of fitting); clip=True gives the old 0."""
    g = torch.Generator().manual_seed(0)
    t, y = torch.randn(200, 16, generator=g), torch.randint(4, (200,), generator=g)
    bound, h_y = probe_information(t[:100], y[:100], t[100:], y[100:])
    assert bound < 0 and h_y == pytest.approx(entropy_bits(y[100:]))
    assert probe_information(t[:100], y[:100], t[100:], y[100:], clip=True)[0] == 0.0
    assert crossfit_probe_information(t, y)[0] < 0 and crossfit_probe_information(t, y, clip=True)[0] == 0.0


def test_lda_probabilities_match_scikit_learn() -> None:
    """Closed-form shrinkage LDA == sklearn LinearDiscriminantAnalysis(solver='lsqr') with the same shrunk pooled
    covariance (sklearn shrinks each class's covariance and averages them with the priors: the same matrix)."""
    from sklearn.covariance import ShrunkCovariance, ledoit_wolf_shrinkage

    t, y = gaussian_classes(12, n_classes=4).sample(300, seed=0)
    t = t * torch.linspace(0.5, 3.0, 12, dtype=torch.float64)  # unequal scales: standardization matters
    probe = fit_lda(t, y)
    z = ((t - probe.mean) / probe.std).numpy()
    resid = z - torch.stack([torch.from_numpy(z)[y == c].mean(0) for c in range(4)])[y].numpy()
    assert probe.shrinkage == pytest.approx(ledoit_wolf_shrinkage(resid, assume_centered=True), rel=1e-9)
    ref = LinearDiscriminantAnalysis(solver="lsqr", covariance_estimator=ShrunkCovariance(shrinkage=probe.shrinkage))
    expected = torch.from_numpy(ref.fit(z, y.numpy()).predict_proba(z))
    torch.testing.assert_close(probe.log_proba(t, floor=0.0).exp(), expected, atol=1e-7, rtol=1e-6)


def test_probe_handles_classes_missing_from_the_fit() -> None:
    t = torch.tensor([[0.0], [0.1], [5.0], [5.1], [9.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    bound, _ = probe_information(t[:4], y[:4], t[4:], y[4:])  # class 2 never seen: q = floor, CE = log2(1/floor)
    assert math.isfinite(bound) and bound == pytest.approx(-math.log2((1 + 3e-4) / 1e-4), rel=1e-6)


def test_stratified_folds_are_balanced_and_deterministic() -> None:
    y = torch.tensor([0] * 13 + [1] * 7 + [2] * 5)
    fold = stratified_folds(y, 5, seed=3)
    assert torch.equal(fold, stratified_folds(y, 5, seed=3)) and not torch.equal(fold, stratified_folds(y, 5, 4))
    sizes = torch.bincount(fold, minlength=5)
    assert int(sizes.max() - sizes.min()) <= 1
    for c in range(3):
        per = torch.bincount(fold[y == c], minlength=5)
        assert int(per.max() - per.min()) <= 1


def test_crossfit_scores_every_sample_once_with_a_probe_that_never_saw_it() -> None:
    """Known answer: two clusters far apart, but one sample per class sits in the other cluster. Any probe that
    never saw it calls it wrong; a probe that saw it would hedge. Cross-fitting scores each outlier exactly once."""
    y = torch.tensor([0] * 10 + [1] * 10)
    t = torch.where(y[:, None] == 0, torch.zeros(20, 1), torch.full((20, 1), 10.0))
    t[0], t[10] = 10.0, 0.0  # the two swapped samples
    bound, h_y = crossfit_probe_information(t.double() + 0.01 * torch.arange(20)[:, None], y, folds=20)
    assert h_y == 1.0
    # 18 samples with q ≈ 1 and two with q = floor: CE ≈ 2/20 · log2((1 + 2e-4) / 1e-4)
    assert bound == pytest.approx(1.0 - 0.1 * math.log2((1 + 2e-4) / 1e-4), abs=0.05)


# ---- binning and KDE ----------------------------------------------------------------------------------------------
def test_equal_width_bins_lose_resolution_as_n_grows_quantile_bins_keep_occupancy() -> None:
    mix = gaussian_classes(8)
    t, _ = mix.sample(4096, seed=0)
    pcs = information.principal_components(t, 2)
    for col in range(2):
        q = torch.bincount(quantile_bin_codes(pcs, 10)[:, col], minlength=10)
        assert int(q.min()) >= 409 and int(q.max()) <= 410  # 4096 / 10 per bin
    ew = torch.bincount(information.bin_codes(pcs, 10)[:, 0], minlength=10)
    assert int(ew[3:7].sum()) > 0.6 * 4096  # equal width: the 4 central bins of 10 hold most samples
    small, large = estimator_bias("binning", 256, 8, 2, mix, TRUTH[8])[0], estimator_bias("binning", 2048, 8, 2, mix)[0]
    assert large < small - 0.3  # documented: the estimate falls as N grows
    with pytest.raises(ValueError, match=r"bins='log' is not one of \('equal_width', 'quantile'\)"):
        binning_mutual_information(t, torch.zeros(4096), bins="log")


def test_kde_absolute_noise_saturates_on_unit_scale_activations_relative_does_not() -> None:
    t, y = gaussian_classes(8).sample(256, seed=0)  # unit-variance classes
    i_xt, i_ty = kde_mutual_information(t, y, 0.1)
    assert i_xt == pytest.approx(math.log2(256), abs=0.01) and i_ty == pytest.approx(entropy_bits(y), abs=0.01)
    r_xt, r_ty = kde_mutual_information(t, y, KDE_RELATIVE_NOISE, relative=True)
    assert r_xt < math.log2(256) - 1.0
    assert r_ty == pytest.approx(TRUTH[8], abs=0.3)  # documented bias -0.06 bits at N = 256, d = 8
    # relative noise: invariant to the scale of T
    s_xt, s_ty = kde_mutual_information(7.0 * t, y, KDE_RELATIVE_NOISE, relative=True)
    assert (s_xt, s_ty) == pytest.approx((r_xt, r_ty), abs=1e-9)


def test_distinct_entropy_bits_is_the_plug_in_ceiling() -> None:
    x = torch.tensor([[[1, 2]], [[1, 2]], [[3, 4]], [[5, 6]]])
    assert distinct_entropy_bits(x) == 1.5 and distinct_entropy_bits(torch.arange(8)) == 3.0
    # any plug-in I(X;T) = H(T_binned) with T = f(X) stays at or below it
    t = torch.tensor([[0.0], [0.0], [1.0], [2.0]])
    assert binning_mutual_information(t, torch.tensor([0, 0, 1, 1]), n_components=None)[0] <= distinct_entropy_bits(x)


# ---- the bias table -----------------------------------------------------------------------------------------------
def test_bias_table_and_lookup() -> None:
    assert set(ESTIMATOR_BIAS) == set(mi_benchmark.ESTIMATORS)
    for table in ESTIMATOR_BIAS.values():
        assert set(table) == {(n, d) for n in (256, 512, 1024) for d in (8, 64)}
    assert known_bias("probe", 2000, 100) == ESTIMATOR_BIAS["probe"][(1024, 64)]
    assert bias_is_large("kde", 512, 8) and not bias_is_large("probe", 1024, 8)
    with pytest.raises(ValueError, match=r"estimator='mine' is not one of \['binning'"):
        known_bias("mine", 256, 8)


def test_old_probe_signature_still_works() -> None:
    y = torch.arange(40) % 2
    t = torch.eye(2)[y] * 3
    assert probe_mutual_information(t, y, split_halves(y), l2=1e-6)[0] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("module", [information, linear_probe, mi_benchmark, estimator_bias_module])
def test_doctests(module: object) -> None:
    assert doctest.testmod(module, raise_on_error=False).failed == 0


def test_crossfit_moments_equal_fitting_each_fold_on_its_samples() -> None:
    """The per-fold moment shortcut == fit_lda on the other folds' samples, scored on the fold (to 1e-9)."""
    t, y = gaussian_classes(12, n_classes=5).sample(137, seed=2)
    t = t + 50.0  # a common offset: the shortcut centres first
    y[y == 4] = 3  # one class absent everywhere; n_classes=5 keeps it in the model
    bound, h_y = crossfit_probe_information(t, y, folds=4, seed=1, n_classes=5)
    fold = stratified_folds(y, 4, seed=1)
    ce = torch.empty(len(y), dtype=torch.float64)
    for f in range(4):
        held = fold == f
        log_q = fit_lda(t[~held], y[~held], 5).log_proba(t[held])
        ce[held] = -log_q.gather(1, y[held][:, None]).squeeze(1) / math.log(2)
    assert h_y == entropy_bits(y) and bound == pytest.approx(h_y - float(ce.mean()), abs=1e-9)
