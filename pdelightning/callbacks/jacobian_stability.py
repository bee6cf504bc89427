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
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pdelightning.adapters.readers import first_tensor
from pdelightning.adapters.windowed import skip_once, stage_name, stages
from pdelightning.analysis.jacobian import compose, jacobian_spectral_norm_block
from pdelightning.analysis.perturbation import gaussian_noise
from pdelightning.analysis.stability import eq21_number, exact_spectral_norm
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.callbacks.pde_fit import step_of
from pdelightning.models.protocol import LayerTarget
from pdelightning.probing.batch import map_tensors
from pdelightning.probing.capture import Request, first_input, replace_first_input
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.sharding import is_sharded
from pdelightning.probing.store import GatherStore

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


def token_map(f: Callable[[Tensor], Tensor], layer: LayerTarget, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """``f`` on the layer's token view ``[B, T, d]`` (:attr:`LayerTarget.tokens`), for a model whose own layout
    (``shape`` per sample, e.g. a channels-last ``[h, w, d]`` map) differs; ``f`` itself when there is none.
    """
    view = layer.tokens
    if view is None:
        return f
    return lambda u: view(f(u.reshape(u.shape[0], *shape)))


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
    Per-sample values go through a gather (DDP gives the one-process numbers). The warm-start vectors
    (``2 x layers x max_samples`` tensors of one sample's ``T x d``, shared by every rank after each probe) and the
    last probe's values are in the checkpoint, so a resumed run logs what an uninterrupted one does.
    Under sharded parameters (FSDP2,
    ``DTensor``) the layer maps cannot be linearised one by one: each call of a sharded block gathers its weights,
    a collective that ranks with different sample counts would call a different number of times; the Jacobian
    norms and the exponent are then skipped (said once), and eq. (21) is still logged from gathered weights.

    Args:
        max_samples: how many probe samples to linearise at.
        n_iter: block iterations per probe.
        block: directions per sample.
        dt: ``Δt`` of non-PDE layers for the rate (default ``1/L``).
        lyapunov: also measure the end-to-end exponent.
        **kwargs: the :class:`~pdelightning.callbacks.ProbeCallback` arguments.

    Raises:
        ValueError: for non-positive ``max_samples``/``n_iter``/``dt``.

    Logged metrics (``analysis/jacobian_stability/<quantity>/<layer>``): ``spectral_norm``, ``rate`` (``||J - I||/Δt``),
    ``eq21`` (PDE steps only); ``analysis/jacobian_stability/lyapunov`` (per layer of depth, nats); for a model in
    stages joined by patch merging (Swin) one exponent per stage instead, ``lyapunov/<stage>``.

    Example::

        trainer = L.Trainer(callbacks=[JacobianStability(max_samples=32)])
    """

    name = "jacobian_stability"
    needs = ("layers",)
    undefined: ClassVar[dict[str, str]] = {
        q: "no probe sample gave a finite estimate (the layer map is not finite there)"
        for q in ("spectral_norm", "rate", "lyapunov")
    }

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
        # the last probe's top vector of each (layer, "" or "-I", probe position): the next probe starts there
        self._warm: dict[tuple[str, str, int], Tensor] = {}
        self._measured: set[tuple[str, str, int]] = set()  # the entries this rank computes (its probe samples)
        self._replay: tuple[int, dict[str, float]] | None = None  # a resumed run's repeat of its checkpoint's probe
        self._replaying = False
        self._sharded: bool | None = None

    @override
    def request(self) -> Request:
        return Request(block_inputs=True)

    # ---- state -----------------------------------------------------------------------------------------------------
    @override
    def extra_state(self) -> dict[str, Any]:
        """The warm-start vectors (``max_samples x T x d`` floats per layer, twice) and the last probe's values."""
        warm = [[layer, variant, pos, v.detach().cpu()] for (layer, variant, pos), v in self._warm.items()]
        return {"warm": warm, "last_metrics": dict(self.last_metrics)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._warm = {(str(layer), str(variant), int(pos)): v for layer, variant, pos, v in state.get("warm", [])}
        self.last_metrics = {str(k): float(v) for k, v in state.get("last_metrics", {}).items()}
        # The checkpoint was written after the probe at last_probe_step; a run resumed there repeats that probe (its
        # events were purged), but the vectors it started from are gone: it logs the values that probe logged.
        self._replay = (self.last_probe_step, dict(self.last_metrics)) if self.last_metrics else None

    def _warm_start(self, layer: str, variant: str, positions: list[int], like: Tensor) -> Tensor | None:
        """The stacked warm vectors of ``positions`` (``None`` unless every one has a vector of ``like``'s shape)."""
        found = [self._warm.get((layer, variant, p)) for p in positions]
        if not found or any(v is None or v.shape != like.shape[1:] for v in found):
            return None
        return torch.stack(found).to(like)  # type: ignore[arg-type]

    def _share_warm(self, trainer: Any) -> None:
        """Under DDP, give every rank every rank's warm vectors (a checkpoint holds rank 0's state only)."""
        dist = torch.distributed
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return
        mine = {k: self._warm[k].detach().cpu() for k in self._measured}
        everyone: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(everyone, mine)  # every rank, at every probe: a collective
        for theirs in everyone:  # the other ranks' samples (disjoint from ours): their latest vectors
            self._warm.update({k: v for k, v in (theirs or {}).items() if k not in self._measured})

    # ---- probing -----------------------------------------------------------------------------------------------
    @override
    def begin(self, session: ProbeSession) -> None:
        replay, self._replay = self._replay, None
        self._replaying = replay is not None and replay[0] == session.step
        if self._replaying:
            self.last_metrics = replay[1]  # type: ignore[index]
            return
        self._layers = session.targets["model"].layers
        groups = stages(self._layers)
        self._spans: list[tuple[str, int, int]] = []  # (key, first layer, end): one per stage (hierarchical models)
        at = 0
        for group in groups if len(groups) > 1 and self.lyapunov else []:
            self._spans.append((f"lyapunov/{stage_name(group)}", at, at + len(group)))
            at += len(group)
        if self._sharded is None and is_sharded(session.pl_module):
            rank_zero_warn(
                "JacobianStability: the model's parameters are sharded (DTensor); the per-layer Jacobian norms and "
                "the Lyapunov exponent cannot be computed under sharding and are skipped (eq. (21) is still logged)"
            )
        self._sharded = is_sharded(session.pl_module)
        keys = [f"sigma/{t.name}" for t in self._layers] + [f"rate/{t.name}" for t in self._layers] + ["lyapunov"]
        keys += [key for key, _, _ in self._spans]
        self._store = GatherStore(keys).to(session.device)

    @override
    def consume(self, pb: ProbeBatch) -> None:
        if self._replaying:
            return
        keep = pb.session.subset(pb.index, self.max_samples)
        if len(keep) == 0 or self._sharded:  # nothing to measure here, but the rank still takes part in the gather
            self._store.update(pb.index[:0], **{k: torch.zeros(0, device=pb.index.device) for k in self._store.keys})
            return
        cap = pb.captured["model"]
        n_layers, k = len(self._layers), self.block
        rows = keep.repeat_interleave(k)  # each sample once per direction of the block iteration
        valid = pb.valid[keep] if pb.valid is not None else None
        maps, inputs, out = [], [], {}
        adapter = pb.session.adapters["model"]
        with torch.enable_grad(), adapter.probe_mode() if adapter is not None else contextlib.nullcontext():
            for layer in self._layers:
                args, kwargs = cap.block_inputs[layer.name]
                f = layer_map(layer.block or layer.module, args, kwargs, rows)
                u = first_input(args, kwargs)
                assert u is not None
                f = token_map(f, layer, u.shape[1:])
                u = u[keep].detach() if layer.tokens is None else layer.tokens(u[keep].detach())
                inputs.append(u)
                dt, _ = step_of(layer, n_layers, self.dt, 1.0)
                vmask = valid if valid is not None and valid.shape == u.shape[:2] else None
                # per-sample starting directions: a sample's estimate does not depend on its batch or rank
                start = gaussian_noise(pb.index[keep], (k, *u.shape[1:]), self.seed).to(u)
                kw: dict[str, Any] = {"block": k, "n_iter": self.n_iter, "tol": 0.0, "start": start}
                positions = pb.index[keep].tolist()
                res = jacobian_spectral_norm_block(f, u, vmask, v0=self._warm_start(layer.name, "", positions, u), **kw)
                v0 = self._warm_start(layer.name, "-I", positions, u)
                rate = jacobian_spectral_norm_block(f, u, vmask, minus_identity=True, v0=v0, **kw)
                for i, p in enumerate(positions):
                    self._warm[(layer.name, "", p)] = res.vector[i].detach()
                    self._warm[(layer.name, "-I", p)] = rate.vector[i].detach()
                    self._measured |= {(layer.name, "", p), (layer.name, "-I", p)}
                out[f"sigma/{layer.name}"], out[f"rate/{layer.name}"] = res.sigma, rate.sigma / dt
                maps.append(f)
            out["lyapunov"] = torch.full((len(keep),), math.nan)
            if self._spans and self.lyapunov:
                skip_once(
                    self,
                    "lyapunov over all layers",
                    "patch merging joins the stages (T and d change) and is no layer map; the exponent is logged "
                    "per stage instead (lyapunov/<stage>)",
                )
            spans = self._spans or [("lyapunov", 0, len(maps))]
            for key, first, end in spans if self.lyapunov and maps else []:
                out[key] = self._lyapunov(pb, keep, maps[first:end], inputs[first], valid)
        self._store.update(pb.index[keep], **{name: v.detach().float() for name, v in out.items()})

    def _lyapunov(
        self, pb: ProbeBatch, keep: Tensor, maps: list[Callable[[Tensor], Tensor]], u0: Tensor, valid: Tensor | None
    ) -> Tensor:
        """``(1/L) log ||∂u_L/∂u_0||_2`` per sample of the composed ``maps`` starting at ``u0``."""
        vmask = valid if valid is not None and valid.shape == u0.shape[:2] else None
        start = gaussian_noise(pb.index[keep], (self.block, *u0.shape[1:]), self.seed + 1).to(u0)
        sigma = jacobian_spectral_norm_block(
            compose(maps), u0, vmask, block=self.block, n_iter=self.n_iter, tol=0.0, start=start
        )
        return sigma.sigma.clamp_min(torch.finfo(sigma.sigma.dtype).tiny).log() / len(maps)

    @override
    def finish(self, session: ProbeSession) -> None:
        if self._replaying:
            self._replaying = False
            self.log_scalars(session.trainer, self.last_metrics, session.step)
            return
        out = self._store.gather()
        self._share_warm(session.trainer)
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
        for key in [k for k, _, _ in self._spans] or ["lyapunov"]:
            lyap = out[key].double()
            lyap = lyap[torch.isfinite(lyap)]
            if self.lyapunov and not self._sharded:
                metrics[self.key(key)] = float(lyap.mean()) if lyap.numel() else math.nan
        self.last_metrics = metrics
        self.log_scalars(session.trainer, metrics, session.step)

    @override
    def layout(self) -> dict[str, list[str]]:
        k = f"analysis/{self.name}"
        return {
            "||du_{l+1}/du_l|| per layer": [rf"^{k}/spectral_norm/.*"],
            "||J - I|| / dt per layer": [rf"^{k}/rate/.*"],
            "eq. (21) per PDE layer": [rf"^{k}/eq21/.*"],
            "Lyapunov exponent": [rf"^{k}/lyapunov(/.*)?$"],
        }
