"""How PDE-like is the model, layer by layer: fit the continuum model of eq. (20) to its residual stream.

The paper reads a Transformer as a discretised PDE: each layer one explicit Euler step
``u_{l+1} = u_l + Δt (D_l ∇²u_l + α_l A_l(u_l) + F_l(u_l))``. :class:`PDEFit` measures, on the probe set, how
well that reading fits *any* model the adapters support, by least squares over the valid token positions
(:mod:`pdelightning.analysis.pde_fit`); the callback is a thin adapter that streams sufficient statistics.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.base import OUT_PROJ_NAMES
from pdelightning.adapters.windowed import skip_once
from pdelightning.analysis.pde_fit import FIT_DIFFUSION, STAT_KEYS, pde_fit_statistics, solve_pde_fit
from pdelightning.analysis.stability import exact_spectral_norm
from pdelightning.callbacks._layout import DETAIL
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.models.pde import BOUNDARY_CONDITIONS
from pdelightning.models.protocol import AnalysisTargets, LayerTarget
from pdelightning.plots import pde_fit_figure
from pdelightning.probing.capture import Request
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.utils import warn_once

QUANTITIES = ("r2_diffusion", "r2_attention", "D", "alpha", "ffn_coef", "r2", "eq21_fitted")
# on a layer that is not a PDE step these are exact by construction (a residual block is an Euler step with
# alpha = ffn_coef = 1/dt, D ~ 0, R^2 = 1): secondary there, logged under analysis/pde_fit/detail/
TRIVIAL_OFF_PDE = ("D", "alpha", "ffn_coef", "r2", "eq21_fitted")


def step_of(layer: LayerTarget, n_layers: int, dt: float | None, dx: float) -> tuple[float, float]:
    """``(Δt, Δx)`` of a layer: the model's own (``PDEStepParams``), else ``dt`` or ``1/L`` and ``dx``."""
    if layer.pde is not None:
        return float(layer.pde.dt), float(layer.pde.dx)
    return (float(dt) if dt is not None else 1.0 / n_layers), dx


class PDEFit(ProbeCallback):
    r"""Fit ``(u_{l+1} - u_l)/Δt ≈ D ∘ ∇²u_l + α A_l + c F_l`` (eq. 20) to every layer of any model.

    At each probe, per layer ``l``, from the layer's input ``u_l`` and output ``u_{l+1}`` (the residual stream
    around the block), the attention sublayer's contribution ``A_l`` and the MLP's ``F_l`` (as the model's adapter
    locates them: our ``attn``/``mlp``, PyTorch's ``dropout1``/``dropout2``, timm's ``ls1``/``ls2``, TransformerLens'
    ``hook_attn_out``/``hook_mlp_out``, HuggingFace's attention and MLP outputs), a least-squares fit over the valid
    positions of the probe set gives the diffusion ``D`` (per feature for ``diffusion="diagonal"``; its mean is
    logged), the attention strength ``α``, the FFN coefficient ``c``, the R² of the full fit and of the
    diffusion-only and attention-only sub-models, and the eq. (21) number ``2 max(D) Δt/Δx² + |α| Δt ||W^O||_2``
    of the *fitted* coefficients. The Laplacian is along token positions with the model's boundary condition
    (our PDE steps' own; Dirichlet, eq. (7), otherwise). ``Δt`` is the model's step for PDE layers, else
    ``1/L`` (or ``dt``). Sufficient statistics are summed over probe batches and ranks (DDP gives the one-process
    fit) and solved in closed form.

    What to expect (see :mod:`pdelightning.analysis.pde_fit`): on our ``PDEClassifier`` without coupling,
    forcing or LayerNorm, which *is* this model, the fit recovers each layer's ``D`` and ``α`` with R² = 1. On a
    residual Transformer (pre-LN or no LN) ``u_{l+1} = u_l + A_l + F_l`` exactly, so ``α = c = 1/Δt`` (``= L``),
    ``D ≈ 0`` and R² = 1: a residual Transformer is an Euler step whose attention strength is ``1/Δt``. Post-LN
    models (BERT), models without residuals, or other sublayers lower R²; ``r2_diffusion`` says how much of a
    layer's update a local diffusion along tokens alone explains (usually little).

    Args:
        diffusion: ``"diagonal"`` (one ``D`` per feature), ``"scalar"`` or ``"none"``.
        dt: ``Δt`` of non-PDE layers (default ``1/L``).
        dx: ``Δx`` of non-PDE layers.
        boundary: the Laplacian's boundary for non-PDE layers: ``"dirichlet"``, ``"neumann"`` or ``"periodic"``.
        **kwargs: the :class:`~pdelightning.callbacks.ProbeCallback` arguments (budget or cadence, probe
            set, globs, ``on_missing``).

    Raises:
        ValueError: for an unknown ``diffusion`` or ``boundary``, or a non-positive ``dt``/``dx``.
        TargetNotFoundError: at setup, when the model has no layers.

    Logged metrics (``analysis/pde_fit/<quantity>/<layer>``): ``r2_diffusion``, ``r2_attention`` (the sub-models'
    R², the informative numbers on any model), and on PDE layers (``LayerTarget.pde`` set) ``D`` (mean over
    features), ``alpha``, ``ffn_coef``, ``r2``, ``eq21_fitted`` (layers with a readable ``W^O``). On other layers
    those five are exact by construction (α = c = 1/Δt, D ≈ 0, R² = 1 for a residual block) and are logged under
    ``analysis/pde_fit/detail/<quantity>/<layer>``.
    Figure ``analysis/pde_fit/coefficients``: the per-layer coefficients and R² over training.

    Example::

        trainer = L.Trainer(callbacks=[PDEFit()])   # any Transformer the adapters support
    """

    name = "pde_fit"
    needs = ("layers",)

    def __init__(
        self,
        diffusion: Literal["diagonal", "scalar", "none"] = "diagonal",
        dt: float | None = None,
        dx: float = 1.0,
        boundary: Literal["dirichlet", "neumann", "periodic"] = "dirichlet",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("diffusion", diffusion, FIT_DIFFUSION)
        check_choice("boundary", boundary, BOUNDARY_CONDITIONS)
        if dt is not None and not dt > 0:
            raise ValueError(f"dt={dt} must be positive (or None for 1/L)")
        if not dx > 0:
            raise ValueError(f"dx={dx} must be positive")
        self.diffusion, self.dt, self.dx, self.boundary = diffusion, dt, dx, boundary
        self.history: list[dict[str, Any]] = []
        self.last_results: dict[str, Any] = {}

    @override
    def request(self) -> Request:
        return Request(hidden=True, sublayers=True)

    def _boundary(self, layer: LayerTarget) -> str:
        return str(getattr(layer.block, "boundary", self.boundary))

    @override
    def begin(self, session: ProbeSession) -> None:
        self._targets: AnalysisTargets = session.targets["model"]
        self._stats: dict[str, dict[str, Tensor]] = {}
        self._why: dict[tuple[str, str], str] = {}  # (layer, term) -> why that sublayer output is missing

    def _term(self, layer: LayerTarget, term: str, module: Any, out: Tensor | None, u_in: Tensor) -> Tensor | None:
        """A sublayer's contribution when it was captured with the layer input's shape, else ``None`` (and why)."""
        if out is not None and out.shape == u_in.shape:
            return out
        if module is None:
            why = f"no module whose output is the {term} sublayer's contribution was found"
        elif out is None:
            why = f"its {term} output module ({type(module).__name__}) produced no output during the probe forward"
        else:
            why = f"its {term} output ({type(module).__name__}) has shape {tuple(out.shape)}, not {tuple(u_in.shape)}"
        self._why.setdefault((layer.name, term), why)
        return None

    def _say_missing(self, missing: dict[str, list[str]]) -> None:
        """Warn once per run and term which layers' fits leave that term out, and why."""
        for term, layers in missing.items():
            if not layers:
                continue
            quantity = {"attention": "alpha and r2_attention", "feed-forward": "ffn_coef", "W^O": "eq21_fitted"}[term]
            if term == "W^O":
                why = f"no attention output projection W^O found (looked for children named {list(OUT_PROJ_NAMES)})"
            else:
                why = "; ".join(f"{n}: {self._why[(n, term)]}" for n in layers if (n, term) in self._why)
            if term == "W^O":
                what = f"{quantity} is not logged for them"
            else:
                what = (
                    f"the term is left out of their fit (never fitted as zeros) and {quantity} is not logged for them"
                )
            warn_once(self, term, f"PDEFit: layers {layers} have no {term} ({why}); {what}")

    @override
    def consume(self, pb: ProbeBatch) -> None:
        cap = pb.captured["model"]
        keep = len(pb.index)
        n_layers = len(self._targets.layers)
        for layer in self._targets.layers:
            u_in, u_out = cap.resid_pre.get(layer.name), cap.hidden.get(layer.name)
            if u_in is None or u_out is None or u_in.shape != u_out.shape or u_out.dim() != 3:
                continue
            attn = self._term(layer, "attention", layer.attn_out, cap.attn_out.get(layer.name), u_in)
            mlp = self._term(layer, "feed-forward", layer.mlp_out, cap.mlp_out.get(layer.name), u_in)
            valid = pb.valid[:keep] if pb.valid is not None and pb.valid.shape == u_in.shape[:2] else None
            dt, dx = step_of(layer, n_layers, self.dt, self.dx)
            stats = pde_fit_statistics(
                u_in[:keep].float(),
                u_out[:keep].float(),
                attn[:keep].float() if attn is not None else None,
                mlp[:keep].float() if mlp is not None else None,
                valid,
                dt=dt,
                dx=dx,
                boundary=self._boundary(layer),
            )
            have = self._stats.get(layer.name)
            self._stats[layer.name] = stats if have is None else {k: have[k] + stats[k] for k in STAT_KEYS}

    def _sum_over_ranks(self, trainer: L.Trainer, device: torch.device) -> dict[str, dict[str, Tensor]]:
        """Every rank sums every layer's statistics (zeros where a rank saw none), in one fixed order."""
        out: dict[str, dict[str, Tensor]] = {}
        for layer in self._targets.layers:
            local = self._stats.get(layer.name)
            if trainer.world_size > 1:
                d = torch.tensor([float(local["ll"].numel()) if local is not None else 0.0], device=device)
                d = int(trainer.strategy.reduce(d, reduce_op="max").item())
                if d == 0:
                    continue
                z = torch.zeros(1, 1, d)
                zero = {k: torch.zeros_like(v) for k, v in pde_fit_statistics(z, z, z, z, dt=1.0).items()}
                local = local if local is not None else zero
                packed = torch.cat([local[k].reshape(-1).double() for k in STAT_KEYS]).to(device)
                packed = trainer.strategy.reduce(packed, reduce_op="sum").cpu()
                parts, at = {}, 0
                for k in STAT_KEYS:
                    n = zero[k].numel()
                    parts[k] = packed[at : at + n].reshape(zero[k].shape)
                    at += n
                local = parts
            if local is not None:
                out[layer.name] = local
        return out

    @override
    def finish(self, session: ProbeSession) -> None:
        stats = self._sum_over_ranks(session.trainer, session.device)
        n_layers = len(self._targets.layers)
        metrics: dict[str, float] = {}
        entry: dict[str, Any] = {"step": session.step}
        missing: dict[str, list[str]] = {"attention": [], "feed-forward": [], "W^O": []}
        weights = session.full_weights()  # whole even under FSDP: gathered once per probe, shared, on every rank
        for layer in self._targets.layers:
            if layer.name not in stats:
                continue
            dt, dx = step_of(layer, n_layers, self.dt, self.dx)
            w_o = weights[layer.name][0] if layer.name in weights else layer.out_proj_weight()
            w_norm = float(exact_spectral_norm(w_o.detach()).sigma) if w_o is not None else None
            windowed = layer.windows is not None  # a 2-D token grid: the 1-D Laplacian along tokens is no diffusion
            if windowed:
                skip_once(
                    self,
                    "the diffusion term (D, r2_diffusion)",
                    "windowed-attention layers sit on a 2-D token "
                    "grid, where the Laplacian along the token axis is not defined; fitted without it",
                )
            diffusion = "none" if windowed else self.diffusion
            fit = solve_pde_fit(stats[layer.name], diffusion, dt=dt, dx=dx, w_o_norm=w_norm)
            values = {
                "D": fit.diffusion_mean,
                "alpha": fit.alpha,
                "ffn_coef": fit.ffn_coef,
                "r2": fit.r2,
                "r2_diffusion": fit.r2_diffusion,
                "r2_attention": fit.r2_attention,
                "eq21_fitted": fit.eq21,
            }
            if windowed:  # fitted without diffusion: D and r2_diffusion are not logged
                values["D"] = values["r2_diffusion"] = None
            if fit.alpha is None:
                missing["attention"].append(layer.name)
                values["r2_attention"] = None
            if fit.ffn_coef is None:
                missing["feed-forward"].append(layer.name)
            if w_norm is None and fit.alpha is not None:
                missing["W^O"].append(layer.name)
            entry[layer.name] = {q: math.nan if v is None else float(v) for q, v in values.items()}  # for the figure
            self.last_results[layer.name] = fit
            for q, v in values.items():
                if v is not None:  # a term the fit left out has no coefficient: nothing is logged, not a 0
                    group = f"{DETAIL}/" if layer.pde is None and q in TRIVIAL_OFF_PDE else ""
                    metrics[self.key(group + q, layer.name)] = float(v)
        self._say_missing(missing)
        if self.history and self.history[-1]["step"] == entry["step"]:
            self.history[-1] = entry  # the probe at a resumed run's first step repeats the checkpoint's last one
        else:
            self.history.append(entry)
        self.log_scalars(session.trainer, metrics, session.step)
        if self.figures_due and len(self.history) > 0:
            history = [dict(h) for h in self.history]
            names = [t.name for t in self._targets.layers]
            self.figure(session, self.key("coefficients"), pde_fit_figure, history, names)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]

    @override
    def layout(self) -> dict[str, list[str]]:
        return {f"{q} per layer": [rf"^analysis/{self.name}/{q}/[^/]+$"] for q in QUANTITIES}
