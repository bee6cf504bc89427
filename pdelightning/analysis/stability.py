"""Numerical stability of the layer map: eq. (21), spectral norms, drift, and loss spikes.

Theorem 2 of the paper (appendix A.5) bounds the explicit Euler step of eq. (20)::

    2 D_l Δt / Δx² + α_l Δt ||W^O||_2 <= 1,                                        (21)

with ``||W^O||_2`` the spectral norm of the attention output projection (:func:`eq21_number`,
:func:`spectral_norm_power`). :func:`relative_drift`, :func:`representation_sums` with
:func:`summarize_representations`, and :func:`scan_losses` are the representation- and loss-side checks.
:class:`~pdelightning.callbacks.StabilityMonitor` is the Lightning adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from pdelightning.analysis.cka import cka_matrix
from pdelightning.analysis.representation import pool_tokens


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


EXACT_MAX_DIM = 512
"""Largest ``min(m, n)`` for which :func:`exact_spectral_norm` takes the exact ``torch.linalg.matrix_norm(W, 2)``."""
SUBSPACE_SIZE = 8
"""Block size of the subspace iteration above :data:`EXACT_MAX_DIM`."""


class SpectralNorm(NamedTuple):
    """Result of :func:`exact_spectral_norm`."""

    sigma: Tensor
    """``||W||_2``, 0-dim, in ``W``'s floating dtype (float32 at least)."""
    v: Tensor | None
    """The top right singular vector estimate ``[n]`` (a warm start for the next call); ``None`` on the exact path."""
    method: str
    """``"exact"`` (singular values by SVD) or ``"subspace"`` (iterated to ``rtol``)."""
    iterations: int
    """Subspace iterations run (``0`` on the exact path)."""
    converged: bool
    """``True`` on the exact path, or when the iteration met ``rtol`` within ``max_iter``."""


def _unit_start(W: Tensor, v0: Tensor | None, k: int) -> Tensor:  # noqa: N803
    """``[n, k]`` orthonormal start: ``v0`` (when usable) then seeded Gaussian columns, the same on every rank."""
    n = W.shape[1]
    block = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(W.device)
    if v0 is not None and v0.shape == (n,) and bool(torch.isfinite(v0).all()) and bool(v0.abs().sum() > 0):
        block[:, 0] = v0.detach().to(block)
    return torch.linalg.qr(block)[0]


def exact_spectral_norm(
    W: Tensor,  # noqa: N803
    v0: Tensor | None = None,
    *,
    rtol: float = 1e-4,
    max_iter: int = 2000,
    exact_max_dim: int = EXACT_MAX_DIM,
    subspace_size: int = SUBSPACE_SIZE,
) -> SpectralNorm:
    """``||W||_2`` (the largest singular value), exact up to ``rtol`` however close the top singular values are.

    Up to ``min(m, n) = exact_max_dim`` it is ``torch.linalg.matrix_norm(W, 2)`` in float64 (LAPACK/cuSOLVER
    singular values: exact to rounding). Above it: subspace iteration on ``WᵀW`` with a block of ``subspace_size``
    vectors (the first is ``v0`` when given and usable, the others seeded Gaussians, the same on every rank)
    and a Rayleigh-Ritz step each iteration, run until the top *two* Ritz pairs ``(θ_i, v_i)`` have relative
    residuals ``||WᵀW v_i - θ_i v_i|| / θ_1 <= rtol``. Then some singular value of ``W`` lies within a relative
    ``rtol / 2`` of ``σ = sqrt(θ_1)`` (Weyl), and ``σ <= ||W||_2`` always (a Ritz value). Requiring the second
    pair too is what makes the answer the *top* singular value: a warm start that is an exact singular
    vector of the previous weights converges at once to the wrong value (the issue-12 trap of
    :func:`spectral_norm_power`, which with a fixed 5 warm iterations reads 1.0000 for a true 1.0500), while
    the random columns need a few dozen iterations to bring in the direction that overtook it. Hence ``v0``
    barely shortens the iteration; it is accepted so callers can pass the vector they keep.

    :data:`EXACT_MAX_DIM` ``= 512``: up to there the exact path costs 20-30 ms and is about as fast as the
    iteration (``rtol = 1e-4``) when the top singular values are close (the case that matters: the issue's
    trained ``W_O`` had ``(σ_2/σ_1)² = 0.989``); above it the iteration is faster everywhere measured. Timings on
    an H200 machine (16-core CPU): exact float64 / iteration with close top singular values (in brackets: the
    iteration with well separated ones; the exact path does not depend on the spectrum)::

        d       CPU, 1 thread                CPU, 16 threads              GPU (H200)
        256     4 / 5 ms (3)                 -                            -
        512     25 / 44 ms (7)               19 / 14 ms (4)               29 / 42 ms (13)
        1024    313 / 270 ms (37)            70 / 41 ms (10)              90 / 66 ms (14)
        2048    2.45 / 1.47 s (0.15)         383 / 389 ms (42)            325 / 149 ms (16)
        4096    -                            1.23 / 1.13 s (0.10)         1.43 s / 212 ms (22)

    The exact path runs in float64: cuSOLVER's float32 singular values were 2e-5 to 4e-4 off there (LAPACK's
    float32: below 2e-6), more than the differences eq. (21) is read for.

    Args:
        W: matrix ``[m, n]``; both paths compute in float64, the result comes back in float64 for a float64 ``W``,
            else in float32.
        v0: warm start ``[n]`` for the iteration, e.g. the ``v`` of the previous call; ignored on the exact path.
        rtol: relative residual at which the iteration stops (``> 0``).
        max_iter: at most this many iterations (``>= 1``); ``converged`` says whether ``rtol`` was met.
        exact_max_dim: the exact path is taken when ``min(m, n) <= exact_max_dim`` (``0``: always iterate).
        subspace_size: block size ``k >= 2`` (capped at ``n``).

    Returns:
        :class:`SpectralNorm` ``(sigma, v, method, iterations, converged)``.

    Raises:
        ValueError: if ``W`` is not 2-D, or ``rtol``, ``max_iter`` or ``subspace_size`` is out of range.

    Example::

        >>> exact_spectral_norm(torch.diag(torch.tensor([3.0, -5.0, 1.0]))).sigma
        tensor(5.)
        >>> res = exact_spectral_norm(torch.diag(torch.tensor([3.0, -5.0, 1.0])), exact_max_dim=0)
        >>> round(float(res.sigma), 6), res.method, res.converged
        (5.0, 'subspace', True)
    """
    if W.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
    if not rtol > 0:
        raise ValueError(f"rtol={rtol} must be positive")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    if subspace_size < 2:
        raise ValueError(f"subspace_size={subspace_size} must be >= 2 (one warm-start column and a random one)")
    out_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach() if W.device.type != "mps" else W.detach().cpu()  # MPS has no float64
    if min(W.shape) <= exact_max_dim or min(W.shape) == 0:
        # float64: cuSOLVER's float32 singular values were seen up to 4e-4 off (LAPACK's: below 2e-6)
        sigma = torch.linalg.matrix_norm(W.to(torch.float64), ord=2) if W.numel() else W.new_zeros(())
        return SpectralNorm(sigma.to(out_dtype), None, "exact", 0, True)
    A = W.to(torch.float64)
    V = _unit_start(A, v0, min(subspace_size, A.shape[1]))
    n_check = min(2, V.shape[1])
    theta, v, converged, it = A.new_zeros(()), V[:, 0], False, 0
    while it < max_iter:
        it += 1
        Z = A.T @ (A @ V)  # WᵀW V  [n, k]
        evals, S = torch.linalg.eigh(V.T @ Z)  # Rayleigh-Ritz on the block, ascending
        theta, top = evals[-1].clamp_min(0.0), S[:, -n_check:]
        v = V @ S[:, -1]
        residuals = (Z @ top - (V @ top) * evals[-n_check:]).norm(dim=0)  # of the top n_check Ritz pairs
        if theta == 0 or bool((residuals <= rtol * theta).all()):
            converged = True
            break
        V = torch.linalg.qr(Z)[0]
    return SpectralNorm(theta.sqrt().to(out_dtype), v / v.norm().clamp_min(1e-300), "subspace", it, converged)


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


def attention_spectra(w_o: Tensor, w_v: Tensor | None = None) -> tuple[float, float | None]:
    """``||W^O||_2`` of eq. (21) and ``||W^O W^V||_2``, the composed value-output map, each exact.

    Norms by :func:`exact_spectral_norm`, in float32; ``inf`` for a matrix with non-finite entries. ``W^O W^V`` is
    ``w_o @ w_v`` (nn.Linear convention, ``w_v`` ``[d_v, d]`` with grouped key/value heads already repeated); its
    norm is ``None`` without ``w_v`` or when ``w_v.shape[0] != w_o.shape[1]``.

    Example::

        >>> attention_spectra(torch.diag(torch.tensor([2.0, 1.0])), torch.eye(2) * 3)
        (2.0, 6.0)
    """

    def norm(matrix: Tensor) -> float:
        if not bool(torch.isfinite(matrix).all()):
            return float("inf")
        return float(exact_spectral_norm(matrix).sigma)

    with torch.no_grad():
        w_o = w_o.detach().float()
        s_o = norm(w_o)
        s_vo = norm(w_o @ w_v.detach().float()) if w_v is not None and w_v.shape[0] == w_o.shape[1] else None
    return s_o, s_vo


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


def representation_sums(name: str, h: Tensor, u0: Tensor | None, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample sums that add up, over a probe set, to the representation statistics of one layer.

    Over the valid (non-padding) tokens when ``valid`` ``[B, T]`` matches ``h``. Keys (suffixed ``/<name>``):
    ``sq``: sum of squares; ``cnt``: number of values; ``bad``: number of non-finite values; ``pool``: the
    token-averaged vector (for CKA); ``diff`` (only with ``u0``): ``||h - u_0||²``, ``-1`` when ``h`` and ``u_0``
    differ in shape. Summed over samples they give :func:`summarize_representations` its input.

    Example::

        >>> s = representation_sums("l", torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[0.0, 4.0]]]))
        >>> s["sq/l"], s["cnt/l"], s["diff/l"]
        (tensor([25.]), tensor([2.]), tensor([9.]))
    """
    keep = valid.to(h.dtype)[..., None] if valid is not None and h.dim() == 3 and valid.shape == h.shape[:2] else None
    masked = h if keep is None else torch.where(keep > 0, h, torch.zeros_like(h))
    flat = masked.flatten(1)
    per_token = h.shape[-1] if h.dim() == 3 else 1
    count = keep.sum((1, 2)) * per_token if keep is not None else torch.full((h.shape[0],), float(flat.shape[1]))
    stats = {
        f"sq/{name}": flat.pow(2).sum(1),
        f"cnt/{name}": count.to(h.device).float(),
        f"bad/{name}": (~torch.isfinite(flat)).sum(1).float(),
        f"pool/{name}": pool_tokens(h, None if keep is None else ~valid.bool()),  # type: ignore[union-attr]
    }
    if u0 is not None:
        same = h.shape == u0.shape
        diff = (masked - (u0 if keep is None else u0 * keep)).flatten(1) if same else None
        stats[f"diff/{name}"] = diff.pow(2).sum(1) if diff is not None else torch.full_like(stats[f"sq/{name}"], -1.0)
    return stats


@dataclass(frozen=True)
class LayerSummary:
    """One layer's representation statistics over a probe set (:func:`summarize_representations`).

    ``count``/``bad``: values and non-finite values in its output; ``rms``: ``sqrt(mean h_l²)``;
    ``rms_growth``: ``rms_l / rms_0`` (``nan`` when ``rms_0`` is 0); ``drift``: ``||h_l - u_0||_F / ||u_0||_F``
    (``None`` when the output differs from ``u_0`` in shape); ``cka``: linear CKA to the token-averaged ``u_0``
    (``None`` with fewer than 4 samples). The last three are ``None`` for ``u_0`` itself.
    """

    name: str
    count: float
    bad: float
    rms: float
    rms_growth: float | None = None
    drift: float | None = None
    cka: float | None = None

    @property
    def nonfinite(self) -> float:
        """Fraction of non-finite values."""
        return self.bad / max(self.count, 1.0)


def summarize_representations(sums: Mapping[str, Tensor], names: Sequence[str]) -> list[LayerSummary]:
    """Drift from the embedding, RMS growth and CKA to it, from the per-sample sums of :func:`representation_sums`.

    ``u_0`` (``names[0]``), eq. (6)'s initial condition, is the reference of every later layer ``u_l`` (one
    explicit Euler step, eq. (20), each in the PDE model): relative drift ``||h_l - u_0||_F / ||u_0||_F`` over the
    whole probe set, ``rms_l / rms_0``, and linear CKA (unbiased HSIC) between token-averaged ``h_l`` and ``u_0``.

    Args:
        sums: ``{"<sq|cnt|bad|pool|diff>/<name>": [n] or [n, d]}`` over ``n`` samples (``diff`` for ``names[1:]``).
        names: the embedding first, then the layers in depth order.

    Returns:
        One :class:`LayerSummary` per name, in order.
    """
    u0 = names[0]
    sq0 = float(sums[f"sq/{u0}"].sum())
    rms0 = math.sqrt(float(sums[f"sq/{u0}"].sum() / sums[f"cnt/{u0}"].sum().clamp_min(1)))
    pooled = sums[f"pool/{u0}"]
    cka = cka_matrix([pooled], [sums[f"pool/{n}"] for n in names[1:]])[0] if pooled.shape[0] >= 4 else None
    out = [LayerSummary(u0, float(sums[f"cnt/{u0}"].sum()), float(sums[f"bad/{u0}"].sum()), rms0)]
    for i, n in enumerate(names[1:]):
        count = float(sums[f"cnt/{n}"].sum())
        rms = math.sqrt(float(sums[f"sq/{n}"].sum()) / max(count, 1.0))
        diff = sums[f"diff/{n}"]
        drift = None if bool((diff < 0).any()) else math.sqrt(float(diff.sum())) / max(math.sqrt(sq0), 1e-30)
        growth = rms / rms0 if rms0 > 0 else float("nan")
        c = float(cka[i]) if cka is not None else None
        out.append(LayerSummary(n, count, float(sums[f"bad/{n}"].sum()), rms, growth, drift, c))
    return out
