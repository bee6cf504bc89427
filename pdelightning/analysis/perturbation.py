"""Perturbation sensitivity: seeded per-sample noise, RMS scaling, amplification, the critical ε (paper §3.5).

Noise of strength ε is drawn per probe sample from its own seeded generator (:func:`gaussian_noise`,
:func:`sample_seed`) and scaled to the sample's RMS (:func:`per_sample_rms`); :func:`amplification` is the
per-layer growth ``||δh_l|| / ||δh_0||`` of a perturbation (eq. 20 iterated) and :func:`critical_epsilon`
the smallest ε whose loss departs from the clean loss; :func:`loss_departure` says where the curve stands
against that threshold when no ε reaches it, and :func:`extend_epsilon_grid` extends the grid until one does
or the loss saturates. :func:`scale_rows`, :func:`copies_per_forward`, :func:`correct_predictions` and
:func:`finite_mean` serve the batched evaluation of every ε in one forward.
:class:`~pdelightning.callbacks.PerturbationEval` is the Lightning adapter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import torch
from torch import Tensor

DEFAULT_EPSILONS: tuple[float, ...] = tuple(float(e) for e in np.logspace(-4, 1, 11))
"""The ε grid of the paper's Figure 6 and beyond: 11 values, half a decade apart, from 1e-4 to 10."""
ATTENTION_ELEMENTS = 2**25
"""Cap on ``rows x T^2`` of one batched perturbation forward (the explicit attention it forms per head)."""


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


def eps_tags(epsilons: Sequence[float]) -> list[str]:
    """Metric-key labels of a grid of ε whose text order is their numeric order: ``eps_<fixed point>``.

    Each ε is written in fixed point with the shortest digits of :func:`format_eps` (at most 3 significant), and the
    integer parts are zero-padded to the grid's widest, so any sort of the tags (TensorBoard's, ``sorted``) lists
    them by size; ``1e-03``-style labels sort as text by their exponent's digits instead (``1e+01`` before
    ``1e-01``).

    Example::

        >>> eps_tags([1e-4, 10**-3.5, 0.5, 3.16, 10.0])
        ['eps_00.0001', 'eps_00.000316', 'eps_00.5', 'eps_03.16', 'eps_10']
    """
    fixed = [format(Decimal(format_eps(float(e))), "f") for e in epsilons]
    fixed = [f.rstrip("0").rstrip(".") if "." in f else f for f in fixed]
    width = max(len(f.split(".")[0]) for f in fixed)
    return [f"eps_{f.split('.')[0].zfill(width)}" + (f".{f.split('.')[1]}" if "." in f else "") for f in fixed]


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


def scale_rows(eps: Tensor, like: Tensor) -> Tensor:
    """``eps`` ``[B]`` shaped to scale the rows of ``like`` ``[B, ...]`` (in its dtype and on its device).

    Example::

        >>> (scale_rows(torch.tensor([1.0, 2.0]), torch.ones(2, 3, 4)) * torch.ones(2, 3, 4)).sum((1, 2)).tolist()
        [12.0, 24.0]
    """
    return eps.to(like).view(-1, *([1] * (like.dim() - 1)))


def copies_per_forward(n: int, length: int, max_rows: int, attention_elements: int = ATTENTION_ELEMENTS) -> int:
    """How many copies of an ``n``-row batch of sequences of ``length`` tokens one batched forward takes.

    At most ``max_rows`` rows, and at most ``attention_elements / length²`` rows (a probe forward forms the explicit
    attention, ``rows x T²`` per head); always at least one copy.

    Example::

        >>> copies_per_forward(8, 16, 4096), copies_per_forward(8, 4096, 4096), copies_per_forward(100, 1, 64)
        (512, 1, 1)
    """
    budget = min(max_rows, max(1, attention_elements // (length * length)))
    return max(1, budget // max(n, 1))


def correct_predictions(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample ``1.0``/``0.0`` for ``argmax logits == label`` of a classifier; ``nan`` for other outputs.

    Example::

        >>> correct_predictions(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])).tolist()
        [1.0, 0.0]
    """
    if logits.dim() == 2 and labels.dim() == 1:
        return (logits.argmax(-1) == labels).float()
    return torch.full((logits.shape[0],), float("nan"), device=logits.device)


def finite_mean(values: Tensor) -> float:
    """Mean of the finite entries in float64; ``nan`` when there are none.

    Example::

        >>> finite_mean(torch.tensor([1.0, float("inf"), 2.0])), finite_mean(torch.tensor([float("nan")]))
        (1.5, nan)
    """
    v = values.double()
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else float("nan")


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


@dataclass(frozen=True)
class Departure:
    """Where a loss-vs-ε curve stands against the departure threshold ``factor * clean_loss`` (:func:`loss_departure`).

    Attributes:
        critical_eps: the smallest grid ε past the threshold (:func:`critical_epsilon`); ``nan`` if none.
        max_loss: the largest loss on the grid (``inf`` when one is non-finite).
        eps_at_max: the ε of ``max_loss`` (the smallest such ε).
        departure_ratio: ``max_loss / clean_loss``: ``1`` = no effect, ``factor`` = at the threshold.
        threshold_fraction: ``(max_loss - clean_loss) / ((factor - 1) clean_loss)``, the fraction of the way from
            the clean loss to the threshold the curve has come: ``0`` = no effect, ``1`` = at the threshold,
            ``> 1`` = past it.
    """

    critical_eps: float
    max_loss: float
    eps_at_max: float
    departure_ratio: float
    threshold_fraction: float


def loss_departure(
    epsilons: Sequence[float], losses: Sequence[float], clean_loss: float, factor: float = 2.0
) -> Departure:
    """The critical ε, and where the curve stands relative to the threshold when no ε reaches it.

    :func:`critical_epsilon` alone is ``nan`` whenever the grid stops short of the threshold (at the quickstart's
    default grid, up to ε = 1, the loss rises from 1.30 to 1.78, short of 2 x 1.30): ``departure_ratio`` and
    ``threshold_fraction`` (1.37 and 0.37 there) say how far it got, so every probe reports something. All
    fields are ``nan`` when the clean loss is not finite; with a clean loss of 0 any positive loss gives ``inf``.

    Example::

        >>> d = loss_departure([1e-2, 1e-1, 1.0], [1.31, 1.45, 1.78], clean_loss=1.30)
        >>> d.critical_eps, round(d.departure_ratio, 3), round(d.threshold_fraction, 3), d.eps_at_max
        (nan, 1.369, 0.369, 1.0)
    """
    critical = critical_epsilon(epsilons, losses, clean_loss, factor)
    if not math.isfinite(clean_loss) or not len(losses):
        return Departure(critical, float("nan"), float("nan"), float("nan"), float("nan"))
    pairs = sorted(zip(epsilons, losses, strict=True))
    peak = max(float("inf") if not math.isfinite(loss) else float(loss) for _, loss in pairs)
    eps_at_max = next(float(e) for e, loss in pairs if (float("inf") if not math.isfinite(loss) else loss) == peak)
    rise = peak - clean_loss
    if clean_loss == 0:  # no scale to measure the rise against: any rise is infinitely far
        hit = rise > 0
        return Departure(critical, peak, eps_at_max, float("inf") if hit else 1.0, float("inf") if hit else 0.0)
    return Departure(critical, peak, eps_at_max, peak / clean_loss, rise / ((factor - 1.0) * clean_loss))


@dataclass(frozen=True)
class EpsilonScan:
    """Result of :func:`extend_epsilon_grid`.

    Attributes:
        epsilons: the grid evaluated, ascending (the given grid, then the extension).
        losses: the loss at each ε.
        departure: :func:`loss_departure` of the whole curve.
        stopped: why the extension stopped: ``"crossed"`` (the threshold is met), ``"saturated"`` (the loss has
            levelled off at ``ln C``, or anywhere when ``num_classes`` is not given), ``"max_eps"`` (the next ε
            would exceed ``max_eps``) or ``"max_points"``.
    """

    epsilons: list[float]
    losses: list[float]
    departure: Departure
    stopped: str

    @property
    def saturated(self) -> bool:
        """Whether the loss levelled off before meeting the threshold."""
        return self.stopped == "saturated"


def extend_epsilon_grid(
    loss_at: Callable[[float], float],
    epsilons: Sequence[float],
    clean_loss: float,
    factor: float = 2.0,
    *,
    losses: Sequence[float] | None = None,
    num_classes: int | None = None,
    growth: float = 10**0.5,
    max_eps: float = 1e3,
    max_points: int = 32,
    flat_rtol: float = 0.02,
) -> EpsilonScan:
    """Extend an ε grid upwards until the loss crosses ``factor * clean_loss`` or saturates.

    The grid is evaluated (or ``losses`` taken as its values), then ``ε_max * growth``, ``ε_max * growth²``, ...
    are added one at a time until one of:

    * ``"crossed"``: a loss exceeds ``factor * clean_loss`` (or is non-finite): the critical ε exists;
    * ``"saturated"``: the last two extensions each raised the loss by less than ``flat_rtol`` (relative) and,
      when ``num_classes`` ``C`` is given, the loss is at least ``(1 - flat_rtol) ln C``, the loss of a
      classifier that has lost all information about the input: more noise cannot help it cross. A
      threshold above ``ln C`` (a clean loss above ``ln C / factor``) is typically met only by a model that
      turns confidently wrong under noise, so a saturated scan is a result, not a failure;
    * ``"max_eps"`` / ``"max_points"``: the budget is spent.

    Args:
        loss_at: ``ε -> mean loss`` under noise of strength ε (e.g. a closure over the model and probe set).
        epsilons: the starting grid (positive; any order).
        clean_loss: the loss without noise.
        factor: the departure factor of :func:`critical_epsilon` (``> 1``).
        losses: the losses already measured on ``epsilons`` (skips evaluating them again).
        num_classes: ``C``, for the ``ln C`` saturation level; ``None``: saturated means levelled off anywhere.
        growth: ratio between consecutive added ε (``> 1``).
        max_eps: no ε above this is tried.
        max_points: at most this many ε in all.
        flat_rtol: relative rise below which a step counts as flat.

    Raises:
        ValueError: on an empty grid, a non-positive ε, ``growth <= 1``, ``factor <= 1``, or mismatched ``losses``.

    Example::

        >>> scan = extend_epsilon_grid(lambda e: 1.0 + e, [0.01, 0.1], clean_loss=1.0, growth=10.0)
        >>> scan.stopped, scan.departure.critical_eps, scan.epsilons
        ('crossed', 10.0, [0.01, 0.1, 1.0, 10.0])
    """
    if not len(epsilons) or any(not (math.isfinite(e) and e > 0) for e in epsilons):
        raise ValueError(f"epsilons={list(epsilons)} must be a non-empty list of positive numbers")
    if not growth > 1 or not factor > 1:
        raise ValueError(f"growth={growth} and factor={factor} must both be > 1")
    if losses is not None and len(losses) != len(epsilons):
        raise ValueError(f"got {len(epsilons)} epsilons but {len(losses)} losses")
    pairs = sorted(zip(epsilons, losses if losses is not None else [loss_at(float(e)) for e in epsilons], strict=True))
    eps, vals = [float(e) for e, _ in pairs], [float(v) for _, v in pairs]
    ln_c = math.log(num_classes) if num_classes else None

    def status() -> str | None:
        if math.isfinite(critical_epsilon(eps, vals, clean_loss, factor)):
            return "crossed"
        if len(vals) >= 3 and all(math.isfinite(v) for v in vals[-3:]):
            flat = all(b - a <= flat_rtol * abs(a) for a, b in itertools.pairwise(vals[-3:]))
            if flat and (ln_c is None or vals[-1] >= (1.0 - flat_rtol) * ln_c):
                return "saturated"
        return None

    stopped = status()
    while stopped is None:
        nxt = eps[-1] * growth
        if nxt > max_eps:
            stopped = "max_eps"
        elif len(eps) >= max_points:
            stopped = "max_points"
        else:
            eps.append(nxt)
            vals.append(float(loss_at(nxt)))
            stopped = status()
    return EpsilonScan(eps, vals, loss_departure(eps, vals, clean_loss, factor), stopped)
