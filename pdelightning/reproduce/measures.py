"""Model-level measurements the analysis needs that are not callbacks' math: eq. (21) per step of a PDE model,
the effective rank of token representations, and the depth-refined PDE model (2L steps of Δt/2).

``effective_rank`` is new math with no home in :mod:`pdelightning.analysis` yet; it belongs in
``pdelightning/analysis/representation.py`` and should move there (the report imports it from here until then).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pdelightning.analysis.stability import eq21_number, exact_spectral_norm


def effective_rank(h: Tensor, padding_mask: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Effective rank of each sample's token matrix, ``exp(H(p))`` with ``p = σ / Σσ`` (Roy & Vetterli 2007).

    Each sample's ``[T, d]`` token matrix (valid tokens only) is centred over its tokens, its singular values
    ``σ`` are normalised to a distribution ``p``, and the exponential of its Shannon entropy is returned: between 1
    (all tokens on one line through their mean: rank collapse, Dong et al. 2021) and ``min(T - 1, d)``. A sample
    whose centred tokens are all zero (every token equal) has effective rank 0 by convention.

    Args:
        h: ``[B, T, d]``.
        padding_mask: ``[B, T]``, ``True`` at padding, or ``None``.
        eps: singular values below ``eps`` times the largest count as zero.

    Returns:
        ``[B]`` effective ranks (float64).

    Example::

        >>> x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]]])
        >>> round(float(effective_rank(x)[0]), 4)  # σ = (2√2, √2), p = (2/3, 1/3), exp(H(p))
        1.8899
    """
    h = h.detach().double()
    if padding_mask is None or not bool(padding_mask.any()):
        return _erank_from_singular_values(torch.linalg.svdvals(h - h.mean(1, keepdim=True)), eps)
    out = torch.zeros(h.shape[0], dtype=torch.float64)
    for i in range(h.shape[0]):
        x = h[i][~padding_mask[i].bool()]
        if x.shape[0] >= 2:
            out[i] = _erank_from_singular_values(torch.linalg.svdvals(x - x.mean(0, keepdim=True))[None], eps)[0]
    return out


def _erank_from_singular_values(s: Tensor, eps: float) -> Tensor:
    """``exp(H(σ / Σσ))`` per row of ``s`` ``[B, k]`` (values below ``eps`` x the row's largest ignored); rows
    that are all zero give 0, rows with a non-finite value ``nan``.
    """
    finite = torch.isfinite(s).all(-1)
    s = torch.where(torch.isfinite(s), s, torch.zeros(()))
    top = s.max(-1, keepdim=True).values
    s = torch.where(s > eps * top, s, torch.zeros(()))
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    erank = torch.exp(-torch.xlogy(p, p).sum(-1))
    erank = torch.where(total.squeeze(-1) > 0, erank, torch.zeros(()))
    return torch.where(finite, erank, torch.full_like(erank, float("nan")))


def eq21_per_step(model: nn.Module) -> dict[str, float]:
    """Eq. (21), ``2 D Δt / Δx² + |α| Δt ||W^O||_2``, of every PDE step of ``model`` (``{layer: number}``).

    ``D`` is each step's largest diffusion coefficient; ``||W^O||_2`` the exact spectral norm of the attention
    output projection (:func:`~pdelightning.analysis.stability.exact_spectral_norm`). Layers without PDE
    coefficients are skipped.
    """
    out = {}
    for target in model.analysis_targets().layers:  # type: ignore[operator]
        if target.pde is None or target.out_proj is None:
            continue
        w = exact_spectral_norm(target.out_proj.weight.detach()).sigma
        p = target.pde
        out[target.name] = eq21_number(p.diffusion, p.alpha, p.dt, p.dx, float(w))
    return out


def eq21_coefficient(model: nn.Module) -> float:
    """``max_l (2 D_l / Δx² + |α_l| ||W^O_l||_2)``: eq. (21) per unit Δt, so ``Δt = target / coefficient``."""
    values = []
    for target in model.analysis_targets().layers:  # type: ignore[operator]
        if target.pde is None or target.out_proj is None:
            continue
        w = exact_spectral_norm(target.out_proj.weight.detach()).sigma
        p = target.pde
        values.append(eq21_number(p.diffusion, p.alpha, 1.0, p.dx, float(w)))
    if not values:
        raise ValueError(f"{type(model).__name__} has no PDE steps: eq. (21) needs a PDEClassifier")
    return max(values)


def refined(model: nn.Module, factor: int = 2) -> nn.Module:
    """The same PDE model run as ``factor x L`` explicit Euler steps of ``Δt / factor``, each step's weights repeated.

    For a continuous-depth model this is a finer discretisation of the same trajectory (eq. 20 with a smaller
    step); for a model whose trained weights exploit the step size it is a different function. The copy shares no
    storage with ``model``.

    Raises:
        ValueError: when ``model`` has no PDE steps (``blocks`` with a ``dt``), or ``factor < 1``.
    """
    if factor < 1:
        raise ValueError(f"factor={factor} must be >= 1")
    blocks = getattr(model, "blocks", None)
    if not blocks or not all(hasattr(b, "dt") for b in blocks):
        raise ValueError(f"{type(model).__name__} has no PDE steps with a dt to refine")
    if any(getattr(b, "c_in", None) is not None for b in blocks):
        raise ValueError("refining a PDE model with inter-layer couplings (eqs. 18-19) is not defined here")
    new = copy.deepcopy(model)
    steps = []
    for b in new.blocks:
        for _ in range(factor):
            s = copy.deepcopy(b)
            s.dt = b.dt / factor
            steps.append(s)
    new.blocks = nn.ModuleList(steps)
    return new.eval()
