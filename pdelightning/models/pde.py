"""The PDE counterpart of the Transformer: explicit Euler steps of the multi-layer field equation.

The token field ``u(x, t)`` (x = token position, t = depth) evolves by eq. (4)/(17),

    du_l/dt = D_l ∇²u_l + α_l A_l(u_l) + R_l(u_l) + C_{l-1,l}(u_{l-1}) - C_{l,l+1}(u_l),

with ``R_l(u) = FFN_l(u) + g(x, t)`` (eqs. 12-13) and linear inter-layer couplings ``C`` (eqs. 18-19),
discretised by eq. (20): one explicit Euler step of size ``Δt`` per layer, and the Laplacian by the
three-point stencil along token positions with spacing ``Δx``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdelightning._checks import InputKind, Tokenization, check_choice
from pdelightning.analysis.laplacian import BOUNDARY_CONDITIONS, BoundaryCondition, laplacian_1d
from pdelightning.models.attention import MultiHeadSelfAttention
from pdelightning.models.base import NORM_PLACEMENTS, NormPlacement, SequenceClassifier
from pdelightning.models.hooks import HookPoint
from pdelightning.models.protocol import PDEStepParams
from pdelightning.models.transformer import FeedForward

DiffusionKind = Literal["diagonal", "scalar", "none"]
DIFFUSION_KINDS = ("diagonal", "scalar", "none")


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class PDEStep(nn.Module):
    """One explicit Euler step of eq. (20) for layer ``l``:

    ``u_{l+1} = u_l + Δt (D_l ∇²u_l + α_l A_l(u_l) + FFN_l(u_l) + g + C_{l-1,l}(u_{l-1}) - C_{l,l+1}(u_l))``.

    ``D_l`` is kept non-negative through a softplus (a negative diffusion would be ill-posed);
    :meth:`diffusion_coefficients` returns its value. ``u_{l-1}`` of the first step is ``u_0``.
    Padded positions are not updated.

    Hook points:
        ``hook_resid_pre``, ``hook_diffusion`` (``D ∇²u``), ``hook_attn_out`` (``α A(u)``), ``hook_mlp_out``
        (``FFN(u)``), ``hook_resid_post`` (``u_{l+1}``), all ``[B, T, d]``; ``attn.hook_pattern``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dt: float,
        dx: float,
        diffusion: DiffusionKind,
        diffusion_init: float,
        alpha_init: float,
        boundary: BoundaryCondition,
        forcing: bool,
        coupling: bool,
        norm: NormPlacement,
        dropout: float,
    ) -> None:
        super().__init__()
        self.dt, self.dx, self.boundary, self.forcing, self.norm = dt, dx, boundary, forcing, norm
        self.diffusion = diffusion
        n_d = {"diagonal": d_model, "scalar": 1, "none": 0}[diffusion]
        self.diffusion_init, self.alpha_init = diffusion_init, alpha_init
        self.raw_diffusion = nn.Parameter(torch.full((n_d,), _inverse_softplus(diffusion_init) if n_d else 0.0))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.attn = MultiHeadSelfAttention(d_model, n_heads, dropout)
        self.mlp = FeedForward(d_model, d_ff, dropout)
        self.c_in = nn.Linear(d_model, d_model) if coupling else None
        self.c_out = nn.Linear(d_model, d_model) if coupling else None
        self.ln = nn.LayerNorm(d_model) if norm != "none" else nn.Identity()
        self.hook_resid_pre = HookPoint()
        self.hook_diffusion = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def reset_parameters(self) -> None:
        """Reset ``D_l`` and ``α_l`` to their initial values (the sublayers reset themselves)."""
        with torch.no_grad():
            if self.raw_diffusion.numel():
                self.raw_diffusion.fill_(_inverse_softplus(self.diffusion_init))
            self.alpha.fill_(float(self.alpha_init))

    def diffusion_coefficients(self) -> Tensor:
        """``D_l`` as a tensor of shape ``[d]`` (diagonal), ``[1]`` (scalar) or ``[0]`` (off)."""
        return F.softplus(self.raw_diffusion)

    def step_params(self) -> PDEStepParams:
        """Detached coefficients for the stability analysis (eq. 21)."""
        d = self.diffusion_coefficients().detach()
        return PDEStepParams(
            diffusion=d if d.numel() else torch.zeros(1), alpha=float(self.alpha.detach()), dt=self.dt, dx=self.dx
        )

    def forward(self, u: Tensor, padding_mask: Tensor | None, u_prev: Tensor, u0: Tensor) -> Tensor:
        """Advance the field by one step of size ``Δt``."""
        u = self.hook_resid_pre(u)
        v = self.ln(u) if self.norm == "pre" else u
        rhs = self.hook_attn_out(self.alpha * self.attn(v, padding_mask)) + self.hook_mlp_out(self.mlp(v))
        if self.diffusion != "none":
            rhs = rhs + self.hook_diffusion(
                self.diffusion_coefficients() * laplacian_1d(v, self.dx, self.boundary, padding_mask)
            )
        if self.forcing:
            rhs = rhs + u0  # g(x, t) = u_0(x): the input re-injected at every step
        if self.c_in is not None and self.c_out is not None:
            rhs = rhs + self.c_in(u_prev) - self.c_out(u)
        if padding_mask is not None:
            rhs = rhs.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        u = u + self.dt * rhs
        if self.norm == "post":
            u = self.ln(u)
        return self.hook_resid_post(u)


class PDEClassifier(SequenceClassifier):
    """PDE classifier: ``L`` explicit Euler steps of eq. (20) on the embedded token field, then a head.

    Without stabilizers by default (``norm="none"``): the Euler update ``u + Δt f(u)`` is the only
    residual path, as in the paper's simulator. Stability of each step is governed by eq. (21),
    ``2 D Δt / Δx² + α Δt ||W^O||_2 <= 1``, which :class:`~pdelightning.callbacks.StabilityMonitor` tracks.

    Args:
        num_classes: number of classes.
        d_model: width ``d`` of the field ``u``.
        n_layers: number of Euler steps ``L``.
        n_heads: attention heads in ``A_l``; must divide ``d_model``.
        d_ff: FFN hidden width.
        dt: time step ``Δt > 0``.
        dx: grid spacing ``Δx > 0`` along token positions.
        diffusion: ``"diagonal"`` (learnable per-feature ``D_l``), ``"scalar"`` or ``"none"``.
        diffusion_init: initial ``D_l`` (> 0 unless ``diffusion="none"``).
        alpha_init: initial attention strength ``α_l``.
        boundary: ``"dirichlet"`` (eq. 7), ``"neumann"`` or ``"periodic"``.
        forcing: add ``g(x, t) = u_0(x)`` to every step.
        coupling: add the linear inter-layer couplings of eqs. (18)-(19).
        norm: LayerNorm ``"none"`` (default), ``"pre"`` (inside the right-hand side) or ``"post"`` (after each step).
        final_norm: a LayerNorm on the last step's field before pooling, as the pre-LN Transformer has (``ln_final``).
            Off by default (the paper's simulator has none); on, the two models differ only in their steps, which
            model-vs-model comparisons under perturbation need (without it only the Transformer's output is bounded).
        dropout: dropout on attention probabilities and FFN hidden units.
        input_kind, image_size, tokenization, patch_size, vocab_size, max_len, pad_id, bottleneck_dim:
            as for :class:`~pdelightning.models.TransformerClassifier`.

    Raises:
        ValueError: on ``dt <= 0``, ``dx <= 0``, an unknown boundary, diffusion kind or norm, and bad sizes.

    Example::

        >>> import torch
        >>> model = PDEClassifier(num_classes=10, d_model=32, n_layers=3, n_heads=4, image_size=8)
        >>> model(torch.rand(5, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        d_model: int = 64,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 128,
        dt: float = 0.25,
        dx: float = 1.0,
        diffusion: DiffusionKind = "diagonal",
        diffusion_init: float = 0.1,
        alpha_init: float = 1.0,
        boundary: BoundaryCondition = "dirichlet",
        forcing: bool = False,
        coupling: bool = False,
        norm: NormPlacement = "none",
        final_norm: bool = False,
        dropout: float = 0.0,
        input_kind: InputKind = "image",
        image_size: int = 28,
        tokenization: Tokenization = "rows",
        patch_size: int = 4,
        vocab_size: int = 0,
        max_len: int = 256,
        pad_id: int = 0,
        bottleneck_dim: int | None = 32,
    ) -> None:
        if dt <= 0:
            raise ValueError(f"dt={dt} must be positive")
        if dx <= 0:
            raise ValueError(f"dx={dx} must be positive")
        check_choice("boundary", boundary, BOUNDARY_CONDITIONS)
        check_choice("diffusion", diffusion, DIFFUSION_KINDS)
        if diffusion != "none" and diffusion_init <= 0:
            raise ValueError(f"diffusion_init={diffusion_init} must be positive when diffusion={diffusion!r}")
        check_choice("norm", norm, NORM_PLACEMENTS)
        if n_layers <= 0:
            raise ValueError(f"n_layers={n_layers} must be positive")
        if d_ff <= 0:
            raise ValueError(f"d_ff={d_ff} must be positive (the FFN hidden width)")
        super().__init__(
            num_classes,
            d_model,
            input_kind,
            image_size,
            tokenization,
            patch_size,
            vocab_size,
            max_len,
            pad_id,
            bottleneck_dim,
        )
        self.blocks.extend(
            PDEStep(
                d_model,
                n_heads,
                d_ff,
                dt,
                dx,
                diffusion,
                diffusion_init,
                alpha_init,
                boundary,
                forcing,
                coupling,
                norm,
                dropout,
            )
            for _ in range(n_layers)
        )
        if final_norm:
            self.ln_final = nn.LayerNorm(d_model)
