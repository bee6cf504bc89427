"""Effective rank of token representations: how many directions a layer's tokens spread over (rank collapse).

Dong et al. (2021) show that self-attention without skip connections loses rank doubly exponentially with depth:
all tokens of a sequence converge to one vector. The effective rank of Roy & Vetterli (2007) measures it without a
threshold: for a sample's ``[T, d]`` token matrix centred over its tokens, with singular values ``σ``,
``erank = exp(H(p))``, ``p = σ / Σσ``. It lies between 1 (the tokens on one line through their mean) and
``min(T - 1, d)`` (all directions equally used); 0 when all tokens are equal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def effective_rank(h: Tensor, padding_mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Effective rank of each sample's token matrix, ``exp(H(p))`` with ``p = σ / Σσ`` (Roy & Vetterli 2007).

    Each sample's ``[T, d]`` token matrix (valid tokens only) is centred over its valid tokens, its singular values
    ``σ`` are normalised to a distribution ``p``, and the exponential of its Shannon entropy is returned. Padded
    rows are set to zero after centring, which leaves the non-zero singular values unchanged, so all samples go
    through one batched SVD. A sample with fewer than two valid tokens, or whose centred tokens are all zero,
    has effective rank 0 by convention; a sample with a non-finite value gives ``nan``.

    Args:
        h: ``[B, T, d]``.
        padding_mask: ``[B, T]``, ``True`` at padding, or ``None``.
        eps: singular values below ``eps`` times the sample's largest count as zero.

    Returns:
        ``[B]`` effective ranks (float64).

    Example::

        >>> x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]])
        >>> round(float(effective_rank(x)[0]), 4)  # σ = (2√2, √2), p = (2/3, 1/3), exp(H(p))
        1.8899
    """
    if h.dim() != 3:
        raise ValueError(f"h must be [B, T, d], got shape {tuple(h.shape)}")
    h = h.detach().double()
    if padding_mask is None:
        return erank_from_singular_values(torch.linalg.svdvals(h - h.mean(1, keepdim=True)), eps)
    if padding_mask.shape != h.shape[:2]:
        raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {tuple(h.shape[:2])}")
    keep = (~padding_mask.bool()).to(h.device, h.dtype).unsqueeze(-1)  # [B, T, 1]
    count = keep.sum(1, keepdim=True)  # [B, 1, 1]
    mean = (h * keep).sum(1, keepdim=True) / count.clamp_min(1.0)
    erank = erank_from_singular_values(torch.linalg.svdvals((h - mean) * keep), eps)
    return torch.where(count.view(-1) >= 2, erank, torch.zeros_like(erank))


def erank_from_singular_values(s: Tensor, eps: float = 1e-12) -> Tensor:
    """``exp(H(σ / Σσ))`` per row of ``s`` ``[B, k]`` (values below ``eps`` x the row's largest ignored); rows
    that are all zero give 0, rows with a non-finite value ``nan``.

    Example::

        >>> erank_from_singular_values(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
        tensor([2., 0.])
    """
    finite = torch.isfinite(s).all(-1)
    s = torch.where(torch.isfinite(s), s, torch.zeros((), dtype=s.dtype))
    top = s.max(-1, keepdim=True).values
    s = torch.where(s > eps * top, s, torch.zeros((), dtype=s.dtype))
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    erank = torch.exp(-torch.xlogy(p, p).sum(-1))
    erank = torch.where(total.squeeze(-1) > 0, erank, torch.zeros((), dtype=s.dtype))
    return torch.where(finite, erank, torch.full_like(erank, float("nan")))
