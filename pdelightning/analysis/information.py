"""Mutual-information estimators for the information plane ``I(X;T)``, ``I(T;Y)`` (paper §3.3, eq. 3).

For a deterministic network and continuous activations both quantities are ill-posed (``I(X;T)`` is
infinite, or ``log2 N`` for any plug-in estimate on ``N`` distinct samples), so every number here comes
from an *estimator* whose meaning is spelled out in its docstring: plug-in entropies of a binned
representation (:func:`binning_mutual_information`), the Gaussian-KDE pairwise bound
(:func:`kde_mutual_information`), and a held-out probe classifier's variational lower bound
(:func:`probe_mutual_information`; the closed-form, cross-fitted one is in
:mod:`~pdelightning.analysis.linear_probe`); :func:`is_saturated` flags estimates stuck at the ``log2 N`` (or
:func:`distinct_entropy_bits`) ceiling. Each estimator's bias, measured on Gaussian classes with a known
``I(T;Y)`` (:mod:`~pdelightning.analysis.mi_benchmark`), is in :data:`ESTIMATOR_BIAS`; :func:`known_bias` and
:func:`bias_is_large` look it up (all three from :mod:`~pdelightning.analysis.estimator_bias`).
:class:`~pdelightning.callbacks.LayerMutualInformation` is the Lightning adapter.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pdelightning._checks import check_choice
from pdelightning.analysis.estimator_bias import (  # noqa: F401 (re-exported: the measured bias of these estimators)
    ESTIMATOR_BIAS,
    LARGE_BIAS_BITS,
    bias_is_large,
    known_bias,
)

_LN2 = math.log(2.0)
BINNINGS = ("equal_width", "quantile")
KDE_RELATIVE_NOISE = 0.12
"""Noise variance as a fraction of ``tr Cov(T)`` for ``kde_mutual_information(..., relative=True)``: of 0.1, 0.12,
0.14, 0.16, 0.2, 0.3, 0.5 and 1 the one with the smallest worst-case ``I(T;Y)`` bias on the Gaussian test bed
(``d`` = 8 and 64, ``N`` = 256 to 1024)."""


def _codes(rows: Tensor) -> Tensor:
    """Integer id of each distinct row (or value) of ``rows``."""
    rows = rows if rows.dim() > 1 else rows.unsqueeze(1)
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def entropy_bits(labels: Tensor) -> float:
    """Plug-in (empirical) Shannon entropy, in bits, of discrete values or of the distinct rows of a 2-D tensor.

    Example::

        >>> entropy_bits(torch.tensor([0, 1, 2, 3]))
        2.0
        >>> entropy_bits(torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]]))
        1.0
    """
    if labels.numel() == 0:
        return 0.0
    counts = torch.bincount(_codes(labels)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def distinct_entropy_bits(x: Tensor) -> float:
    """Plug-in entropy in bits of the distinct inputs ``x`` ``[N, ...]``: the ceiling of any plug-in ``I(X;T)``.

    On a probe set every estimate of ``I(X;T)`` from the empirical distribution is at most ``H(X_emp)`` (data
    processing: ``T`` is a function of ``X``), which is ``log2 N`` only when the ``N`` inputs are all distinct.
    Repeated inputs (duplicated images, identical short token sequences after padding) lower it, and an estimate
    at *this* ceiling is saturated even when it lies below ``log2 N``.

    Example::

        >>> distinct_entropy_bits(torch.tensor([[1, 2], [1, 2], [3, 4], [5, 6]]))  # 4 inputs, 3 distinct
        1.5
    """
    x = x.detach()
    return entropy_bits(x.reshape(x.shape[0], -1)) if x.dim() > 1 else entropy_bits(x)


def principal_components(t: Tensor, n_components: int | None) -> Tensor:
    """Coordinates of the centred ``t`` ``[N, D]`` on its top ``n_components`` principal axes (SVD); ``None``: ``t``."""
    if n_components is None:
        return t
    tc = t - t.mean(0, keepdim=True)
    u, sv, _ = torch.linalg.svd(tc, full_matrices=False)
    return u[:, :n_components] * sv[:n_components]  # = tc @ V_k


def bin_codes(t: Tensor, n_bins: int) -> Tensor:
    """Discretize each column of ``t`` ``[N, D]`` into ``n_bins`` equal-width bins over its own ``[min, max]``.

    Returns integer bin indices ``[N, D]`` in ``0..n_bins-1`` (a constant column is all ``0``).

    Example::

        >>> bin_codes(torch.tensor([[0.0], [0.49], [0.51], [1.0]]), n_bins=2).flatten().tolist()
        [0, 0, 1, 1]
    """
    lo, hi = t.min(0).values, t.max(0).values
    width = (hi - lo).clamp_min(torch.finfo(t.dtype).tiny)
    return ((t - lo) / width * n_bins).floor().clamp(0, n_bins - 1).long()


def quantile_bin_codes(t: Tensor, n_bins: int) -> Tensor:
    """Discretize each column of ``t`` ``[N, D]`` into ``n_bins`` bins holding equal numbers of samples.

    The bin edges are the column's empirical quantiles ``k / n_bins``; a value on an edge goes to the upper bin.
    Unlike :func:`bin_codes`, an outlier does not stretch the bins: each bin keeps ``≈ N / n_bins`` samples
    whatever the range (ties, e.g. many exact zeros after a ReLU, share one bin).

    Example::

        >>> quantile_bin_codes(torch.tensor([[0.0], [0.1], [0.2], [100.0]]), n_bins=2).flatten().tolist()
        [0, 0, 1, 1]
    """
    probs = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1].to(t)
    edges = torch.quantile(t, probs, dim=0).T.contiguous()  # [D, n_bins - 1]
    return torch.searchsorted(edges, t.T.contiguous(), right=True).T.long()


def binning_mutual_information(
    t: Tensor, y: Tensor, n_bins: int = 10, n_components: int | None = 2, bins: str = "equal_width"
) -> tuple[float, float]:
    """Plug-in ``(I(X;T), I(T;Y))`` in bits after discretizing ``T`` (Shwartz-Ziv & Tishby, 2017).

    ``T`` ``[N, D]`` is projected on its top ``n_components`` principal components (``None``: all units, the
    classic "binning every neuron") and each component is cut into ``n_bins`` bins, equal-width over its range
    (:func:`bin_codes`, ``bins="equal_width"``, the default and the classic choice) or holding equal numbers of
    samples (:func:`quantile_bin_codes`, ``bins="quantile"``); the cell of a sample is its code. The network is
    deterministic and every probe sample is a distinct ``X``, so ``H(T|X) = 0`` and ``I(X;T) = H(T_binned)``;
    ``I(T;Y) = H(T) - H(T|Y) = H(T) + H(Y) - H(T,Y)``.

    What it measures: the entropy of a coarse-graining of the representation, not a property of the network
    alone — it depends on ``n_bins`` and ``n_components``, is capped by ``log2 min(N, n_bins**n_components)``,
    and with many bins or all units every sample gets its own cell, so the estimate saturates at
    ``I(X;T) = log2 N`` and ``I(T;Y) = H(Y)`` whatever the network does (see :func:`is_saturated`).

    Bias of ``I(T;Y)`` (:data:`ESTIMATOR_BIAS`, against the true ``I(T;Y)`` of ``d``-dimensional Gaussian
    classes): -0.62 / -0.83 / -0.98 bits at ``N`` = 256 / 512 / 1024 (``d = 8``), -1.07 / -1.34 / -1.52 (``d = 64``),
    with equal-width bins; -0.14 / -0.50 / -0.76 and -0.58 / -0.95 / -1.28 with quantile bins. Three effects:
    two principal components hold only part of the label information (the large-``N`` limit, about -1.1 bits at
    ``d = 8`` and -1.7 at ``d = 64`` for either rule); the plug-in entropies of 100 cells overestimate at small
    ``N`` (an upward bias that fades as ``N`` grows, so the estimate *falls* with ``N``); and equal-width bins
    stretch with each component's range, which grows with ``N`` (the extremes of more draws lie further out),
    moving more samples into the few central bins. Quantile bins remove the third effect (each bin keeps
    ``N / n_bins`` samples whatever the range), not the first two. Read binning as the entropy of a coarse
    2-D summary, comparable across layers and steps at one ``N``, not as ``I(T;Y)``.

    Args:
        t: representations ``[N, D]``.
        y: integer labels ``[N]``.
        n_bins: bins per component.
        n_components: principal components kept, or ``None`` for all units.
        bins: ``"equal_width"`` or ``"quantile"``.

    Raises:
        ValueError: for another ``bins``.

    Example::

        >>> y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        >>> binning_mutual_information(torch.eye(4)[y], y, n_components=None)
        (2.0, 2.0)
    """
    check_choice("bins", bins, BINNINGS)
    t = t.detach().double().cpu()
    y = y.detach().cpu()
    binned = bin_codes if bins == "equal_width" else quantile_bin_codes
    codes = binned(principal_components(t, n_components), n_bins)
    h_t = entropy_bits(codes)
    h_ty = entropy_bits(torch.cat([codes, y.long().unsqueeze(1)], 1))
    i_ty = h_t + entropy_bits(y) - h_ty
    return h_t, max(0.0, i_ty)


def squared_distances(t: Tensor) -> Tensor:
    """All pairwise squared Euclidean distances ``[N, N]`` of the rows of ``t`` (float64), exactly 0 on the diagonal.

    By ``|a|² + |b|² - 2 a·b`` (one matrix product) in float64, clamped at 0: the rounding error is about
    ``1e-16 |t|²``, far below any kernel width in use, and the self-distances are set to exactly 0.

    Example::

        >>> squared_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
        tensor([[ 0., 25.],
                [25.,  0.]], dtype=torch.float64)
    """
    t = t.detach().double().cpu()
    sq = t.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (t @ t.T)).clamp_min_(0.0)
    return d2.fill_diagonal_(0.0)


def _kde_entropy_from_distances(d2: Tensor, noise_variance: float) -> float:
    n = d2.shape[0]
    if n <= 1:
        return 0.0
    log_mix = torch.logsumexp(-d2 / (2.0 * noise_variance), dim=1) - math.log(n)  # log 1/N sum_j K_ij
    return float(-log_mix.mean()) / _LN2


def kde_entropy_bits(t: Tensor, noise_variance: float) -> float:
    """Pairwise-KL upper bound on ``H(T + Z) - H(Z)``, ``Z ~ N(0, sigma^2 I)``, in bits (Kolchinsky & Tracey, 2017).

    ``-1/N sum_i log2 1/N sum_j exp(-||t_i - t_j||^2 / (2 sigma^2))``: between ``0`` (all points within
    ``sigma`` of each other) and ``log2 N`` (all points many ``sigma`` apart).

    Example::

        >>> kde_entropy_bits(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), noise_variance=1e-6)
        2.0
    """
    return _kde_entropy_from_distances(squared_distances(t), noise_variance)


def subsample(n: int, max_samples: int | None, seed: int = 0) -> Tensor:
    """Indices of a seeded, sorted random subset of ``range(n)`` of size ``min(n, max_samples)``."""
    if max_samples is None or n <= max_samples:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_samples].sort().values


def total_variance(t: Tensor) -> float:
    """``tr Cov(T)`` of ``t`` ``[N, D]``: the mean squared distance of a sample to the sample mean.

    Example::

        >>> total_variance(torch.tensor([[0.0, 0.0], [2.0, 4.0]]))
        5.0
    """
    t = t.detach().double()
    return float((t - t.mean(0)).square().sum(1).mean())


def kde_mutual_information(
    t: Tensor, y: Tensor, noise_variance: float = 0.1, relative: bool = False
) -> tuple[float, float]:
    """Gaussian-KDE ``(I(X;T), I(T;Y))`` in bits (Kolchinsky & Tracey, 2017; Saxe et al., 2018).

    The deterministic representation is made stochastic by adding ``Z ~ N(0, sigma^2 I)``; ``T + Z`` is then a
    mixture of ``N`` Gaussians centred on the samples, ``H(T+Z|X) = H(Z)`` and the pairwise-KL bound gives

    ``I(X;T) <= -1/N sum_i log2 1/N sum_j exp(-||t_i - t_j||^2 / (2 sigma^2))`` (an upper bound on the
    mutual information of the *noisy* representation) and, as in Saxe et al.,
    ``I(T;Y) = I(X;T) - sum_y p(y) I_kde(X;T | Y=y)`` with the same bound evaluated within each class.

    What it measures: how many noise-width balls the samples spread over — a function of the geometry and
    scale of ``T`` relative to ``sigma``. ``I(X;T)`` is a true upper bound for the noisy channel; ``I(T;Y)``
    is a difference of two bounds (an estimate, not a bound): it never exceeds ``H(Y)`` (each class's kernel
    sum is part of the full one) but can dip below ``0``, where it is clipped. A huge ``sigma^2`` gives
    ``~0``; a tiny one (or widely spread activations) gives the saturated ``log2 N`` / ``H(Y)``. Cost
    ``O(N^2 D)``.

    **Noise scale.** With an absolute ``sigma^2`` (``relative=False``, the default for backward compatibility)
    the estimate depends on the scale and the width of ``T``: two samples of unit-variance activations in
    ``D`` dimensions lie ``≈ sqrt(2 D)`` apart, so at ``sigma^2 = 0.1`` every kernel but a sample's own is
    ``exp(-D / 0.1)`` ≈ 0 and the estimate is saturated (``log2 N``, ``H(Y)``) for any realistic layer.
    ``relative=True`` reads ``noise_variance`` as a fraction of the total variance ``tr Cov(T)``
    (:func:`total_variance`): ``sigma^2 = noise_variance · tr Cov(T)``. Pairwise distances are then measured in
    units of the cloud's own spread, so the estimate no longer depends on the scale of ``T`` nor (for isotropic
    clouds) on its width; it still depends on the fraction. Measured ``I(T;Y)`` bias (:data:`ESTIMATOR_BIAS`):
    absolute ``0.1`` is saturated on the unit-variance test bed (+0.81 bits at ``d = 8``, +0.50 at ``d = 64``: it
    returns ``H(Y)``); relative :data:`KDE_RELATIVE_NOISE` ``= 0.12``: -0.06 / -0.17 / -0.29 at ``N`` = 256 / 512 /
    1024 (``d = 8``) and +0.34 / +0.22 / +0.01 at ``d = 64``, where distances concentrate and the estimate swings
    from near-saturation to a large underestimate within a factor 1.5 of the fraction (0.1: +0.46 at ``N = 256``;
    0.16: -0.89 at ``N = 1024``): no single noise level is right for every width and ``N``, and ``I(X;T)`` of
    a wide layer stays close to ``log2 N`` at any useful fraction.

    Args:
        t: representations ``[N, D]``.
        y: integer labels ``[N]``.
        noise_variance: ``sigma^2`` of the added Gaussian noise in the units of ``T`` squared, or with
            ``relative=True`` as a fraction of ``tr Cov(T)``.
        relative: read ``noise_variance`` relative to the total variance of ``t``.

    Example::

        >>> t = torch.tensor([[0.0], [0.0], [10.0], [10.0]])
        >>> i_xt, i_ty = kde_mutual_information(t, torch.tensor([0, 0, 1, 1]), noise_variance=0.01)
        >>> round(i_xt, 6), round(i_ty, 6)
        (1.0, 1.0)
    """
    t = t.detach().double().cpu()
    y = y.detach().cpu()
    if relative:  # KDE_RELATIVE_NOISE is the measured choice
        noise_variance = noise_variance * max(total_variance(t), torch.finfo(torch.float64).tiny)
    d2 = squared_distances(t)  # once: the within-class terms are its diagonal blocks
    i_xt = _kde_entropy_from_distances(d2, noise_variance)
    n = len(y)
    h_cond = 0.0
    for c in torch.unique(y):
        member = (y == c).nonzero().flatten()
        h_cond += len(member) / n * _kde_entropy_from_distances(d2[member][:, member], noise_variance)
    return i_xt, max(0.0, i_xt - h_cond)


def split_halves(y: Tensor, seed: int = 0) -> Tensor:
    """A seeded, class-stratified split of probe positions into a fitting half (``True``) and a scoring half.

    Within each class the members (in probe-index order) are shuffled with a generator seeded by ``seed``
    and the class label, and alternately assigned to the two halves. It depends only on the gathered
    labels (ordered by probe index) and the seed, so every rank and every world size gets the same split.
    A strided split (even/odd positions) would be simpler but can put whole classes on one side when the
    labels are periodic in the dataset order.

    Example::

        >>> fit = split_halves(torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))
        >>> int(fit.sum()), int(fit[::2].sum()), int(fit[1::2].sum())
        (4, 2, 2)
    """
    y = y.detach().long().cpu()
    fit = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y):
        members = (y == c).nonzero().flatten()
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(c))
        members = members[torch.randperm(len(members), generator=g)]
        fit[members[0::2]] = True
    return fit


def fit_linear_probe(t: Tensor, y: Tensor, l2: float = 1e-3, max_iter: int = 200) -> Any:
    """Multinomial logistic regression ``softmax(t W + b)`` fitted by scikit-learn's L-BFGS (deterministic).

    Minimizes ``mean CE + l2 ||W||^2`` (``C = 1 / (2 l2 N)`` in scikit-learn's parametrization; convex, so
    the result does not depend on a seed). Returns the fitted ``LogisticRegression``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_np, y_np = t.detach().double().cpu().numpy(), y.detach().long().cpu().numpy()
    clf = LogisticRegression(C=1.0 / (2.0 * l2 * len(y_np)), max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable data: the optimum is far, the fit is fine
        clf.fit(x_np, y_np)
    return clf


def probe_mutual_information(
    t: Tensor, y: Tensor, fit: Tensor | None = None, l2: float = 1e-3, max_iter: int = 200
) -> tuple[float, float]:
    """Variational lower bound ``I(T;Y) >= H(Y) - CE`` in bits, from a held-out probe classifier.

    A linear softmax classifier ``q(y|t)`` (on features standardized with the fitting half's statistics) is
    fitted on the samples where ``fit`` is ``True`` and scored on the rest: ``CE = -mean log2 q(y|t)`` there,
    and ``H(Y)`` is the empirical label entropy of that scoring half. Since ``E[-log q(Y|T)] >= H(Y|T)`` for
    any ``q``, ``H(Y) - CE <= I(T;Y)``: a lower bound (up to the sampling error of the scoring half), tight
    when the classes are linearly decodable from ``T``. It can come out negative for an over-fitted probe
    on an uninformative ``T``; it is clipped at ``0``.

    What it measures: the label information *linearly decodable* from ``T`` — it ranks representations by
    usable information and does not saturate with ``N``. It gives no estimate of ``I(X;T)``.

    Measured bias (:data:`ESTIMATOR_BIAS` ``"probe_logistic"``): -0.35 / -0.11 / -0.06 bits at ``N`` = 256 / 512 /
    1024 with ``d = 8`` and -0.88 / -0.63 / -0.51 with ``d = 64`` (-31 % of the true 2.80 bits at ``N = 256``):
    half the samples fit, the other half score, and an L-BFGS fit per call. The cross-fitted shrinkage-LDA probe
    :func:`~pdelightning.analysis.linear_probe.crossfit_probe_information` is closed-form and has about half the
    bias (-0.16 / -0.04 / -0.01 and -0.54 / -0.25 / -0.12); prefer it, and its unclipped bound.

    Args:
        t: representations ``[N, D]``.
        y: integer labels ``[N]``.
        fit: boolean mask ``[N]`` of the fitting half; default :func:`split_halves` of ``y``.
        l2: L2 penalty on the probe's weights.
        max_iter: L-BFGS iterations.

    Returns:
        ``(I(T;Y) lower bound, H(Y) of the scoring half)``.

    Example::

        >>> y = torch.arange(40) % 2
        >>> i_ty, h_y = probe_mutual_information(torch.eye(2)[y] * 3, y, l2=1e-6)
        >>> h_y, round(i_ty, 2)
        (1.0, 1.0)
    """
    t = t.detach().double().cpu()
    y = y.detach().long().cpu()
    if fit is None:
        fit = split_halves(y)
    fit = fit.cpu().bool()
    score = ~fit
    if fit.sum() < 1 or score.sum() < 1:
        raise ValueError(
            f"the probe estimator needs samples in both halves, got {int(fit.sum())} and {int(score.sum())}"
        )
    h_y = entropy_bits(y[score])
    seen = torch.unique(y[fit])
    if len(seen) < 2:  # one class to learn: q(y|t) = 1 for it, no information beyond the prior
        return 0.0, h_y
    mean = t[fit].mean(0)
    std = t[fit].std(0, unbiased=False).clamp_min(1e-8)
    z = (t - mean) / std
    clf = fit_linear_probe(z[fit], y[fit], l2=l2, max_iter=max_iter)
    proba = torch.from_numpy(clf.predict_proba(z[score].numpy()))  # [N_score, classes seen in the fit half]
    classes = torch.from_numpy(clf.classes_).long()
    col = torch.searchsorted(classes, y[score]).clamp_max(len(classes) - 1)
    q = proba.gather(1, col[:, None]).squeeze(1).where(classes[col] == y[score], torch.zeros(()))
    ce_bits = float(-q.clamp_min(1e-12).log2().mean())  # a class never seen in fitting gets q = 1e-12
    return max(0.0, h_y - ce_bits), h_y


def is_saturated(i_xt: float, log2_n: float, tol: float = 0.1) -> bool:
    """Whether an ``I(X;T)`` estimate sits at the ``log2 N`` ceiling (within ``tol`` bits).

    At the ceiling every probe sample occupies its own bin / noise ball, so the estimator reports
    ``I(X;T) = log2 N`` — and, for binning and KDE, ``I(T;Y) = H(Y)`` — whatever the representation is:
    the point says "the estimator cannot resolve this layer", not "no compression". (The second symptom,
    ``I(T;Y) ~ H(Y)`` together with ``I(X;T) ~ log2 N``, implies the first, so the test is on ``I(X;T)``.)
    When probe inputs repeat, the true ceiling is lower than ``log2 N``: pass
    ``min(log2 N, distinct_entropy_bits(x))`` (:func:`distinct_entropy_bits`) as ``log2_n``.

    Example::

        >>> is_saturated(7.95, log2_n=8.0), is_saturated(5.0, log2_n=8.0)
        (True, False)
    """
    return i_xt >= log2_n - tol
