"""The information-plane estimators of every layer at once (paper §3.3, eq. 3; Figure 4).

A probe of :class:`~pdelightning.callbacks.LayerMutualInformation` estimates ``I(X;T_l)`` and ``I(T_l;Y)`` for
every layer ``l`` on the same ``N`` probe samples and labels. Per layer, the estimators repeat work that depends
only on the labels (folds, class members, label entropy) and run dozens of small operations on ``[N, d]``
tensors. The functions here take the layers stacked, ``t`` ``[L, N, d]``, do the label-only work once and every
tensor operation once for all ``L`` layers. Each returns, layer by layer, the numbers of its one-layer
counterpart up to floating-point rounding (``tests/analysis/test_information_layers.py`` checks ``1e-9``):

* :func:`kde_mutual_information_layers` = :func:`~pdelightning.analysis.information.kde_mutual_information`
  (:func:`kde_information_layers`: its ``I(X;T)`` alone);
* :func:`crossfit_probe_information_layers` =
  :func:`~pdelightning.analysis.linear_probe.crossfit_probe_information`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pdelightning.analysis.information import _LN2, entropy_bits
from pdelightning.analysis.linear_probe import Q_FLOOR, stratified_folds


def _scaled_distances(t: Tensor, noise_variance: float, relative: bool) -> Tensor:
    """``-|t_i - t_j|² / 2σ²`` of each layer ``[L, N, N]`` (float64), σ² per layer as in ``kde_mutual_information``."""
    t = t.detach().double().cpu()
    if relative:  # tr Cov(T_l), floored at the smallest positive double as the one-layer function does
        tv = (t - t.mean(1, keepdim=True)).square().sum(2).mean(1)
        noise = noise_variance * tv.clamp_min(torch.finfo(torch.float64).tiny)
    else:
        noise = torch.full((t.shape[0],), float(noise_variance), dtype=torch.float64)
    sq = t.square().sum(2)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * (t @ t.mT)).clamp_min_(0.0)
    d2.diagonal(dim1=1, dim2=2).fill_(0.0)  # exactly 0 self-distances
    return -d2 / (2.0 * noise[:, None, None])


def _kde_entropy(scaled: Tensor) -> Tensor:
    """The KDE entropy bound of each layer's block of samples ``[L, M, M]``, in bits."""
    m = scaled.shape[-1]
    if m <= 1:
        return torch.zeros(scaled.shape[0], dtype=torch.float64)
    return -(torch.logsumexp(scaled, dim=2) - math.log(m)).mean(1) / _LN2


def kde_information_layers(t: Tensor, noise_variance: float = 0.1, relative: bool = False) -> Tensor:
    """The Gaussian-KDE upper bound on ``I(X;T_l)`` in bits of every layer (Kolchinsky & Tracey, 2017).

    The first value of :func:`~pdelightning.analysis.information.kde_mutual_information` (see it), without the
    class-conditional terms ``I(T;Y)`` needs: ``-1/N Σ_i log2 1/N Σ_j exp(-|t_i - t_j|² / 2σ²)``.

    Args:
        t: representations of ``L`` layers on the same samples, ``[L, N, D]``.
        noise_variance: ``σ²``, or with ``relative`` a fraction of each layer's total variance.
        relative: read ``noise_variance`` relative to each layer's ``tr Cov(T_l)``.

    Returns:
        ``I(X;T)`` ``[L]`` float64.

    Example::

        >>> kde_information_layers(torch.tensor([[[0.0], [10.0]], [[0.0], [0.0]]]), noise_variance=0.01).tolist()
        [1.0, 0.0]
    """
    return _kde_entropy(_scaled_distances(t, noise_variance, relative)) + 0.0  # + 0.0: -0.0 reads 0.0


def kde_mutual_information_layers(
    t: Tensor, y: Tensor, noise_variance: float = 0.1, relative: bool = False
) -> tuple[Tensor, Tensor]:
    """Gaussian-KDE ``(I(X;T_l), I(T_l;Y))`` in bits of every layer (Kolchinsky & Tracey, 2017; Saxe et al., 2018).

    Per layer exactly :func:`~pdelightning.analysis.information.kde_mutual_information` (see it for what the
    numbers mean): ``I(X;T) = -1/N Σ_i log2 1/N Σ_j exp(-|t_i - t_j|² / 2σ²)`` and ``I(T;Y) = I(X;T) - Σ_y p(y)
    I_kde(X;T | Y=y)``, clipped at 0; with ``relative=True`` the noise variance is ``noise_variance · tr Cov(T_l)``.

    Args:
        t: representations of ``L`` layers on the same samples, ``[L, N, D]``.
        y: integer labels ``[N]``.
        noise_variance: ``σ²``, or with ``relative`` a fraction of each layer's total variance.
        relative: read ``noise_variance`` relative to each layer's ``tr Cov(T_l)``.

    Returns:
        ``(I(X;T), I(T;Y))``, each ``[L]`` float64.

    Example::

        >>> t = torch.tensor([[[0.0], [0.0], [10.0], [10.0]], [[0.0], [0.0], [0.0], [0.0]]])
        >>> i_xt, i_ty = kde_mutual_information_layers(t, torch.tensor([0, 0, 1, 1]), noise_variance=0.01)
        >>> i_xt.tolist(), i_ty.tolist()
        ([1.0, 0.0], [1.0, 0.0])
    """
    y = y.detach().cpu()
    n = t.shape[1]
    scaled = _scaled_distances(t, noise_variance, relative)
    i_xt = _kde_entropy(scaled)
    h_cond = torch.zeros_like(i_xt)
    for c in torch.unique(y):
        member = (y == c).nonzero().flatten()
        h_cond = h_cond + len(member) / n * _kde_entropy(scaled[:, member][:, :, member])
    return i_xt + 0.0, (i_xt - h_cond).clamp_min(0.0) + 0.0  # + 0.0: -0.0 reads 0.0


def _ledoit_wolf_layers(s: Tensor, sum_norm4: Tensor, n: int) -> Tensor:
    """Ledoit-Wolf ``α`` of each ``S`` ``[L, p, p]`` (the one-layer ``_ledoit_wolf`` of :mod:`.linear_probe`)."""
    p = s.shape[-1]
    trace = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)
    mu = trace / p
    s_fro2 = s.square().sum((-2, -1))
    beta = (sum_norm4 / n - s_fro2) / (p * n)
    delta = (s_fro2 - 2.0 * mu * trace + p * mu**2) / p
    beta = torch.minimum(beta, delta)
    return torch.where(beta == 0, torch.zeros_like(beta), beta / delta)


def crossfit_probe_information_layers(
    t: Tensor, y: Tensor, folds: int = 5, seed: int = 0, *, floor: float = Q_FLOOR
) -> tuple[Tensor, float]:
    """Cross-fitted ``I(T_l;Y) >= H(Y) - CE`` in bits of every layer: the variational bound of eq. (3)'s ``I(T;Y)``.

    Per layer exactly :func:`~pdelightning.analysis.linear_probe.crossfit_probe_information` with its defaults
    (Ledoit-Wolf shrinkage, no clipping, ``n_classes = max(y) + 1``): the samples are dealt into ``folds``
    stratified folds, a shrinkage-LDA probe fitted on the other folds scores each fold, and ``CE`` is the mean
    cross-entropy over all ``N`` samples. The folds, class counts and ``H(Y)`` are computed once; the moments and
    the ``d x d`` solves of all layers are batched.

    Args:
        t: features of ``L`` layers on the same samples, ``[L, N, d]``.
        y: labels ``[N]``.
        folds: number of folds ``k >= 2`` (capped at ``N``).
        seed: seed of the fold assignment.
        floor: least probability per class.

    Returns:
        ``(I(T;Y) lower bound [L] float64, H(Y))`` in bits.

    Example::

        >>> y = torch.arange(60) % 3
        >>> t = torch.stack([torch.eye(3, dtype=torch.float64)[y] * 4, torch.zeros(60, 3, dtype=torch.float64)])
        >>> bound, h_y = crossfit_probe_information_layers(t, y)
        >>> round(h_y, 4), round(float(bound[0]), 2), float(bound[1]) <= 0.0  # a constant layer: no information
        (1.585, 1.58, True)
    """
    y = y.detach().long().cpu()
    if t.dim() != 3 or y.shape != (t.shape[1],):
        raise ValueError(f"expected t [L, N, d] and y [N], got {tuple(t.shape)} and {tuple(y.shape)}")
    n_classes = int(y.max()) + 1
    fold = stratified_folds(y, min(folds, len(y)), seed)
    k = int(fold.max()) + 1
    t = t.detach().to(torch.float64).cpu()
    t = t - t.mean(1, keepdim=True)  # the moments below subtract large products: remove a common offset first
    n_layers, d = t.shape[0], t.shape[2]
    cnt = torch.zeros(k, n_classes, dtype=torch.float64).index_put_((fold, y), torch.ones(len(y)).double(), True)
    sums = torch.zeros(n_layers, k * n_classes, d, dtype=torch.float64).index_add_(1, fold * n_classes + y, t)
    sums = sums.view(n_layers, k, n_classes, d)
    held_out = [fold == f for f in range(k)]
    second = torch.stack([t[:, h].mT @ t[:, h] for h in held_out], 1)  # [L, k, d, d]
    ce = torch.empty(n_layers, len(y), dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    log_floor, log_norm = math.log(floor), math.log1p(n_classes * floor)
    for f, held in enumerate(held_out):
        counts, csum, m2 = cnt.sum(0) - cnt[f], sums.sum(1) - sums[:, f], second.sum(1) - second[:, f]
        n = float(counts.sum())
        mean = csum.sum(1) / n  # [L, d]
        std = (torch.diagonal(m2, dim1=-2, dim2=-1) / n - mean.square()).clamp_min(0.0).sqrt().clamp_min(1e-8)
        mu = csum / counts.clamp_min(1.0)[:, None]  # raw class means [L, C, d]
        scatter = m2 - csum.mT @ mu
        s = scatter / n / (std[:, :, None] * std[:, None, :])
        train_t, train_y = t[:, ~held], y[~held]
        norm4 = ((train_t - mu[:, train_y]) / std[:, None]).square().sum(2).square().sum(1)
        means = (mu - mean[:, None]) / std[:, None]
        alpha = _ledoit_wolf_layers(s, norm4, int(n))[:, None, None]
        diag_mean = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)[:, None, None]
        cov = (1.0 - alpha) * s + alpha * diag_mean * eye + 1e-10 * eye
        weight = torch.linalg.solve(cov, means.mT).mT  # Σ⁻¹ μ_c  [L, C, d]
        bias = -0.5 * (weight * means).sum(2) + torch.log(counts / n)
        z = (t[:, held] - mean[:, None]) / std[:, None]
        log_q = torch.log_softmax(z @ weight.mT + bias[:, None], dim=-1)
        if floor > 0:
            log_q = torch.logaddexp(log_q, torch.full_like(log_q, log_floor)) - log_norm
        picked = log_q.gather(2, y[held][None, :, None].expand(n_layers, -1, 1)).squeeze(2)
        ce[:, held] = -picked / math.log(2.0)
    h_y = entropy_bits(y)
    return h_y - ce.mean(1) + 0.0, h_y  # + 0.0: -0.0 reads 0.0
