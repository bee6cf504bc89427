r"""Least-squares fit of one layer's update to the continuum model of the paper, eq. (20).

Read a layer as one explicit Euler step of eq. (20) with the couplings and the forcing left out,

    (u_{l+1} - u_l) / Δt  ≈  D ∘ ∇²u_l  +  α A_l  +  c F_l,

where ``∇²`` is :func:`~pdelightning.analysis.laplacian.laplacian_1d` along the token axis (spacing ``Δx``, the model's
boundary condition, padding outside the domain), ``A_l`` the attention sublayer's output *without* any ``α``
factor, ``F_l`` the MLP's output, and ``D`` one diffusion coefficient per feature (``"diagonal"``) or one number
(``"scalar"``). The fit runs over all valid (non-padded) token positions and all features, and reports ``D``,
``α``, ``c`` (``ffn_coef``), the R² of the full fit and of the diffusion-only and attention-only sub-models (each
refitted alone), and the eq. (21) number ``2 max(D) Δt/Δx² + |α| Δt ||W^O||_2`` of the *fitted* coefficients.

What to expect:

* On our own :class:`~pdelightning.models.PDEClassifier` without coupling, forcing or LayerNorm, which *is* this
  model, the fit recovers each layer's ``D_l`` and ``α_l``, ``c = 1`` and R² = 1 (up to float32 rounding).
  Forcing (``g = u_0``) or couplings (eqs. 18-19) are terms the fit does not have: R² drops below 1, and so
  it does with ``norm="pre"``, whose step diffuses ``LN(u_l)`` rather than ``u_l``.
* On a Transformer with residual connections and ``norm="none"`` or ``"pre"``, ``u_{l+1} = u_l + A_l + F_l``
  exactly (the regressors are the sublayer outputs, so the pre-LN LayerNorms inside the sublayers do not
  matter). The fit then gives ``α = c = 1/Δt`` (``= L`` with the default ``Δt = 1/L``), ``D = 0`` and R² = 1:
  a residual Transformer is an Euler step of size ``Δt`` whose "attention strength" is ``1/Δt``, so
  ``|α| Δt ||W^O||_2 = ||W^O||_2``. Coefficients far from ``1/Δt`` or R² < 1 mean the layer is *not* such a
  sum: post-LN (the LayerNorm after each sum), no residual (the update is ``A_l + F_l - u_l``), or dropout
  in training mode. Diffusion-only R² tells how much of the update a local diffusion along tokens explains.

R² is ``1 - SSE/SST`` with ``SST`` the sum of squares of the target about its per-feature mean over the valid
positions; no model has an intercept, so a sub-model can score below 0.

Cost: :func:`pde_fit_statistics` is one Laplacian and a few elementwise products and sums over ``[B, T, d]``
in float64 (``O(B T d)`` time, ``O(d)`` output); :func:`solve_pde_fit` is ``O(d)`` (for a diagonal ``D`` each
``D_j`` is eliminated in closed form and a 2x2 system remains for ``(α, c)``). The statistics are plain sums,
so they can be accumulated over batches and summed across processes before solving.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pdelightning._checks import check_choice
from pdelightning.analysis.laplacian import BOUNDARY_CONDITIONS, laplacian_1d
from pdelightning.analysis.stability import eq21_number

FitDiffusion = Literal["diagonal", "scalar", "none"]
FIT_DIFFUSION = ("diagonal", "scalar", "none")
STAT_KEYS = ("n", "n_attn", "n_ffn", "sum_y", "yy", "ll", "la", "lf", "ly", "aa", "af", "ff", "ay", "fy")
_RTOL = 1e-10  # a column (or direction) with relative energy below this is treated as absent: coefficient 0


@dataclass
class PDEFitResult:
    """The fitted coefficients of eq. (20) for one layer.

    Attributes:
        diffusion: fitted ``D`` per feature, ``[d]`` float64 (a scalar fit is broadcast; zeros for ``"none"``).
        alpha: coefficient ``α`` of the attention output ``A_l``; ``None`` when ``A_l`` was not observed (the term
            was left out of the fit, never fitted as zeros).
        ffn_coef: coefficient ``c`` of the MLP output ``F_l``; ``None`` when ``F_l`` was not observed.
        r2: R² of the full fit (of the terms observed).
        r2_diffusion: R² of the diffusion-only model ``D ∘ ∇²u_l`` refitted alone (same ``D`` kind; ``nan`` for
            ``"none"``).
        r2_attention: R² of the attention-only model ``α A_l`` refitted alone (``nan`` when ``A_l`` was not
            observed).
        residual_rms: root-mean-square residual of the full fit, in units of ``(u_{l+1} - u_l)/Δt``.
        n_positions: number of valid token positions fitted (each contributes ``d`` equations).
        eq21: ``2 max(D) Δt/Δx² + |α| Δt ||W^O||_2`` from the fitted ``D`` and ``α`` (eq. 21), or ``None`` when
            no ``||W^O||_2`` was given or ``α`` was not fitted. ``max(D)`` is taken as fitted: where every fitted
            ``D_j`` is negative (anti-diffusion, ill-posed at any step size) the number understates the danger; read
            ``D`` itself.
    """

    diffusion: Tensor
    alpha: float | None
    ffn_coef: float | None
    r2: float
    r2_diffusion: float
    r2_attention: float
    residual_rms: float
    n_positions: int
    eq21: float | None = None

    @property
    def diffusion_mean(self) -> float:
        """Mean of the fitted ``D`` over features (the number logged per layer)."""
        return float(self.diffusion.mean()) if self.diffusion.numel() else 0.0


def pde_fit_statistics(
    u_in: Tensor,
    u_out: Tensor,
    attn: Tensor | None,
    mlp: Tensor | None,
    valid: Tensor | None = None,
    *,
    dt: float,
    dx: float = 1.0,
    boundary: str = "dirichlet",
) -> dict[str, Tensor]:
    """Sufficient statistics of the eq. (20) fit for one layer and one batch; they add up over batches and ranks.

    The target is ``y = (u_out - u_in)/Δt`` and the regressors ``L = ∇²u_in`` (:func:`laplacian_1d` with
    ``dx``, ``boundary`` and the padding outside the domain), ``A = attn``, ``F = mlp``. Everything is cast to
    float64 before multiplying. Padded positions (``valid`` ``False``) contribute nothing.

    Args:
        u_in: residual stream entering the layer ``u_l``, ``[B, T, d]``.
        u_out: residual stream leaving it ``u_{l+1}``, ``[B, T, d]``.
        attn: attention sublayer output ``A_l`` without ``α``, ``[B, T, d]``; ``None`` when not observed (the term
            is then left out of the fit: ``n_attn`` counts the positions where it was observed).
        mlp: MLP output ``F_l``, ``[B, T, d]``; ``None`` when not observed (likewise, ``n_ffn``).
        valid: ``[B, T]`` boolean, ``True`` at real tokens; ``None`` when all are valid.
        dt: the step ``Δt > 0`` (e.g. the PDE model's own, or ``1/L``).
        dx: token spacing ``Δx > 0``.
        boundary: ``"dirichlet"`` (eq. 7), ``"neumann"`` or ``"periodic"``.

    Returns:
        float64 tensors: ``n`` (valid positions, 0-dim), ``n_attn``/``n_ffn`` (valid positions where ``attn``/``mlp``
        was observed: ``n`` or 0), per feature ``[d]``: ``sum_y`` (Σy), ``ll`` (ΣL²),
        ``la`` (ΣLA), ``lf`` (ΣLF), ``ly`` (ΣLy); and 0-dim sums over features: ``yy``, ``aa``, ``af``, ``ff``,
        ``ay``, ``fy``. Add two such dicts key by key (:func:`add_pde_fit_statistics`, or an all-reduce sum).

    Raises:
        ValueError: on mismatched shapes, ``dt <= 0``, ``dx <= 0`` or an unknown ``boundary``.

    Example::

        >>> u = torch.randn(2, 5, 3); a = torch.randn(2, 5, 3); f = torch.randn(2, 5, 3)
        >>> s = pde_fit_statistics(u, u + 0.5 * (2.0 * a - f), a, f, dt=0.5)
        >>> r = solve_pde_fit(s, diffusion="none")
        >>> round(r.alpha, 6), round(r.ffn_coef, 6), round(r.r2, 6)
        (2.0, -1.0, 1.0)
    """
    if u_in.dim() != 3 or u_out.shape != u_in.shape:
        raise ValueError(f"u_in and u_out must both be [B, T, d], got {tuple(u_in.shape)} and {tuple(u_out.shape)}")
    for name, t in (("attn", attn), ("mlp", mlp)):
        if t is not None and t.shape != u_in.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(u_in.shape)} like u_in")
    if valid is not None and valid.shape != u_in.shape[:2]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected [B, T] = {tuple(u_in.shape[:2])}")
    if dt <= 0 or dx <= 0:
        raise ValueError(f"dt={dt} and dx={dx} must both be positive")
    check_choice("boundary", boundary, BOUNDARY_CONDITIONS)
    u = u_in.detach().double()
    padding = None if valid is None else ~valid.to(device=u.device, dtype=torch.bool)
    keep = torch.ones(u.shape[:2], dtype=u.dtype, device=u.device) if padding is None else (~padding).to(u.dtype)
    w = keep.unsqueeze(-1)  # [B, T, 1]
    y = (u_out.detach().double() - u) / dt * w
    lap = laplacian_1d(u, dx, boundary, padding) * w
    zeros = torch.zeros_like(u)
    a = zeros if attn is None else attn.detach().double() * w
    f = zeros if mlp is None else mlp.detach().double() * w

    def per_feature(x: Tensor, z: Tensor) -> Tensor:
        return (x * z).sum((0, 1))

    none = keep.new_zeros(())
    return {
        "n": keep.sum(),
        "n_attn": keep.sum() if attn is not None else none,
        "n_ffn": keep.sum() if mlp is not None else none,
        "sum_y": y.sum((0, 1)),
        "yy": (y * y).sum(),
        "ll": per_feature(lap, lap),
        "la": per_feature(lap, a),
        "lf": per_feature(lap, f),
        "ly": per_feature(lap, y),
        "aa": (a * a).sum(),
        "af": (a * f).sum(),
        "ff": (f * f).sum(),
        "ay": (a * y).sum(),
        "fy": (f * y).sum(),
    }


def add_pde_fit_statistics(*stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-by-key sum of statistics from :func:`pde_fit_statistics` (batches, or ranks gathered by hand).

    Raises:
        ValueError: when nothing is given or a dict lacks one of :data:`STAT_KEYS`.
    """
    if not stats:
        raise ValueError("add_pde_fit_statistics needs at least one statistics dict")
    for s in stats:
        missing = [k for k in STAT_KEYS if k not in s]
        if missing:
            raise ValueError(f"statistics lack keys {missing}; expected {STAT_KEYS}")
    return {k: torch.stack([s[k].double() for s in stats]).sum(0) for k in STAT_KEYS}


def _scaled_pinv_solve(G: Tensor, b: Tensor) -> Tensor:  # noqa: N803
    """Minimum-norm solution of the normal equations ``G θ = b`` (``G`` symmetric PSD), column-scaled first.

    Scaling by ``1/sqrt(diag G)`` makes the cut-off scale-free; a column with zero energy gets coefficient 0.
    """
    diag = G.diagonal()
    s = torch.where(diag > 0, diag.clamp_min(torch.finfo(G.dtype).tiny).rsqrt(), torch.zeros_like(diag))
    Gs = s[:, None] * G * s[None, :]
    return s * (torch.linalg.pinv(Gs, rtol=_RTOL, hermitian=True) @ (s * b))


def _r2(sse: Tensor, sst: Tensor) -> float:
    sse = sse.clamp_min(0.0)
    if float(sst) <= 0.0:
        return 1.0 if float(sse) <= 0.0 else float("nan")
    return float(1.0 - sse / sst)


def solve_pde_fit(
    stats: Mapping[str, Tensor],
    diffusion: FitDiffusion = "diagonal",
    *,
    dt: float | None = None,
    dx: float = 1.0,
    w_o_norm: float | None = None,
) -> PDEFitResult:
    """Solve the eq. (20) least-squares fit from (summed) :func:`pde_fit_statistics`, in closed form.

    ``"diagonal"``: the normal equations of feature ``j`` give ``D_j = (ly_j - α la_j - c lf_j)/ll_j``;
    substituting leaves the 2x2 system ``(G - Σ_j g_j g_jᵀ/ll_j) (α, c) = (ay, fy) - Σ_j g_j ly_j/ll_j`` with
    ``g_j = (la_j, lf_j)``, ``G = [[aa, af], [af, ff]]``. ``"scalar"``: the 3x3 system in ``(D, α, c)``.
    ``"none"``: the 2x2 system ``G (α, c) = (ay, fy)``. A term not observed at every position (``n_attn``/``n_ffn``
    below ``n``: the sublayer's output was not found) is left out of the system and its coefficient is ``None``.
    Degenerate columns (a feature whose Laplacian is zero, an all-zero sublayer output, collinear regressors) get
    the minimum-norm solution: coefficient 0 where nothing is identifiable. The residual is ``SSE = yy - βᵀXᵀy`` at
    the optimum.

    Args:
        stats: statistics from :func:`pde_fit_statistics`, possibly summed over batches and ranks.
        diffusion: ``"diagonal"`` (one ``D`` per feature), ``"scalar"`` or ``"none"`` (no diffusion term).
        dt: the step used for the statistics; needed only for ``eq21``.
        dx: token spacing; used only for ``eq21``.
        w_o_norm: ``||W^O||_2`` of the layer's attention output projection; with ``dt`` gives ``eq21``.

    Returns:
        :class:`PDEFitResult`.

    Raises:
        ValueError: on an unknown ``diffusion``, missing keys, or no valid positions.
    """
    check_choice("diffusion", diffusion, FIT_DIFFUSION)
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"statistics lack keys {missing}; expected {STAT_KEYS} from pde_fit_statistics")
    s = {k: stats[k].detach().double().cpu() for k in STAT_KEYS}
    n = float(s["n"])
    if n <= 0:
        raise ValueError("no valid positions in the statistics (n = 0): nothing to fit")
    d = s["sum_y"].numel()
    yy = s["yy"]
    sst = yy - (s["sum_y"] ** 2).sum() / n
    ll, la, lf, ly = s["ll"], s["la"], s["lf"], s["ly"]
    # the terms observed at every position; a term seen nowhere (or only in some batches) is left out, never zero
    terms = [i for i, k in enumerate(("n_attn", "n_ffn")) if float(s[k]) == n]
    G = torch.stack([torch.stack([s["aa"], s["af"]]), torch.stack([s["af"], s["ff"]])])[terms][:, terms]
    b = torch.stack([s["ay"], s["fy"]])[terms]
    present = ll > _RTOL * ll.max().clamp_min(torch.finfo(ll.dtype).tiny)  # features with a usable Laplacian
    inv_ll = torch.where(present, 1.0 / ll.clamp_min(torch.finfo(ll.dtype).tiny), torch.zeros_like(ll))

    if diffusion == "diagonal":
        g = torch.stack([la, lf], 1)[:, terms]  # [d, k]
        theta = _scaled_pinv_solve(G - (g * inv_ll[:, None]).T @ g, b - (g * (ly * inv_ll)[:, None]).sum(0))
        D = (ly - g @ theta) * inv_ll
        explained = (D * ly).sum() + theta @ b
        sse_diffusion = yy - (ly**2 * inv_ll).sum()
    elif diffusion == "scalar":
        sl = torch.stack([ll.sum(), la.sum(), lf.sum()])[[0] + [t + 1 for t in terms]]
        G3 = torch.cat([sl[None, :], torch.cat([sl[1:, None], G], 1)], 0)
        b3 = torch.cat([ly.sum()[None], b])
        beta = _scaled_pinv_solve(G3, b3)
        D, theta = beta[:1].expand(d).clone(), beta[1:]
        explained = beta @ b3
        sse_diffusion = yy - (ly.sum() ** 2 / ll.sum() if float(ll.sum()) > 0 else 0.0)
    else:
        theta = _scaled_pinv_solve(G, b)
        D = torch.zeros(d, dtype=torch.float64)
        explained = theta @ b
        sse_diffusion = None
    sse = (yy - explained).clamp_min(0.0)
    coef = {t: float(theta[i]) for i, t in enumerate(terms)}
    alpha, ffn_coef = coef.get(0), coef.get(1)
    r2_attention = _r2(yy - (s["ay"] ** 2 / s["aa"] if float(s["aa"]) > 0 else 0.0), sst) if 0 in terms else math.nan
    return PDEFitResult(
        diffusion=D,
        alpha=alpha,
        ffn_coef=ffn_coef,
        r2=_r2(sse, sst),
        r2_diffusion=float("nan") if sse_diffusion is None else _r2(torch.as_tensor(sse_diffusion), sst),
        r2_attention=r2_attention,
        residual_rms=float((sse / (n * d)).sqrt()),
        n_positions=round(n),
        eq21=None if w_o_norm is None or dt is None or alpha is None else eq21_number(D, alpha, dt, dx, w_o_norm),
    )


def fit_pde_layer(
    u_in: Tensor,
    u_out: Tensor,
    attn: Tensor | None,
    mlp: Tensor | None,
    valid: Tensor | None = None,
    *,
    dt: float,
    dx: float = 1.0,
    boundary: str = "dirichlet",
    diffusion: FitDiffusion = "diagonal",
    w_o_norm: float | None = None,
) -> PDEFitResult:
    """Fit eq. (20) to one layer from one batch: :func:`solve_pde_fit` of :func:`pde_fit_statistics`.

    Args:
        u_in: residual stream entering the layer, ``[B, T, d]``.
        u_out: residual stream leaving it, ``[B, T, d]``.
        attn: attention sublayer output without ``α``, ``[B, T, d]``, or ``None``.
        mlp: MLP output, ``[B, T, d]``, or ``None``.
        valid: ``[B, T]`` boolean, ``True`` at real tokens; ``None`` when all are valid.
        dt: the step ``Δt``.
        dx: token spacing ``Δx``.
        boundary: ``"dirichlet"``, ``"neumann"`` or ``"periodic"``.
        diffusion: ``"diagonal"``, ``"scalar"`` or ``"none"``.
        w_o_norm: ``||W^O||_2`` for the eq. (21) number, or ``None``.

    Returns:
        :class:`PDEFitResult`.

    Example::

        >>> from pdelightning.analysis.laplacian import laplacian_1d
        >>> g = torch.Generator().manual_seed(0)
        >>> u, a, f = (torch.randn(4, 6, 2, generator=g, dtype=torch.float64) for _ in range(3))
        >>> D = torch.tensor([0.3, 0.1], dtype=torch.float64)
        >>> u_next = u + 0.1 * (D * laplacian_1d(u) + 1.5 * a + f)
        >>> r = fit_pde_layer(u, u_next, a, f, dt=0.1)
        >>> [round(x, 6) for x in r.diffusion.tolist()], round(r.alpha, 6), round(r.ffn_coef, 6), round(r.r2, 6)
        ([0.3, 0.1], 1.5, 1.0, 1.0)
    """
    stats = pde_fit_statistics(u_in, u_out, attn, mlp, valid, dt=dt, dx=dx, boundary=boundary)
    return solve_pde_fit(stats, diffusion, dt=dt, dx=dx, w_o_norm=w_o_norm)
