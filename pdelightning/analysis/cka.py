"""Linear centered kernel alignment (CKA) with the biased and the unbiased HSIC estimators.

CKA compares two representations of the same ``n`` samples, ``X`` ``[n, p]`` and ``Y`` ``[n, q]`` (samples as
rows; the widths may differ), through their linear Gram matrices ``K = X Xᵀ`` and ``L = Y Yᵀ``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

It is invariant to orthogonal transforms and isotropic scaling of either representation, but not to
arbitrary invertible linear maps (Kornblith et al., 2019, "Similarity of Neural Network Representations
Revisited"). With the *biased* estimator ``HSIC_b = tr(K H L H) / (n-1)²`` (``H = I - 11ᵀ/n``) two
independent random representations score well above zero when ``p, q`` are not small against ``n``; the
*unbiased* estimator of Song et al. (2012, "Feature Selection via Dependence Maximization", eq. 5), used for
CKA by Nguyen et al. (2021, "Do Wide and Deep Networks Learn the Same Things?"), removes that bias, so
independent representations score ``≈ 0`` (either sign) and identical ones exactly ``1``.

All arithmetic is done in float64; results come back in the inputs' floating dtype. :func:`linear_cka` and
:func:`cka_matrix` centre the features (subtract each column's mean over the samples) before forming the Gram
matrices. Mathematically a no-op for both estimators (the biased one double-centres ``K`` anyway; the unbiased
U-statistic is unchanged by ``K -> K + a1ᵀ + 1aᵀ``, which is what a common offset ``X -> X + c`` does to a
linear Gram matrix), numerically it is what keeps the result exact: with an offset ``c`` the uncentred Gram
entries grow like ``c² p`` while the HSIC terms that matter stay ``O(1)``, so their difference cancels
catastrophically. Measured (float64, ``n = 256``, ``p = 32``, ``q = 48``, a correlated pair): unbiased
``linear_cka(X + c, Y + c)`` gave 0.759222, 0.759034, 0.760246, 0.777063 and ``cka_matrix`` 0.759222,
0.760623, 0.769307, 0.397848 for ``c = 0, 500, 1000, 3000`` before centring; all 0.759222 (to 1e-12) after.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["centered_gram", "cka_matrix", "gram_linear", "hsic_biased", "hsic_unbiased", "linear_cka"]


def gram_linear(x: Tensor) -> Tensor:
    """The linear-kernel Gram matrix ``K = X Xᵀ`` ``[n, n]`` of ``x`` ``[n, p]`` (float64)."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [n_samples, n_features] tensor, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    return x @ x.T


def centered_gram(x: Tensor) -> Tensor:
    """``K = X_c X_cᵀ`` with ``X_c = X - mean_rows(X)``: the linear Gram matrix of the centred features (float64).

    Example::

        >>> centered_gram(torch.tensor([[1.0], [3.0]]))
        tensor([[ 1., -1.],
                [-1.,  1.]], dtype=torch.float64)
    """
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [n_samples, n_features] tensor, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def _check_grams(K: Tensor, L: Tensor, min_n: int) -> int:  # noqa: N803 (the papers' notation)
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(
            f"expected two square Gram matrices of the same size, got {tuple(K.shape)} and {tuple(L.shape)}"
        )
    n = K.shape[0]
    if n < min_n:
        raise ValueError(f"this HSIC estimator needs at least {min_n} samples, got n={n}")
    return n


def _zero_diagonal(K: Tensor) -> Tensor:  # noqa: N803 (the papers' notation)
    return K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))


def _double_center(K: Tensor) -> Tensor:  # noqa: N803 (the papers' notation)
    """``H K H``: subtract row and column means, add back the grand mean."""
    return K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean((-2, -1), keepdim=True)


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:  # noqa: N803 (the papers' notation)
    """Unbiased HSIC estimator of Song et al. (2012, eq. 5) for Gram matrices ``K``, ``L`` ``[n, n]``, ``n >= 4``.

    With ``K̃``, ``L̃`` the Gram matrices with their diagonals set to zero::

        HSIC_1 = 1 / (n (n-3)) * [ tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1 ]

    which equals the U-statistic ``1/(n)_4 Σ_{i,j,q,r distinct} k_ij l_ij + k_ij l_qr - 2 k_ij l_iq``. It is an
    unbiased estimate of ``HSIC`` and can be slightly negative.

    Args:
        K: symmetric Gram matrix ``[n, n]``.
        L: symmetric Gram matrix ``[n, n]`` of the same samples.

    Returns:
        0-dim float64 tensor.

    Raises:
        ValueError: if the shapes differ or ``n < 4``.

    Example::

        >>> x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> K = x @ x.T
        >>> bool(hsic_unbiased(K, K) > 0)
        True
    """
    n = _check_grams(K, L, 4)
    Kt, Lt = _zero_diagonal(K.to(torch.float64)), _zero_diagonal(L.to(torch.float64))
    trace = (Kt * Lt).sum()  # tr(K̃ L̃) for symmetric L̃
    sums = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (Kt.sum(0) @ Lt.sum(0))  # 1ᵀ K̃ L̃ 1
    return (trace + sums - cross) / (n * (n - 3))


def hsic_biased(K: Tensor, L: Tensor) -> Tensor:  # noqa: N803 (the papers' notation)
    """Biased HSIC estimator ``tr(K H L H) / (n-1)²`` of Gretton et al. (2005), ``H = I - 11ᵀ/n``, ``n >= 2``.

    Args:
        K: symmetric Gram matrix ``[n, n]``.
        L: symmetric Gram matrix ``[n, n]`` of the same samples.

    Returns:
        0-dim float64 tensor.

    Raises:
        ValueError: if the shapes differ or ``n < 2``.
    """
    n = _check_grams(K, L, 2)
    return (_double_center(K.to(torch.float64)) * _double_center(L.to(torch.float64))).sum() / (n - 1) ** 2


def _ratio(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    denom = torch.sqrt(xx * yy)
    return torch.where(
        denom > 0, xy / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.full_like(xy, float("nan"))
    )


def _out_dtype(*xs: Tensor) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = True) -> Tensor:
    """Linear CKA between two representations of the same samples.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X Xᵀ``, ``L = Y Yᵀ`` of the centred features
    (:func:`centered_gram`; see the module docstring for why) and the unbiased
    (:func:`hsic_unbiased`, default) or biased (:func:`hsic_biased`) HSIC estimator. ``CKA(X, X) = 1``; it is
    unchanged by ``X -> c X Q`` for orthogonal ``Q`` and ``c != 0``. NaN when either representation is
    constant across samples (zero self-similarity).

    Args:
        x: ``[n, p]``, one sample per row.
        y: ``[n, q]``, the same samples in the same order.
        unbiased: use the unbiased HSIC estimator (needs ``n >= 4``).

    Returns:
        0-dim tensor in the inputs' floating dtype.

    Raises:
        ValueError: if ``x`` and ``y`` are not 2-D with the same number of rows, or there are too few rows.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 8, generator=g)
        >>> round(float(linear_cka(x, 3 * x)), 6)
        1.0
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
        >>> round(float(linear_cka(x, x @ q)), 6)
        1.0
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x [n, p] and y [n, q] with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    hsic = hsic_unbiased if unbiased else hsic_biased
    K, L = centered_gram(x), centered_gram(y)
    return _ratio(hsic(K, L), hsic(K, K), hsic(L, L)).to(_out_dtype(x, y))


def _hsic_pairwise(ks: Tensor, ls: Tensor, unbiased: bool) -> Tensor:
    """HSIC between every Gram matrix of ``ks`` ``[a, n, n]`` and every one of ``ls`` ``[b, n, n]``: ``[a, b]``."""
    n = ks.shape[-1]
    if unbiased:
        ks, ls = _zero_diagonal(ks), _zero_diagonal(ls)
        trace = torch.einsum("aij,bij->ab", ks, ls)
        rk, rl = ks.sum(-1), ls.sum(-1)  # row sums [a, n], [b, n]
        sums = torch.outer(rk.sum(-1), rl.sum(-1)) / ((n - 1) * (n - 2))
        cross = 2.0 / (n - 2) * (rk @ rl.T)
        return (trace + sums - cross) / (n * (n - 3))
    return torch.einsum("aij,bij->ab", _double_center(ks), _double_center(ls)) / (n - 1) ** 2


def _hsic_self(ks: Tensor, unbiased: bool) -> Tensor:
    """``HSIC(K_i, K_i)`` for every Gram matrix of ``ks`` ``[a, n, n]``: ``[a]``."""
    n = ks.shape[-1]
    if unbiased:
        ks = _zero_diagonal(ks)
        r = ks.sum(-1)
        sums = r.sum(-1) ** 2 / ((n - 1) * (n - 2))
        return (ks.pow(2).sum((-2, -1)) + sums - 2.0 / (n - 2) * r.pow(2).sum(-1)) / (n * (n - 3))
    return _double_center(ks).pow(2).sum((-2, -1)) / (n - 1) ** 2


def cka_matrix(xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None, unbiased: bool = True) -> Tensor:
    """Linear CKA between every representation of ``xs`` and every one of ``ys`` (default: ``xs`` itself).

    Each Gram matrix is built once, so an ``m x m`` matrix costs ``m`` Gram products and one ``[m, n²]``
    contraction instead of ``m²`` calls to :func:`linear_cka` (whose values it reproduces).

    Args:
        xs: representations ``[n, p_i]`` of the same ``n`` samples (widths may differ).
        ys: a second list of ``[n, q_j]``; ``None`` for the symmetric ``xs`` x ``xs`` matrix.
        unbiased: unbiased (default) or biased HSIC estimator.

    Returns:
        ``[len(xs), len(ys)]`` in the inputs' floating dtype (diagonal exactly 1 when ``ys`` is ``None``, up to
        rounding, for non-constant representations).

    Raises:
        ValueError: on an empty list or representations with different numbers of samples.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(32, 4, generator=g)
        >>> cka_matrix([x, 2 * x]).round(decimals=4)
        tensor([[1., 1.],
                [1., 1.]])
    """
    if not xs:
        raise ValueError("cka_matrix needs at least one representation")
    sizes = {t.shape[0] for t in xs} | ({t.shape[0] for t in ys} if ys else set())
    if len(sizes) != 1 or any(t.dim() != 2 for t in [*xs, *(ys or [])]):
        raise ValueError(f"expected 2-D [n, p] representations of the same n samples, got sizes {sorted(sizes)}")
    ks = torch.stack([centered_gram(x) for x in xs])
    ls = ks if ys is None else torch.stack([centered_gram(y) for y in ys])
    n = ks.shape[-1]
    if n < (4 if unbiased else 2):
        raise ValueError(
            f"{'unbiased' if unbiased else 'biased'} CKA needs at least {4 if unbiased else 2} samples, got n={n}"
        )
    cross = _hsic_pairwise(ks, ls, unbiased)
    self_x = torch.diagonal(cross) if ys is None else _hsic_self(ks, unbiased)
    self_y = self_x if ys is None else _hsic_self(ls, unbiased)
    out = _ratio(cross, self_x[:, None], self_y[None, :])
    return out.to(_out_dtype(*xs, *(ys or [])))
