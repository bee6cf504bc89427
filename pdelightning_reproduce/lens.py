"""The PDE lens (issue 10) on a trained model: eq. (20) fitted to every layer, and the measured Jacobian stability.

For each layer ``l`` of a classifier (as its adapter finds them; captured by :func:`block_io` through the library's
capture), on the probe set:

* **fit** (:mod:`pdelightning.analysis.pde_fit`): ``(u_{l+1} - u_l)/Δt ≈ D ∘ ∇²u_l + α A_l + c F_l`` by least
  squares over all probe samples, with ``u_l`` = the block's input, ``u_{l+1}`` = its output, ``A_l`` = its
  attention sublayer's contribution (for our blocks the output of ``blocks[l].attn``, without any ``α``), ``F_l`` =
  its MLP's (``blocks[l].mlp``); ``Δt`` = the block's own ``dt`` for PDE steps, ``1/L`` otherwise; ``Δx`` and the
  boundary the block's own (1 and Dirichlet otherwise).
  Quantities ``lens_D`` (mean of the diagonal ``D``), ``lens_alpha``, ``lens_ffn_coef``, ``lens_r2``,
  ``lens_r2_diffusion``, ``lens_r2_attention``, ``lens_eq21_fitted`` (eq. 21 of the fitted coefficients).
* **Jacobian** (:mod:`pdelightning.analysis.jacobian`): on the first :data:`JACOBIAN_N` probe samples, the block
  as a map of its input, ``||∂u_{l+1}/∂u_l||_2`` (``lens_jacobian_norm``) and ``||∂u_{l+1}/∂u_l - I||_2``
  (``lens_jacobian_minus_identity``), each averaged over the samples; the finite-depth Lyapunov exponent
  ``(1/L) log ||∂u_L/∂u_0||_2`` of the stack of blocks (``lens_lyapunov``, nats per layer). Block iteration with
  :data:`JACOBIAN_BLOCK` directions and at most :data:`JACOBIAN_ITERS` steps (stopping when every sample's estimate
  changed by at most :data:`JACOBIAN_TOL`, relative, in the last step; ``lens_jacobian_converged`` is the share of
  estimates that did): lower bounds converging from below. For PDE models eq. (21) of the model's own
  coefficients is the quantity ``eq21`` of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pdelightning.analysis.jacobian import compose, jacobian_spectral_norm_block
from pdelightning.analysis.pde_fit import STAT_KEYS, pde_fit_statistics, solve_pde_fit
from pdelightning.analysis.stability import exact_spectral_norm
from pdelightning.models import LayerTarget
from pdelightning.probing.capture import Request, first_input, replace_first_input
from pdelightning_reproduce.probe import BATCH, Forwards, ProbeData, model_layers

PREFIX = "lens_"
JACOBIAN_N = 16
JACOBIAN_BLOCK = 8
JACOBIAN_ITERS = 10
JACOBIAN_TOL = 1e-4
FIT_QUANTITIES = ("D", "alpha", "ffn_coef", "r2", "r2_diffusion", "r2_attention", "eq21_fitted")


def step_size(block: nn.Module, n_layers: int) -> tuple[float, float, str]:
    """``(Δt, Δx, boundary)`` of a block: a PDE step's own, else ``(1/L, 1, "dirichlet")``."""
    if hasattr(block, "dt"):
        return float(block.dt), float(getattr(block, "dx", 1.0)), str(getattr(block, "boundary", "dirichlet"))
    return 1.0 / n_layers, 1.0, "dirichlet"


@torch.no_grad()
def block_io(model: nn.Module, x: Tensor, device: str | torch.device) -> list[dict[str, Any]]:
    """Per layer (depth order): its input ``u``, output ``out``, attention output ``attn``, MLP output ``mlp`` on
    ``x``, and its call arguments ``call`` ``(args, kwargs)`` (to call it again as a map of ``u``).
    """
    with Forwards(model, Request(hidden=True, sublayers=True, block_inputs=True)) as run:
        _, got = run(x.to(device))
    return [
        {
            "u": got.resid_pre[t.name],
            "out": got.hidden[t.name],
            "attn": got.attn_out[t.name],
            "mlp": got.mlp_out[t.name],
            "call": got.block_inputs[t.name],
        }
        for t in run.layers
    ]


def fit_values(model: nn.Module, pdata: ProbeData, device: str | torch.device) -> dict[str, dict[str, float]]:
    """The eq. (20) fit of every layer over the whole probe set (statistics summed over batches)."""
    layers = model_layers(model)
    n_layers = len(layers)
    stats: list[dict[str, Tensor] | None] = [None] * n_layers
    for start in range(0, len(pdata.x), BATCH):
        xb = pdata.x[start : start + BATCH]
        valid = None if xb.dtype.is_floating_point else (xb != pdata.pad_id)
        for i, io in enumerate(block_io(model, xb, device)):
            dt, dx, boundary = step_size(_block(layers[i]), n_layers)
            s = pde_fit_statistics(io["u"], io["out"], io["attn"], io["mlp"], valid, dt=dt, dx=dx, boundary=boundary)
            prev = stats[i]
            stats[i] = s if prev is None else {k: prev[k] + s[k] for k in STAT_KEYS}
    v: dict[str, dict[str, float]] = {f"{PREFIX}{q}": {} for q in FIT_QUANTITIES}
    for i, layer in enumerate(layers):
        if stats[i] is None:
            continue
        dt, dx, _ = step_size(_block(layer), n_layers)
        w = layer.out_proj_weight()
        if w is None:
            raise ValueError(f"{layer.name} has no attention output projection W^O: the eq. (20) fit needs its norm")
        w_o = float(exact_spectral_norm(w.detach()).sigma)
        fit = solve_pde_fit(stats[i], "diagonal", dt=dt, dx=dx, w_o_norm=w_o)  # type: ignore[arg-type]
        got = {
            "D": fit.diffusion_mean,
            "alpha": fit.alpha,
            "ffn_coef": fit.ffn_coef,
            "r2": fit.r2,
            "r2_diffusion": fit.r2_diffusion,
            "r2_attention": fit.r2_attention,
            "eq21_fitted": fit.eq21 if fit.eq21 is not None else math.nan,
        }
        for q, value in got.items():
            v[f"{PREFIX}{q}"][layer.name] = float(value)
    return v


def _block(layer: LayerTarget) -> nn.Module:
    """The whole layer, callable as the layer map."""
    return layer.block or layer.module


def _layer_map(block: nn.Module, call: tuple[tuple[Any, ...], dict[str, Any]]) -> Callable[[Tensor], Tensor]:
    """The layer as a map of its input alone: ``u -> block(u, *other arguments of the probe forward)``.

    The other arguments (the padding mask; ``u_prev`` and ``u0`` of our blocks, unused without couplings and
    forcing) are held fixed; those with a batch axis are repeated to the repeated batch of the block iteration.

    Raises:
        ValueError: for blocks with couplings or forcing (they read ``u_prev`` or ``u0``, not only ``u``).
    """
    if getattr(block, "c_in", None) is not None or getattr(block, "forcing", False):
        raise ValueError("the Jacobian lens needs blocks without couplings or forcing (they read u_prev or u0)")
    args, kwargs = call
    u0 = first_input(args, kwargs)
    assert u0 is not None
    n = u0.shape[0]

    def f(u: Tensor) -> Tensor:
        k = u.shape[0] // n

        def rep(t: Any) -> Any:
            return t.repeat_interleave(k, 0) if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t

        a, kw = replace_first_input(tuple(rep(t) for t in args), {key: rep(t) for key, t in kwargs.items()}, u)
        out = block(*a, **kw)
        return out if isinstance(out, Tensor) else out[0]

    return f


def jacobian_values(
    model: nn.Module,
    pdata: ProbeData,
    device: str | torch.device,
    n: int = JACOBIAN_N,
    block: int = JACOBIAN_BLOCK,
    n_iter: int = JACOBIAN_ITERS,
) -> dict[str, Any]:
    """Per layer ``||J_l||_2`` and ``||J_l - I||_2``, and the Lyapunov exponent of the stack, on ``n`` probe samples.

    Raises:
        ValueError: for token inputs (padding would need the mask threaded through every map; not needed here).
    """
    x = pdata.x[:n]
    if not x.dtype.is_floating_point:
        raise ValueError("the Jacobian lens is measured on image inputs (MNIST) only")
    layers = model_layers(model)
    ios = block_io(model, x, device)
    maps = [_layer_map(_block(t), io["call"]) for t, io in zip(layers, ios, strict=True)]
    kw = {"block": block, "n_iter": n_iter, "tol": JACOBIAN_TOL}
    v: dict[str, Any] = {f"{PREFIX}jacobian_norm": {}, f"{PREFIX}jacobian_minus_identity": {}}
    converged: list[Tensor] = []
    for t, f, io in zip(layers, maps, ios, strict=True):
        u = io["u"].detach()
        for key, minus in (("jacobian_norm", False), ("jacobian_minus_identity", True)):
            r = jacobian_spectral_norm_block(f, u, minus_identity=minus, **kw)
            v[f"{PREFIX}{key}"][t.name] = float(r.sigma.mean())
            converged.append(r.converged.float())
    r = jacobian_spectral_norm_block(compose(maps), ios[0]["u"].detach(), **kw)
    converged.append(r.converged.float())
    v[f"{PREFIX}lyapunov"] = float((r.sigma.clamp_min(torch.finfo(r.sigma.dtype).tiny).log() / len(maps)).mean())
    v[f"{PREFIX}jacobian_n"] = float(len(x))
    v[f"{PREFIX}jacobian_converged"] = float(torch.cat(converged).mean())
    return v


def lens_values(model: nn.Module, pdata: ProbeData, device: str | torch.device) -> dict[str, Any]:
    """Every lens quantity of one model (see the module docstring), keyed ``lens_<quantity>`` by layer."""
    model.eval()
    v: dict[str, Any] = fit_values(model, pdata, device)
    v.update(jacobian_values(model, pdata, device))
    layers = model_layers(model)
    v[f"{PREFIX}dt"] = step_size(_block(layers[0]), len(layers))[0]
    return v
