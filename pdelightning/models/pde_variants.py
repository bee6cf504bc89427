"""The paper's own PDE models (§3.1-3.4), beside our attention + FFN :class:`~pdelightning.models.PDEClassifier`.

The paper's experiments do not use its full field equation (eq. 1/4). They use simpler models, described in one
sentence each:

* §3.1-3.2 (MNIST): "a PDE model that simulates diffusion-based information flow by iteratively updating the state
  based on neighboring differences" -> :class:`DiffusionPDEClassifier`, explicit Euler steps of ``du/dt = D ∇²u``
  (eq. 20 with ``α = 0``, ``R = 0``, ``C = 0``).
* §3.3 (20 Newsgroups): "a custom PDE model with linear layers and ReLU activations", four layers, 128 hidden
  -> :class:`LinearPDEClassifier` with ``activation="relu"``.
* §3.4 (20 Newsgroups): "embedding and multiple linear layers", four layers, 128 hidden -> :class:`LinearPDEClassifier`
  with ``activation="none"``.

Every choice the sentences leave open is ours and marked "(ours)" where it is made. Both classes share everything
else with our classifiers (:class:`~pdelightning.models.SequenceClassifier`: the input embedding, masked mean
pooling, the optional Gaussian bottleneck and the head; blocks called as ``block(u, padding_mask, u_prev, u0)``;
hook points ``hook_embed``, ``blocks.{i}.hook_resid_post``, ``hook_pooled``), so they train with the same task and
data modules and are built by LightningCLI from YAML like ``PDEClassifier``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdelightning._checks import check_choice
from pdelightning.analysis.laplacian import BOUNDARY_CONDITIONS, BoundaryCondition, laplacian_1d
from pdelightning.models.base import SequenceClassifier
from pdelightning.models.embedding import InputKind, Tokenization
from pdelightning.models.hooks import HookPoint
from pdelightning.models.pde import _inverse_softplus
from pdelightning.models.protocol import AnalysisTargets, LayerTarget, PDEStepParams

DiffusionShape = Literal["diagonal", "scalar"]
DIFFUSION_SHAPES = ("diagonal", "scalar")
Activation = Literal["relu", "none"]
ACTIVATIONS = ("relu", "none")


class DiffusionStep(nn.Module):
    """One explicit Euler step of pure diffusion, eq. (20) with only its diffusion term (§3.1):

    ``u_{l+1}(x) = u_l(x) + Δt D_l (u_l(x-Δx) - 2 u_l(x) + u_l(x+Δx)) / Δx²``, along token positions ``x``.

    ``D_l`` is per feature (``"diagonal"``) or one number (``"scalar"``); learned through a softplus (kept
    non-negative) or fixed at ``diffusion_init``. Padded positions lie outside the domain (see
    :func:`~pdelightning.analysis.laplacian.laplacian_1d`) and are not updated. The step is stable, eq. (21) with
    ``α = 0``, when ``2 D_l Δt / Δx² <= 1``.

    Hook points:
        ``hook_resid_pre``, ``hook_diffusion`` (``D ∇²u``), ``hook_resid_post`` (``u_{l+1}``), all ``[B, T, d]``.
    """

    def __init__(
        self,
        d_model: int,
        dt: float,
        dx: float,
        diffusion: DiffusionShape,
        diffusion_init: float,
        learn_diffusion: bool,
        boundary: BoundaryCondition,
    ) -> None:
        super().__init__()
        self.dt, self.dx, self.boundary, self.diffusion = dt, dx, boundary, diffusion
        self.diffusion_init, self.learn_diffusion = diffusion_init, learn_diffusion
        n_d = d_model if diffusion == "diagonal" else 1
        if learn_diffusion:
            self.raw_diffusion = nn.Parameter(torch.full((n_d,), _inverse_softplus(diffusion_init)))
        else:
            self.register_buffer("fixed_diffusion", torch.full((n_d,), float(diffusion_init)))
        self.hook_resid_pre = HookPoint()
        self.hook_diffusion = HookPoint()
        self.hook_resid_post = HookPoint()

    def reset_parameters(self) -> None:
        """Reset a learned ``D_l`` to ``diffusion_init`` (a fixed one never changes)."""
        if self.learn_diffusion:
            with torch.no_grad():
                self.raw_diffusion.fill_(_inverse_softplus(self.diffusion_init))

    def diffusion_coefficients(self) -> Tensor:
        """``D_l`` as ``[d]`` (diagonal) or ``[1]`` (scalar)."""
        return F.softplus(self.raw_diffusion) if self.learn_diffusion else self.fixed_diffusion

    def step_params(self) -> PDEStepParams:
        """Detached coefficients for the stability analysis (eq. 21 with ``α = 0``)."""
        return PDEStepParams(diffusion=self.diffusion_coefficients().detach(), alpha=0.0, dt=self.dt, dx=self.dx)

    @torch.no_grad()
    def mixing_matrix(self, n_tokens: int) -> Tensor:
        """The step as a linear map over token positions: ``u_{l+1} = M u_l`` per feature (no padding).

        ``M = I + Δt D (shift_left - 2 I + shift_right) / Δx²`` with the boundary's ghost cells, ``[k, T, T]`` with
        ``k = d`` (diagonal ``D``) or ``1`` (scalar): row ``i`` is how much token ``i`` takes from each token, the
        diffusion counterpart of an attention row (§3.2 compares the two).
        """
        eye = torch.eye(n_tokens)
        lap = laplacian_1d(eye.unsqueeze(0), self.dx, self.boundary)[0]  # [T, T]: column j is ∇² of e_j
        d = self.diffusion_coefficients().detach().float().cpu()
        return eye + self.dt * d[:, None, None] * lap

    def forward(self, u: Tensor, padding_mask: Tensor | None, u_prev: Tensor, u0: Tensor) -> Tensor:
        """Advance the field by one step of size ``Δt`` (``u_prev`` and ``u0`` are unused)."""
        u = self.hook_resid_pre(u)
        rhs = self.hook_diffusion(self.diffusion_coefficients() * laplacian_1d(u, self.dx, self.boundary, padding_mask))
        return self.hook_resid_post(u + self.dt * rhs)


class LinearStep(nn.Module):
    """One explicit Euler step whose right-hand side is one linear layer, with or without a ReLU (§3.3, §3.4):

    ``u_{l+1} = u_l + Δt act(W_l u_l + b_l)``, token by token, ``act`` = ReLU (§3.3) or the identity (§3.4).

    The Euler form ``u + Δt f(u)`` is ours: the paper names the layers, not how they are composed; we take the form
    of its eq. (20) so that "PDE model" means the same time stepping as our full model (ours). Dropout acts on
    ``act(W u + b)`` (ours). Padded positions are not updated.

    Hook points:
        ``hook_resid_pre``, ``hook_mlp_out`` (``act(W u + b)``), ``hook_resid_post`` (``u_{l+1}``), ``[B, T, d]``.
    """

    def __init__(self, d_model: int, dt: float, activation: Activation, dropout: float) -> None:
        super().__init__()
        self.dt, self.activation = dt, activation
        self.linear = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.hook_resid_pre = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, u: Tensor, padding_mask: Tensor | None, u_prev: Tensor, u0: Tensor) -> Tensor:
        """Advance the field by one step of size ``Δt`` (``u_prev`` and ``u0`` are unused)."""
        u = self.hook_resid_pre(u)
        f = self.linear(u)
        if self.activation == "relu":
            f = F.relu(f)
        f = self.hook_mlp_out(self.dropout(f))
        if padding_mask is not None:
            f = f.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return self.hook_resid_post(u + self.dt * f)


def _check_common(n_layers: int, dt: float) -> None:
    if n_layers <= 0:
        raise ValueError(f"n_layers={n_layers} must be positive")
    if dt <= 0:
        raise ValueError(f"dt={dt} must be positive")


class _Variant(SequenceClassifier):
    """What the variants share: an optional final LayerNorm and the analysis protocol without attention."""

    def _finish(self, final_norm: bool) -> None:
        if final_norm:
            self.ln_final = nn.LayerNorm(self.d_model)

    def analysis_targets(self) -> AnalysisTargets:
        """The analysis protocol: each step's ``hook_resid_post``; no attention, ``W^O`` or FFN sublayer."""
        return AnalysisTargets(
            embedding=self.hook_embed,
            layers=[
                LayerTarget(
                    name=f"blocks.{i}",
                    module=blk.hook_resid_post,
                    pde=blk.step_params() if hasattr(blk, "step_params") else None,
                    block=blk,
                )
                for i, blk in enumerate(self.blocks)
            ],
            family="ours",
        )


class DiffusionPDEClassifier(_Variant):
    """The paper's §3.1-3.2 PDE model: ``L`` explicit Euler steps of ``du/dt = D ∇²u`` on the embedded token field.

    §3.1 describes it as "iteratively updating the state based on neighboring differences, similar to the diffusion
    process in PDEs"; eq. (20) with only the diffusion term is that update. Choices the paper does not state (ours):
    the neighbours are adjacent token positions (image rows for MNIST, as our other models tokenise it; §2.3 maps
    "spatial dimensions" to sequence positions); ``D_l`` per layer and per feature, learned, initialised at 0.1;
    Dirichlet boundary (eq. 7); the embedding, pooling, bottleneck and head of our other models. Without
    ``final_norm`` the model is linear in its input embedding (diffusion, mean pooling and head are linear maps).

    Args:
        num_classes: number of classes.
        d_model: width ``d`` of the field ``u`` (the paper's heatmaps show 64 dimensions).
        n_layers: number of Euler steps ``L`` (the paper's tables show 10 layers).
        dt: time step ``Δt > 0``.
        dx: grid spacing ``Δx > 0`` along token positions.
        diffusion: ``"diagonal"`` (a ``D_l`` per feature) or ``"scalar"``.
        diffusion_init: initial (or, with ``learn_diffusion=False``, fixed) ``D_l > 0``.
        learn_diffusion: train ``D_l`` (through a softplus) or keep it fixed.
        boundary: ``"dirichlet"`` (eq. 7), ``"neumann"`` or ``"periodic"``.
        final_norm: a LayerNorm before pooling, as our full PDE model's configs have (off by default).
        input_kind, image_size, tokenization, patch_size, vocab_size, max_len, pad_id, bottleneck_dim:
            as for :class:`~pdelightning.models.PDEClassifier`.

    Raises:
        ValueError: on ``dt``, ``dx``, ``diffusion_init`` or ``n_layers`` not positive, an unknown ``diffusion`` or
            ``boundary``.

    Example::

        >>> import torch
        >>> model = DiffusionPDEClassifier(num_classes=10, d_model=16, n_layers=3, image_size=8)
        >>> model(torch.rand(5, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        d_model: int = 64,
        n_layers: int = 10,
        dt: float = 0.1,
        dx: float = 1.0,
        diffusion: DiffusionShape = "diagonal",
        diffusion_init: float = 0.1,
        learn_diffusion: bool = True,
        boundary: BoundaryCondition = "dirichlet",
        final_norm: bool = False,
        input_kind: InputKind = "image",
        image_size: int = 28,
        tokenization: Tokenization = "rows",
        patch_size: int = 4,
        vocab_size: int = 0,
        max_len: int = 256,
        pad_id: int = 0,
        bottleneck_dim: int | None = 32,
    ) -> None:
        _check_common(n_layers, dt)
        if dx <= 0:
            raise ValueError(f"dx={dx} must be positive")
        if diffusion_init <= 0:
            raise ValueError(f"diffusion_init={diffusion_init} must be positive")
        check_choice("diffusion", diffusion, DIFFUSION_SHAPES)
        check_choice("boundary", boundary, BOUNDARY_CONDITIONS)
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
            DiffusionStep(d_model, dt, dx, diffusion, diffusion_init, learn_diffusion, boundary)
            for _ in range(n_layers)
        )
        self._finish(final_norm)


class LinearPDEClassifier(_Variant):
    """The paper's §3.3 / §3.4 PDE models: ``L`` Euler steps ``u + Δt act(W_l u + b_l)`` on the embedded tokens.

    §3.3: "a custom PDE model with linear layers and ReLU activations" (``activation="relu"``); §3.4: "embedding and
    multiple linear layers" (``activation="none"``); both "four layers and 128 hidden dimensions". Choices the paper
    does not state (ours): the Euler form of each layer (:class:`LinearStep`), one ``d x d`` linear map per layer
    applied to every token, ``Δt`` (our full 20 Newsgroups PDE model's 0.25 in the configs), dropout on the update,
    and the embedding, masked mean pooling, bottleneck and head of our other models. Tokens do not interact inside
    the steps (no diffusion or attention term): only the pooling mixes them.

    Args:
        num_classes: number of classes.
        d_model: width ``d`` (the paper: 128).
        n_layers: number of steps ``L`` (the paper: 4).
        dt: time step ``Δt > 0``.
        activation: ``"relu"`` (§3.3) or ``"none"`` (§3.4).
        dropout: dropout on each step's update.
        final_norm: a LayerNorm before pooling, as our full PDE model's configs have (off by default).
        input_kind, image_size, tokenization, patch_size, vocab_size, max_len, pad_id, bottleneck_dim:
            as for :class:`~pdelightning.models.PDEClassifier`.

    Raises:
        ValueError: on ``dt`` or ``n_layers`` not positive, an unknown ``activation``, ``dropout`` outside [0, 1).

    Example::

        >>> import torch
        >>> model = LinearPDEClassifier(num_classes=20, d_model=16, input_kind="tokens", vocab_size=50, max_len=12)
        >>> model(torch.randint(1, 50, (3, 12))).shape
        torch.Size([3, 20])
    """

    def __init__(
        self,
        num_classes: int = 20,
        d_model: int = 128,
        n_layers: int = 4,
        dt: float = 0.25,
        activation: Activation = "relu",
        dropout: float = 0.0,
        final_norm: bool = False,
        input_kind: InputKind = "tokens",
        image_size: int = 28,
        tokenization: Tokenization = "rows",
        patch_size: int = 4,
        vocab_size: int = 0,
        max_len: int = 256,
        pad_id: int = 0,
        bottleneck_dim: int | None = 32,
    ) -> None:
        _check_common(n_layers, dt)
        check_choice("activation", activation, ACTIVATIONS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
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
        self.blocks.extend(LinearStep(d_model, dt, activation, dropout) for _ in range(n_layers))
        self._finish(final_norm)
