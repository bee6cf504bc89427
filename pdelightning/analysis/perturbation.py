"""Perturbation sensitivity: seeded per-sample noise, RMS scaling, amplification, the critical ε (paper §3.5).

Noise of strength ε is drawn per probe sample from its own seeded generator (:func:`gaussian_noise`,
:func:`sample_seed`) and scaled to the sample's RMS (:func:`per_sample_rms`); :func:`amplification` is the
per-layer growth ``||δh_l|| / ||δh_0||`` of a perturbation (eq. 20 iterated) and :func:`critical_epsilon`
the smallest ε whose loss departs from the clean loss. :class:`~pdelightning.callbacks.PerturbationEval`
is the Lightning adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def format_eps(eps: float) -> str:
    """Compact label of ``eps`` for metric keys: the shortest ``%e`` form that reads back as ``eps`` (else 3 digits).

    Example::

        >>> format_eps(1e-3), format_eps(0.5), format_eps(10**-3.5), format_eps(2.5e-2)
        ('1e-03', '5e-01', '3.16e-04', '2.5e-02')
    """
    for digits in range(3):
        label = f"{eps:.{digits}e}"
        if math.isclose(float(label), eps, rel_tol=1e-9, abs_tol=0.0):
            return label
    return f"{eps:.2e}"


def sample_seed(seed: int, index: int) -> int:
    """Seed of the noise of the probe sample at position ``index``: a fixed mix of ``(seed, index)``.

    The noise of a sample depends only on its position in the probe set, never on the batch or the rank it
    lands on, so any world size and any probe batch size see the same perturbations.
    """
    return (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)


def gaussian_noise(index: Tensor, shape: Sequence[int], seed: int, valid: Tensor | None = None) -> Tensor:
    """Standard-normal noise ``z`` of shape ``[B, *shape]``, each sample drawn from its own seeded generator.

    Args:
        index: ``[B]`` positions of the samples in the probe set (see :func:`sample_seed`).
        shape: per-sample shape, e.g. ``[H, W]`` for images or ``[T, d]`` for an embedding.
        seed: base seed.
        valid: optional ``[B, T]`` mask (``True`` = real token) of the first axis of ``shape``: noise is drawn only
            for the valid positions (in order) and is zero at padding. The draws of a sample then do not depend on
            how much padding its batch carries.

    Returns:
        ``[B, *shape]`` float32 on the CPU.

    Example::

        >>> z = gaussian_noise(torch.tensor([0, 1, 2]), [4], seed=0)
        >>> torch.equal(z[1:], gaussian_noise(torch.tensor([1, 2]), [4], seed=0))  # a shard sees the same noise
        True
        >>> m = torch.tensor([[True, True, False]])
        >>> gaussian_noise(torch.tensor([5]), [3, 2], seed=0, valid=m)[0, 2].tolist()  # padding left untouched
        [0.0, 0.0]
    """
    shape = [int(s) for s in shape]
    out = torch.zeros([len(index), *shape])
    for b, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(sample_seed(seed, i))
        if valid is None:
            out[b] = torch.randn(shape, generator=g)
        else:
            keep = valid[b].cpu()
            out[b][keep] = torch.randn([int(keep.sum()), *shape[1:]], generator=g)
    return out


def mask_like(x: Tensor, valid: Tensor | None) -> Tensor | None:
    """``valid`` broadcast to ``x`` (``[B, T, ...]``) when its leading axes match, else ``None``."""
    if valid is None or x.dim() < 2 or tuple(x.shape[:2]) != tuple(valid.shape):
        return None
    return valid.reshape(*valid.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def per_sample_rms(u: Tensor, valid: Tensor | None = None) -> Tensor:
    """Root-mean-square of each sample of ``u`` ``[B, ...]``, over its valid tokens only when ``valid`` ``[B, T]``.

    Example::

        >>> u = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])  # one sample, two tokens, the second padding
        >>> per_sample_rms(u).item(), round(per_sample_rms(u, torch.tensor([[True, False]])).item(), 4)
        (2.5, 3.5355)
    """
    m = mask_like(u, valid)
    if m is None:
        return u.pow(2).flatten(1).mean(1).sqrt()
    m = m.expand_as(u)
    return ((u.pow(2) * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)).sqrt()


def masked_frobenius(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-sample Frobenius norm of ``x`` ``[B, ...]``, over valid tokens when ``valid`` ``[B, T]`` matches.

    Example::

        >>> masked_frobenius(torch.tensor([[[3.0, 4.0], [1.0, 1.0]]]), torch.tensor([[True, False]])).tolist()
        [5.0]
    """
    m = mask_like(x, valid)
    x = x if m is None else x * m
    return x.flatten(1).norm(dim=1)


def amplification(dh: Tensor, dh0: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-sample amplification ``||δh_l||_F / ||δh_0||_F`` of a perturbation from the embedding to layer ``l``.

    Args:
        dh: ``[B, T, d]`` difference of layer ``l``'s perturbed and clean outputs.
        dh0: ``[B, ...]`` the perturbation at the reference point (the embedding ``u_0``, or the input).
        valid: ``[B, T]`` real-token mask; norms are taken over valid tokens only (where the shapes match).

    Returns:
        ``[B]``; ``nan`` for a sample whose reference perturbation is zero.

    Example::

        >>> dh0 = torch.randn(2, 3, 4)
        >>> amplification(2 * dh0, dh0).tolist()  # a layer that doubles its input
        [2.0, 2.0]
    """
    num = masked_frobenius(dh.float(), valid)
    den = masked_frobenius(dh0.float(), valid)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, float("nan")))


def critical_epsilon(
    epsilons: Sequence[float], losses: Sequence[float], clean_loss: float, factor: float = 2.0
) -> float:
    """The smallest ε whose mean loss departs from the clean loss: ``loss(ε) > factor * loss_clean``.

    A non-finite loss (``nan``/``inf``, a diverged forward) counts as departed. The answer is a grid point (no
    interpolation); ``nan`` when no ε on the grid departs or when the clean loss itself is not finite. With a clean
    loss of exactly 0 any positive loss departs.

    Args:
        epsilons: the ε grid (any order).
        losses: mean loss at each ε.
        clean_loss: mean loss without perturbation.
        factor: departure factor ``> 1``.

    Example::

        >>> critical_epsilon([1e-3, 1e-2, 1e-1], [0.51, 0.9, 1.3], clean_loss=0.5)
        0.1
        >>> critical_epsilon([1e-1, 1e-3, 1e-2], [1.3, 0.51, float("nan")], clean_loss=0.5)
        0.01
        >>> critical_epsilon([1e-3, 1e-2], [0.5, 0.6], clean_loss=0.5)
        nan
    """
    if len(epsilons) != len(losses):
        raise ValueError(f"got {len(epsilons)} epsilons but {len(losses)} losses")
    if not math.isfinite(clean_loss):
        return float("nan")
    for eps, loss in sorted(zip(epsilons, losses, strict=True)):
        if not math.isfinite(loss) or loss > factor * clean_loss:
            return float(eps)
    return float("nan")
