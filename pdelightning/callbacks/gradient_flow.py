"""Per-layer gradient magnitudes during training (paper section 3.4, experiment 4: gradient flow analysis).

The paper compares "average gradient magnitudes across different layers" of the PDE model and the
Transformer (PDE mostly ``1e-3..1e-2``, first layer markedly higher; Transformer ``1e-4..1e-3`` and more
uniform) and looks for vanishing or exploding gradients, the backward counterpart of eqs. (22)-(23).
:class:`GradientFlow` reads the training gradients themselves, so unlike the probe callbacks it runs no
forward of its own.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.registry import TargetNotFoundError
from pdelightning.analysis.gradients import ParameterGroups, gradient_norms, group_parameters, update_ratio
from pdelightning.callbacks._gradient_flow import (
    SHARDED_NO_HISTOGRAMS,
    check_arguments,
    find_layers,
    param_groups,
    sharded_gradient_norms,
    sharded_update_ratio,
    write_histograms,
)
from pdelightning.callbacks._layout import DETAIL, finite_only, is_detail
from pdelightning.callbacks._outputs import skip_fit_setup, takes_histograms
from pdelightning.callbacks._scalars import log_scalars, write_layout
from pdelightning.callbacks.base import ON_MISSING
from pdelightning.probing.guard import GuardedCallback, agree
from pdelightning.probing.hub import ProbeHub
from pdelightning.probing.sharding import is_sharded


class GradientFlow(GuardedCallback):
    """Log per-layer gradient magnitudes, update-to-weight ratios and vanishing/exploding-gradient flags.

    Gradients are read in ``on_before_optimizer_step``: after gradient accumulation and AMP unscaling,
    before clipping, once per optimizer step; under DDP they are already averaged across ranks there, so
    rank zero reads and logs them and no collective is needed (under FSDP2 / DTensor, where a rank holds only
    its shard of each gradient, every rank sums its shards and one ``all_reduce`` combines them). On every
    ``every_n_steps``-th optimizer step (counting from step 0, so the first step is always read) all gradient
    norms come from ONE fused ``torch._foreach_norm`` and a segment sum; on other steps the callback does
    nothing but one integer check.

    Parameters are grouped by layer: the layers found by :func:`~pdelightning.callbacks._targets.resolve_targets`
    (the analysis protocol, TransformerLens hook names, or the ``layers`` glob); a layer owns the parameters
    of its block (the layer module, or, when that module holds none, like our ``blocks.<i>.hook_resid_post``,
    its parent). The other parameters form ``embedding`` (the embedding module's and anything registered
    before the first layer), ``head`` (registered after the last layer) and ``other`` (in between). A
    globbed layer that owns no parameters (``nn.ReLU``) is skipped. A model in which no layers can be found
    and no ``layers`` glob is given (e.g. a plain MLP) falls back to one group per module that directly
    owns parameters (``net.1``, ``net.3``). Groups whose gradients are all ``None`` are not logged.

    Two magnitudes are logged per layer: the L2 norm over all of the layer's gradient entries, and the mean
    absolute gradient per element (``||g||_1 / numel``), the paper's "average gradient magnitude", which,
    unlike the norm, does not grow with the layer's size. The vanishing/exploding flags compare the L2 norm
    with the thresholds (a non-finite norm counts as exploding); a warning names the layer when a flag turns on.

    **Cadence.** By default the reads follow the run's analysis time budget (``budget=0.03``, shared with the
    probe callbacks: the gradients of the first step, of the step before each probe and of the last step are
    read, and the time the reads take counts against the budget). An explicit ``every_n_steps`` reads every
    ``n``-th optimizer step instead, exactly.

    Args:
        every_n_steps: read gradients on every ``n``-th optimizer step (``global_step % n == 0``); with ``budget``
            given too, the closest spacing the budget may choose.
        budget: analysis time as a fraction of training time; ``"auto"`` (default): ``0.03`` unless
            ``every_n_steps`` is given; ``None``: the fixed cadence only.
        histogram_every_n_steps: also write per-layer gradient histograms to TensorBoard, on the first read
            step of every window of this many steps (step 0, then about every ``n`` steps); ``None`` for none.
        vanishing_threshold: a layer whose gradient L2 norm is below this is flagged as vanishing.
        exploding_threshold: a layer whose gradient L2 norm is above this (or non-finite) is flagged as exploding.
        log_update_ratio: on read steps, copy the parameters before the optimizer step and log
            ``||Δθ|| / ||θ||`` per layer after it (costs one copy of the weights, on those steps only).
        layers: glob of the layer modules, overriding discovery (e.g. ``"encoder.layers.*"``).
        attention: glob of their attention modules (unused for grouping; accepted for config symmetry).
        embedding: name/glob of the input-embedding module (its parameters form the ``embedding`` group).
        on_missing: ``"raise"`` (default) or ``"warn"``: what to do when a ``layers``/``embedding`` glob matches
            nothing (``"warn"``: one warning, then the callback steps aside).
        on_error: ``"raise"`` (default) or ``"warn"``: what to do when the callback itself raises (``"warn"``: one
            warning naming the error, then the callback is switched off on every rank and training goes on; see
            :mod:`pdelightning.probing.guard`).

    Raises:
        ValueError: for a non-positive cadence, thresholds that are not ``0 <= vanishing < exploding``, or an
            unknown ``on_missing`` or ``on_error``.
        TargetNotFoundError: at ``setup`` when a ``layers``/``embedding`` glob matches nothing.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[GradientFlow(every_n_steps=50, histogram_every_n_steps=500)])

    Logged metrics:
        On read steps (rank zero, at the ``global_step`` of the optimizer step whose gradients they are):

        * ``analysis/gradient_flow/grad_norm/<layer>``: L2 norm of the layer's gradient.
        * ``analysis/gradient_flow/grad_abs_mean/<layer>``: mean absolute gradient per parameter entry.
        * ``analysis/gradient_flow/update_ratio/<layer>``: ``||Δθ|| / ||θ||`` of this optimizer step.
        * ``analysis/gradient_flow/detail/param_group_norm/<i>``: L2 gradient norm of optimizer parameter group ``i``
          (``<j>.<i>`` for optimizer ``j`` when there are several).
        * ``analysis/gradient_flow/detail/vanishing/<layer>``, ``analysis/gradient_flow/detail/exploding/<layer>``:
          0/1 flags.
        * ``analysis/gradient_flow/grad_hist/<layer>``: TensorBoard histogram, on histogram steps.

        ``<layer>`` is a layer name (``blocks.0``, ``encoder.layers.1``) or ``embedding``, ``head``, ``other``.
        A non-finite norm or ratio is not logged (said once in the log); its ``exploding`` flag is.
    """

    name = "gradient_flow"
    detail = ("vanishing", "exploding", "param_group_norm")
    undefined: ClassVar[dict[str, str]] = {
        "grad_norm": "the gradient is not finite (its detail/exploding flag is 1)",
        "grad_abs_mean": "the gradient is not finite (its detail/exploding flag is 1)",
        "update_ratio": "the parameters are not finite after the step",
    }

    def __init__(
        self,
        every_n_steps: int | None = None,
        budget: float | str | None = "auto",
        histogram_every_n_steps: int | None = 500,
        vanishing_threshold: float = 1e-7,
        exploding_threshold: float = 1e3,
        log_update_ratio: bool = True,
        layers: str | None = None,
        attention: str | None = None,
        embedding: str | None = None,
        on_missing: str = "raise",
        on_error: str = "raise",
    ) -> None:
        budget = check_arguments(
            every_n_steps, budget, histogram_every_n_steps, vanishing_threshold, exploding_threshold
        )
        check_choice("on_missing", on_missing, ON_MISSING)
        self.init_guard(on_error)
        self.every_n_steps = every_n_steps
        self.budget: float | None = budget
        self.on_missing = on_missing
        self.disabled: str | None = None
        self._hub: ProbeHub | None = None
        self.histogram_every_n_steps = histogram_every_n_steps
        self.vanishing_threshold = vanishing_threshold
        self.exploding_threshold = exploding_threshold
        self.log_update_ratio = log_update_ratio
        self.patterns = {"layers": layers, "attention": attention, "embedding": embedding}
        self._layer_modules: tuple[list[tuple[str, nn.Module]], nn.Module | None] | None = None
        self._groups: ParameterGroups | None = None
        self._flagged: set[tuple[str, str]] = set()
        self._histogram_window = -1
        self._snapshot: tuple[int, list[nn.Parameter], list[Tensor], Tensor] | None = None
        self._family = ""
        self._said_undefined: set[str] = set()
        self._sharded = False  # FSDP2 / DTensor parameters: every rank reduces its shards' norms

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, **self.patterns)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "flagged": sorted(self._flagged),
            "histogram_window": self._histogram_window,
            "hub": self._hub.state_dict() if self._hub is not None else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._flagged = {tuple(f) for f in state_dict.get("flagged", [])}  # type: ignore[misc]
        self._histogram_window = int(state_dict.get("histogram_window", -1))
        if self._hub is not None and state_dict.get("hub"):
            self._hub.load_state_dict(state_dict["hub"])

    # ---- grouping --------------------------------------------------------------------------------------
    def _layers(self, pl_module: nn.Module) -> tuple[list[tuple[str, nn.Module]], nn.Module | None]:
        layers, embedding, self._family = find_layers(pl_module, self.patterns)
        return layers, embedding

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if skip_fit_setup(self, trainer, stage):
            return
        try:
            self._layer_modules = self._layers(pl_module)  # fail fast on a bad glob, before training
        except TargetNotFoundError as err:
            if self.on_missing == "raise":
                self.let_through(err)  # on_missing decides, whatever on_error says
                raise
            self.disabled = str(err)
            rank_zero_warn(f"GradientFlow is switched off for this run: {err}")
            return
        if self.budget is not None:
            self._hub = ProbeHub.of(trainer)
            self._hub.attach_reader(self)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.disabled is not None:
            return
        layers, embedding = self._layer_modules or self._layers(pl_module)
        self._groups = group_parameters(pl_module, layers, embedding)
        self._sharded = is_sharded(pl_module)
        if self._sharded and self.histogram_every_n_steps:
            rank_zero_warn(SHARDED_NO_HISTOGRAMS)
        if self._hub is not None:
            self._hub.start_clock(trainer)
        write_layout(trainer, self.name, self.layout())

    @override
    def guard_context(self) -> str:
        return self._family

    def layout(self) -> dict[str, list[str]]:
        """Custom-scalars charts: one multiline chart per quantity, all layers on it (only those logged are shown)."""
        return {q: [rf"^{self._key(q, '')}[^/]+$"] for q in ("grad_norm", "grad_abs_mean", "update_ratio")}

    # ---- hooks -----------------------------------------------------------------------------------------
    def due(self, trainer: L.Trainer) -> bool:
        """Whether the gradients of this optimizer step are read (same answer on every rank)."""
        if self.disabled is not None:
            return False
        if self._hub is not None:
            return self._hub.gradient_read_due(trainer)
        return trainer.global_step % self.every_n_steps == 0  # type: ignore[operator]

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if not self.due(trainer):
            return
        start = time.perf_counter()
        with self.guarded("reading the gradients", trainer):  # rank zero's own work: agreed before the collective
            if (trainer.is_global_zero or self._sharded) and self._groups is not None:
                self._read(trainer, optimizer)  # sharded: every rank, for the one all_reduce of the shards' norms
        if trainer.world_size > 1:
            agree(trainer, [self])  # every rank reads (or skips) the same steps
        if self._hub is not None:
            self._hub.record_read(trainer, time.perf_counter() - start)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is None:
            return
        step, params, before, groups = self._snapshot
        self._snapshot = None
        assert self._groups is not None
        n = len(self._groups.names)
        with torch.no_grad():
            after = [p.detach() for p in params]
            if self._sharded:  # every rank: ||Δθ||² and ||θ||² summed over the shards, one all_reduce
                ratio = sharded_update_ratio(before, after, groups, n, pl_module.device)
            else:
                ratio = update_ratio(before, after, groups, n)
        present = sorted(set(groups.tolist()))
        values = ratio.tolist()
        self._log(trainer, {self._key("update_ratio", self._groups.names[g]): values[g] for g in present}, step)

    # ---- measurement -----------------------------------------------------------------------------------
    def _key(self, quantity: str, layer: str) -> str:
        group = f"{DETAIL}/" if is_detail(quantity, self.detail) else ""
        return f"analysis/{self.name}/{group}{quantity}/{layer}"

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        """Log the finite values (a non-finite norm is not logged; its ``exploding`` flag is) and follow the layout."""
        if not trainer.is_global_zero:
            return
        kept = finite_only(metrics, self._said_undefined, type(self).__name__, self.undefined)
        log_scalars(trainer, kept, step)
        write_layout(trainer, self.name, self.layout(), kept)

    def _read(self, trainer: L.Trainer, optimizer: Optimizer) -> None:
        groups = self._groups
        assert groups is not None
        step = trainer.global_step
        with_grad = [(p, g) for p, g in zip(groups.params, groups.index, strict=True) if p.grad is not None]
        if not with_grad:
            return
        params = [p for p, _ in with_grad]
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        seg = torch.tensor([g for _, g in with_grad])
        n = len(groups.names)
        pg_names, pg_members, pg_index = param_groups(trainer.optimizers, optimizer, params)
        with torch.no_grad():
            groups_pg = (pg_members, pg_index, len(pg_names))
            if self._sharded:  # sums over every rank's shards, one all_reduce
                l2, l1, pg = sharded_gradient_norms(grads, seg, n, *groups_pg, trainer.strategy.root_device)
            else:
                l2, l1, pg = gradient_norms(grads, seg, n, *groups_pg)  # ONE fused norm call
            values = torch.cat([l2.float(), l1.float(), pg.float()]).tolist()  # one device sync
        l2_, l1_, pg_ = values[:n], values[n : 2 * n], values[2 * n :]
        numel = [0.0] * n
        for p, g in with_grad:
            numel[g] += p.numel()
        present = sorted(set(seg.tolist()))
        metrics: dict[str, float] = {
            self._key("param_group_norm", name): v for name, v in zip(pg_names, pg_, strict=True)
        }
        for g in present:
            layer, norm = groups.names[g], l2_[g]
            vanishing = norm < self.vanishing_threshold
            exploding = not norm <= self.exploding_threshold  # NaN: exploding
            metrics[self._key("grad_norm", layer)] = norm
            metrics[self._key("grad_abs_mean", layer)] = l1_[g] / max(numel[g], 1.0)
            metrics[self._key("vanishing", layer)] = float(vanishing)
            metrics[self._key("exploding", layer)] = float(exploding)
            self._flag("vanishing", layer, vanishing, f"grad_norm={norm:.3g} < {self.vanishing_threshold:g}", step)
            self._flag("exploding", layer, exploding, f"grad_norm={norm:.3g} > {self.exploding_threshold:g}", step)
        self._log(trainer, metrics, step)
        if (
            self.histogram_every_n_steps
            and not self._sharded
            and step // self.histogram_every_n_steps != self._histogram_window
        ):
            self._histogram_window = step // self.histogram_every_n_steps
            if takes_histograms(trainer):  # TensorBoard or W&B
                keys = {g: self._key("grad_hist", groups.names[g]) for g in present}
                write_histograms(trainer, keys, grads, seg.tolist(), step)
        if self.log_update_ratio:
            with torch.no_grad():
                before = list(torch._foreach_mul([p.detach() for p in params], 1.0))
            self._snapshot = (step, params, before, seg)

    def _flag(self, kind: str, layer: str, on: bool, detail: str, step: int) -> None:
        if on and (kind, layer) not in self._flagged:
            rank_zero_warn(f"GradientFlow: {kind} gradient in {layer} at step {step}: {detail}")
            self._flagged.add((kind, layer))
        elif not on:
            self._flagged.discard((kind, layer))
