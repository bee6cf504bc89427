"""Numerical stability of the layer map: eq. (21), spectral norms, drift, and loss spikes.

Theorem 2 of the paper (appendix A.5) bounds the explicit Euler step of eq. (20)::

    2 D_l Δt / Δx² + α_l Δt ||W^O||_2 <= 1,                                        (21)

with ``||W^O||_2`` the spectral norm of the attention output projection (:func:`eq21_number`,
:func:`spectral_norm_power`). :func:`relative_drift` and :func:`scan_losses` are the representation- and
loss-side checks. :class:`~pdelightning.callbacks.StabilityMonitor` is the Lightning adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def spectral_norm_power(W: Tensor, v0: Tensor | None = None, n_iter: int = 5) -> tuple[Tensor, Tensor]:  # noqa: N803
    """Largest singular value ``||W||_2`` by power iteration on ``WᵀW``, warm-started from ``v0``.

    Each iteration is ``u = W v / ||W v||``, ``v = Wᵀ u / ||Wᵀ u||``, ``σ = ||Wᵀ u||``. The estimate never exceeds
    ``||W||_2`` and converges at rate ``(σ_2/σ_1)²`` per iteration; started from the previous probe's right
    singular vector (weights change little between probes) a few iterations suffice, which is why the
    callback keeps ``v`` as state instead of running a full SVD each time. Without ``v0`` (or with an unusable
    one: wrong size, zero, non-finite) the start is a fixed seeded Gaussian vector, the same on every rank.

    Args:
        W: matrix ``[m, n]`` (computed in float32, or float64 if given).
        v0: warm start ``[n]``, e.g. the ``v`` returned by the previous call.
        n_iter: number of iterations (``>= 1``).

    Returns:
        ``(sigma, v)``: the 0-dim estimate and the unit right singular vector estimate ``[n]``.

    Raises:
        ValueError: if ``W`` is not 2-D or ``n_iter < 1``.

    Example::

        >>> sigma, v = spectral_norm_power(torch.diag(torch.tensor([3.0, -5.0, 1.0])), n_iter=50)
        >>> round(float(sigma), 4), [round(abs(float(x)), 4) for x in v]
        (5.0, [0.0, 1.0, 0.0])
    """
    if W.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
    if n_iter < 1:
        raise ValueError(f"n_iter={n_iter} must be >= 1")
    W = W.detach()
    W = W if W.dtype == torch.float64 else W.float()
    tiny = torch.finfo(W.dtype).tiny
    usable = (
        v0 is not None and v0.shape == (W.shape[1],) and bool(torch.isfinite(v0).all()) and bool(v0.abs().sum() > 0)
    )
    if usable:
        v = v0.detach().to(W)  # type: ignore[union-attr]
    else:
        v = torch.randn(W.shape[1], generator=torch.Generator().manual_seed(0), dtype=W.dtype).to(W.device)
    v = v / v.norm().clamp_min(tiny)
    sigma = W.new_zeros(())
    for _ in range(n_iter):
        u = W @ v
        u = u / u.norm().clamp_min(tiny)
        w = W.T @ u
        sigma = w.norm()
        v = w / sigma.clamp_min(tiny)
    return sigma, v


def eq21_number(diffusion: Tensor | float, alpha: float, dt: float, dx: float, w_o_norm: float) -> float:
    """The left-hand side of the stability condition eq. (21): ``2 D Δt / Δx² + |α| Δt ||W^O||_2``.

    ``D`` is the largest entry of a per-feature (diagonal) diffusion ``D_l`` (the worst-damped feature sets
    the bound); ``|α|`` because a negative attention strength is as destabilising as a positive one.
    The explicit step is stable when the number is at most 1.

    Example::

        >>> eq21_number(torch.tensor([0.1, 0.5]), alpha=-2.0, dt=0.25, dx=1.0, w_o_norm=1.5)
        1.0
    """
    d = float(diffusion.max()) if isinstance(diffusion, Tensor) and diffusion.numel() else float(diffusion or 0.0)
    return 2.0 * d * dt / dx**2 + abs(alpha) * dt * w_o_norm


def relative_drift(h: Tensor, u0: Tensor) -> float:
    """``||h - u_0||_F / ||u_0||_F`` over all samples, tokens and features: how far a layer moved the embedding.

    Example::

        >>> relative_drift(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 4.0]]))
        0.75
    """
    return float((h.double() - u0.double()).norm() / u0.double().norm())


@dataclass
class LossScan:
    """Result of :func:`scan_losses`: the updated running average and what was found."""

    ema: float | None
    count: int
    spikes: list[tuple[int, float, float]] = field(default_factory=list)  # (position, loss, ema before it)
    nonfinite: list[tuple[int, float]] = field(default_factory=list)  # (position, loss)


def scan_losses(
    losses: Sequence[float],
    ema: float | None,
    count: int,
    decay: float = 0.98,
    spike_factor: float | None = 3.0,
    warmup: int = 20,
    atol: float = 1.0,
) -> LossScan:
    """Check a run of training losses for non-finite values and spikes, updating a running average.

    A loss is a spike when ``loss > spike_factor × EMA`` *and* ``loss - EMA > atol`` (so that batch-to-batch noise
    around a near-zero loss is not called a spike; Lightning's ``SpikeDetection`` has the same two tolerances),
    once the EMA has seen at least ``warmup`` losses.
    Non-finite losses do not enter the EMA; a spike enters it clipped to ``spike_factor × EMA`` (a winsorized
    average: one spike moves it by at most ``(1 - decay)(spike_factor - 1)``, relatively, yet a lasting level
    shift is followed within a few dozen steps). Assumes a positive loss.

    Args:
        losses: losses in order.
        ema: running average before them (``None``: none yet; the first finite loss starts it).
        count: number of losses the average has seen.
        decay: EMA decay ``β``: ``ema <- β ema + (1 - β) loss``.
        spike_factor: spike threshold factor, ``None`` to detect no spikes.
        warmup: losses the average must have seen before spikes are flagged.
        atol: the least absolute rise above the average that counts as a spike.

    Example::

        >>> scan = scan_losses([1.0, 1.0, 9.0, float("nan")], ema=None, count=0, decay=0.5, warmup=2)
        >>> scan.ema, scan.count, scan.spikes, scan.nonfinite
        (2.0, 3, [(2, 9.0, 1.0)], [(3, nan)])
    """
    out = LossScan(ema, count)
    for i, x in enumerate(losses):
        if not math.isfinite(x):
            out.nonfinite.append((i, x))
            continue
        if out.ema is None:
            out.ema, out.count = x, 1
            continue
        if spike_factor is not None and out.count >= warmup and x > spike_factor * out.ema and x - out.ema > atol:
            out.spikes.append((i, x, out.ema))
            x = max(spike_factor * out.ema, out.ema + atol)
        out.ema = decay * out.ema + (1.0 - decay) * x
        out.count += 1
    return out
