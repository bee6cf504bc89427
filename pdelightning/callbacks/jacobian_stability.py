"""Is the depth dynamics stable? The layer maps' Jacobians measured on the probe set, beside eq. (21).

Eq. (21), ``2 D Δt/Δx² + α Δt ||W^O||_2 <= 1``, is a heuristic sufficient condition for the explicit Euler step
of eq. (20). :class:`JacobianStability` measures the real thing for any model the adapters support: the spectral
norm of each layer map's Jacobian ``∂u_{l+1}/∂u_l`` at the probe samples, the continuous-time rate
``||J - I||/Δt`` and the finite-depth Lyapunov exponent of the whole stack, by power iteration with
Jacobian-vector products (:mod:`pdelightning.analysis.jacobian`; no dense Jacobian is formed).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pdelightning.adapters.readers import first_tensor
from pdelightning.analysis.jacobian import compose, jacobian_spectral_norm_block
from pdelightning.analysis.perturbation import gaussian_noise
from pdelightning.analysis.stability import eq21_number, exact_spectral_norm
from pdelightning.callbacks._probe import GatherStore, ProbeCallback
from pdelightning.callbacks.pde_fit import step_of
from pdelightning.probing.batch import map_tensors
from pdelightning.probing.capture import Request, first_input, replace_first_input
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.sharding import is_sharded

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache_position")


def _is_cache(value: Any) -> bool:
    return "Cache" in type(value).__name__


def layer_map(
    block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], rows: Tensor
) -> Callable[[Tensor], Tensor]:
    """The layer as a function of its residual-stream input: ``u -> block(u, *other args)`` (first output).

    The other arguments (masks, positions, ``u_prev`` of our PDE steps) are those of the probe forward, cut to the
    samples ``rows`` and held fixed (not differentiated).
    """
    n = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() > 0), None)

    def cut(t: Tensor) -> Tensor:
        return t[rows].detach() if n is not None and t.dim() > 0 and t.shape[0] == n else t.detach()

    # a key/value cache (HuggingFace decoders) would grow with every call of the map: call the layer without one
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    args, kwargs = map_tensors(args, cut), map_tensors(kwargs, cut)

    def f(u: Tensor) -> Tensor:
        a, k = replace_first_input(args, kwargs, u)
        return first_tensor(block(*a, **k))

    return f


class JacobianStability(ProbeCallback):
    r"""Measure the stability of the depth dynamics: per-layer Jacobian norms and the Lyapunov exponent.

    At each probe, for ``max_samples`` probe samples (a random subset, the same at every probe and on any number of
    processes):

    * per layer ``l``: the spectral norm ``||∂u_{l+1}/∂u_l||_2`` of the layer map (the whole block, as a function
      of its residual-stream input, other inputs held fixed), averaged over samples, and ``||J - I||_2 / Δt``, the
      continuous-time rate of the step (``Δt``: the model's own for PDE steps, else ``1/L``);
    * end to end: the finite-depth Lyapunov exponent ``(1/L) log ||∂u_L/∂u_0||_2`` (``> 0``: perturbations of
      the embedding grow through depth on average per layer; ``< 0``: they shrink);
    * for PDE steps, eq. (21) beside it (with the exact ``||W^O||_2``): eq. (21) ``<= 1`` is sufficient for a
      contracting linearised step, so ``eq21 <= 1`` together with a measured ``||J||_2`` well below it shows how
      conservative the heuristic is.

    Block (subspace) iteration on ``JᵀJ`` with a Rayleigh-Ritz step (``block`` directions per sample, ``n_iter``
    steps; :func:`~pdelightning.analysis.jacobian.jacobian_spectral_norm_block`): a residual layer's Jacobian has
    its singular values bunched near 1, where single-vector power iteration reads low for many iterations. The
    products are JVPs/VJPs through autograd on the model's probe path; no dense Jacobian is formed and gradients
    with respect to the parameters are never stored. Padded positions get no perturbation. The estimates are
    lower bounds that converge from below. Cost per probe: about ``2 n_iter`` forwards and backwards of
    ``block x max_samples`` rows per layer, twice (``J`` and ``J - I``), and as many through the stack. Each
    probe starts from the previous probe's top vectors (the same samples), so the estimates tighten over training;
    at a first probe the defaults read a residual PDE layer's norm to within about 0.5 % (tests/callbacks).
    Per-sample values go through a gather (DDP gives the one-process numbers). Under sharded parameters (FSDP2,
    ``DTensor``) the layer maps cannot be linearised one by one: each call of a sharded block gathers its weights,
    a collective that ranks with different sample counts would call a different number of times; the Jacobian
    norms and the exponent are then skipped (said once), and eq. (21) is still logged from gathered weights.

    Args:
        max_samples: how many probe samples to linearise at.
        n_iter: block iterations per probe.
        block: directions per sample.
        dt: ``Δt`` of non-PDE layers for the rate (default ``1/L``).
        lyapunov: also measure the end-to-end exponent.
        **kwargs: the :class:`~pdelightning.callbacks._probe.ProbeCallback` arguments.

    Raises:
        ValueError: for non-positive ``max_samples``/``n_iter``/``dt``.

    Logged metrics (``analysis/jacobian_stability/<quantity>/<layer>``): ``spectral_norm``, ``rate`` (``||J - I||/Δt``),
    ``eq21`` (PDE steps only); ``analysis/jacobian_stability/lyapunov`` (per layer of depth, nats).

    Example::

        trainer = L.Trainer(callbacks=[JacobianStability(max_samples=32)])
    """

    name = "jacobian_stability"
    needs = ("layers",)

    def __init__(
        self,
        max_samples: int = 8,
        n_iter: int = 10,
        block: int = 4,
        dt: float | None = None,
        lyapunov: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_samples < 1 or n_iter < 1 or block < 1:
            raise ValueError(f"max_samples={max_samples}, n_iter={n_iter} and block={block} must be positive")
        if dt is not None and not dt > 0:
            raise ValueError(f"dt={dt} must be positive (or None for 1/L)")
        self.max_samples, self.n_iter, self.block, self.dt, self.lyapunov = max_samples, n_iter, block, dt, lyapunov
        self.last_metrics: dict[str, float] = {}
        self._warm: dict[tuple[Any, ...], Tensor] = {}  # last probe's top vectors: the next probe starts there
        self._sharded: bool | None = None

    @override
    def request(self) -> Request:
        return Request(block_inputs=True)

    @override
    def begin(self, session: ProbeSession) -> None:
        self._layers = session.targets["model"].layers
        if self._sharded is None and is_sharded(session.pl_module):
            rank_zero_warn(
                "JacobianStability: the model's parameters are sharded (DTensor); the per-layer Jacobian norms and "
                "the Lyapunov exponent cannot be computed under sharding and are skipped (eq. (21) is still logged)"
            )
        self._sharded = is_sharded(session.pl_module)
        keys = [f"sigma/{t.name}" for t in self._layers] + [f"rate/{t.name}" for t in self._layers] + ["lyapunov"]
        self._store = GatherStore(keys).to(session.device)

    @override
    def consume(self, pb: ProbeBatch) -> None:
        keep = pb.session.subset(pb.index, self.max_samples)
        if len(keep) == 0 or self._sharded:  # nothing to measure here, but the rank still takes part in the gather
            self._store.update(pb.index[:0], **{k: torch.zeros(0, device=pb.index.device) for k in self._store.keys})
            return
        cap = pb.captured["model"]
        n_layers, k = len(self._layers), self.block
        rows = keep.repeat_interleave(k)  # each sample once per direction of the block iteration
        valid = pb.valid[keep] if pb.valid is not None else None
        maps, out = [], {}
        u0: Tensor | None = None
        adapter = pb.session.adapters["model"]
        with torch.enable_grad(), adapter.probe_mode() if adapter is not None else contextlib.nullcontext():
            for layer in self._layers:
                args, kwargs = cap.block_inputs[layer.name]
                f = layer_map(layer.block or layer.module, args, kwargs, rows)
                u = first_input(args, kwargs)
                assert u is not None
                u = u[keep].detach()
                u0 = u if u0 is None else u0
                dt, _ = step_of(layer, n_layers, self.dt, 1.0)
                vmask = valid if valid is not None and valid.shape == u.shape[:2] else None
                # per-sample starting directions: a sample's estimate does not depend on its batch or rank
                start = gaussian_noise(pb.index[keep], (k, *u.shape[1:]), self.seed).to(u)
                kw: dict[str, Any] = {"block": k, "n_iter": self.n_iter, "tol": 0.0, "start": start}
                key = (layer.name, tuple(pb.index[keep].tolist()))
                res = jacobian_spectral_norm_block(f, u, vmask, v0=self._warm.get(key), **kw)
                rate = jacobian_spectral_norm_block(
                    f, u, vmask, minus_identity=True, v0=self._warm.get((*key, "-I")), **kw
                )
                self._warm[key], self._warm[(*key, "-I")] = res.vector.detach(), rate.vector.detach()
                out[f"sigma/{layer.name}"], out[f"rate/{layer.name}"] = res.sigma, rate.sigma / dt
                maps.append(f)
            if self.lyapunov and maps and u0 is not None:
                vmask = valid if valid is not None and valid.shape == u0.shape[:2] else None
                start = gaussian_noise(pb.index[keep], (k, *u0.shape[1:]), self.seed + 1).to(u0)
                sigma = jacobian_spectral_norm_block(
                    compose(maps), u0, vmask, block=k, n_iter=self.n_iter, tol=0.0, start=start
                )
                out["lyapunov"] = sigma.sigma.clamp_min(torch.finfo(sigma.sigma.dtype).tiny).log() / len(maps)
            else:
                out["lyapunov"] = torch.full((len(keep),), math.nan)
        self._store.update(pb.index[keep], **{name: v.detach().float() for name, v in out.items()})

    @override
    def finish(self, session: ProbeSession) -> None:
        out = self._store.gather()
        self._store = None  # type: ignore[assignment]
        metrics: dict[str, float] = {}
        weights = session.full_weights() if any(t.pde is not None for t in self._layers) else {}
        for layer in self._layers:
            for q in () if self._sharded else ("sigma", "rate"):
                v = out[f"{q}/{layer.name}"].double()
                v = v[torch.isfinite(v)]
                key = "spectral_norm" if q == "sigma" else "rate"
                metrics[self.key(key, layer.name)] = float(v.mean()) if v.numel() else math.nan
            if layer.pde is not None:
                w_o = weights[layer.name][0] if layer.name in weights else layer.out_proj_weight()
                if w_o is not None:
                    p = layer.pde
                    w = float(exact_spectral_norm(w_o.detach()).sigma)
                    metrics[self.key("eq21", layer.name)] = eq21_number(p.diffusion, p.alpha, p.dt, p.dx, w)
        lyap = out["lyapunov"].double()
        lyap = lyap[torch.isfinite(lyap)]
        if self.lyapunov and not self._sharded:
            metrics[self.key("lyapunov")] = float(lyap.mean()) if lyap.numel() else math.nan
        self.last_metrics = metrics
        self.log_scalars(session.trainer, metrics, session.step)

    @override
    def layout(self) -> dict[str, list[str]]:
        k = f"analysis/{self.name}"
        return {
            "||du_{l+1}/du_l|| per layer": [rf"^{k}/spectral_norm/.*"],
            "||J - I|| / dt per layer": [rf"^{k}/rate/.*"],
            "eq. (21) per PDE layer": [rf"^{k}/eq21/.*"],
            "Lyapunov exponent": [rf"^{k}/lyapunov$"],
        }
