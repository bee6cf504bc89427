"""Model-level measurements the analysis needs that are not callbacks' math: eq. (21) per step of a PDE model and
the depth-refined PDE model (2L steps of Δt/2). The effective rank lives in :mod:`pdelightning.analysis.rank`
(re-exported here for older imports).
"""

from __future__ import annotations

import copy

from torch import nn

from pdelightning.analysis.rank import effective_rank
from pdelightning.analysis.stability import eq21_number, exact_spectral_norm

__all__ = ["effective_rank", "eq21_coefficient", "eq21_per_step", "refined"]


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
