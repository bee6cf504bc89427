"""The base of every probe callback: when to probe, on what, and where results go.

A probe callback declares what it needs from a probe forward (:meth:`ProbeCallback.request`, and
:meth:`ProbeCallback.extra_models` for reference and null models), and consumes the shared captures batch by
batch (:meth:`ProbeCallback.consume`) before finishing with its collectives and logging
(:meth:`ProbeCallback.finish`). It implements the hub's protocol (:class:`~pdelightning.probing.ProbeClient`): the
trainer's :class:`~pdelightning.probing.ProbeHub` decides who is due (its :class:`~pdelightning.probing.ProbePlanner`)
and runs the forwards once for all callbacks due at a step. Subclass it to write your own analysis (an example, run
by a test, is in this folder's ``README.md``).

**Cadence.** By default a callback runs under a time budget (``budget=0.03``: analysis at most 3 % of the training
wall time, probes spaced by measuring what they and a training step cost; always at the start and the end of
training; the budget is shared by every callback of the run). An explicit ``every_n_steps`` / ``every_n_epochs``
switches to a fixed cadence exactly as given; with ``budget`` also given, ``every_n_steps`` is the closest spacing
the budget may choose.

**Attaching.** At ``setup`` the model's adapter is found (:mod:`pdelightning.adapters`). When it gives nothing this
callback can use, ``on_missing="raise"`` (default) raises :class:`~pdelightning.adapters.TargetNotFoundError` naming
what was looked for and what was found; ``on_missing="warn"`` (what the ``PDELIGHTNING_CALLBACKS`` plugin uses) warns
once and steps aside, and training continues.

**Failing.** An exception raised by the callback itself, in any hook or in its part of a probe, propagates with
``on_error="raise"`` (default). With ``on_error="warn"`` (what the plugin uses) it is reported once (the callback,
the model family, the error and its last frame, how to report it) and the callback is switched off for the rest of
the run, on every rank together, while training goes on (:mod:`pdelightning.probing.guard`).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.base import ModelAdapter
from pdelightning.adapters.registry import TargetNotFoundError, resolve, unwrap
from pdelightning.callbacks._outputs import skip_fit_setup
from pdelightning.callbacks._scalars import ProbeOutput
from pdelightning.compat import callback_state_key
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.probing import (
    DEFAULT_PROBE_SIZE,
    GuardedCallback,
    ProbeBatch,
    ProbeHub,
    ProbeSession,
    Request,
    check_cadence,
    validation_loader,
)
from pdelightning.probing.batch import uncallable

__all__ = ["ON_MISSING", "ProbeCallback"]

ON_MISSING = ("raise", "warn")


class ProbeCallback(ProbeOutput, GuardedCallback):
    """Base class of the probe callbacks (see the module docstring).

    Args:
        every_n_steps: probe after every ``n``-th optimizer step (fixed cadence); with ``budget`` set explicitly, the
            closest spacing the budget may choose.
        every_n_epochs: probe at the end of every ``n``-th training epoch (fixed cadence).
        budget: analysis time as a fraction of training time; ``"auto"`` (default): ``0.03`` unless a fixed cadence is
            given; ``None``: no budget (fixed cadence only).
        probe_at_start: also probe once before the first training step (the curves' step 0).
        probe_size: number of validation samples in the fixed probe set (256 by default, for every callback).
        probe_batch_size: batch size of the probe forwards.
        layers: glob of the layer modules (``*`` = one name segment), overriding the adapter's layers.
        attention: glob of their attention modules.
        embedding: name/glob of the module whose output is the input embedding ``u_0``.
        seed: seed of the probe-set draw.
        figure_every_n_probes: also draw figures on the first probe and every ``n``-th after it (drawn by the figure
            worker process, :mod:`pdelightning.probing.figures`); ``None`` (default): on the last probe of training
            only.
        on_missing: ``"raise"`` (default) or ``"warn"``: what to do at ``setup`` when the model offers nothing this
            callback can analyse (``"warn"``: one warning, then the callback steps aside).
        on_error: ``"raise"`` (default) or ``"warn"``: what to do when the callback itself raises, in a hook or a
            probe (``"warn"``: one warning naming the error, then the callback is switched off on every rank and
            training goes on; see :mod:`pdelightning.probing.guard`).

    Raises:
        ValueError: for non-positive cadences or sizes, a budget outside (0, 1), an unknown ``on_missing`` or
            ``on_error``, or no cadence at all.

    Example::

        class HiddenNorm(ProbeCallback):  # the whole example: callbacks/README.md
            name = "hidden_norm"

            def request(self) -> Request:
                return Request(hidden=True)

            def consume(self, pb: ProbeBatch) -> None: ...  # pb.captured["model"].hidden: {layer: [B, T, d]}
    """

    #: what the model must offer (``"layers"``, ``"attention"``, ...); setup checks it
    needs: ClassVar[tuple[str, ...]] = ("layers",)

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        budget: float | str | None = "auto",
        probe_at_start: bool = True,
        probe_size: int = DEFAULT_PROBE_SIZE,
        probe_batch_size: int = 128,
        layers: str | None = None,
        attention: str | None = None,
        embedding: str | None = None,
        seed: int = 0,
        figure_every_n_probes: int | None = None,
        on_missing: str = "raise",
        on_error: str = "raise",
    ) -> None:
        self.budget: float | None = check_cadence(every_n_steps, every_n_epochs, budget, probe_at_start)
        for arg, value in (("probe_size", probe_size), ("probe_batch_size", probe_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}={value!r} must be positive (an integer >= 1)")
        if figure_every_n_probes is not None and figure_every_n_probes <= 0:
            raise ValueError(
                f"figure_every_n_probes={figure_every_n_probes} must be positive or None (last probe only)"
            )
        check_choice("on_missing", on_missing, ON_MISSING)
        self.init_guard(on_error)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.probe_at_start = probe_at_start
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.patterns = {"layers": layers, "attention": attention, "embedding": embedding}
        self.seed = seed
        self.figure_every_n_probes = figure_every_n_probes
        self.on_missing = on_missing
        self.disabled: str | None = None
        self.last_probe_step = -1
        self._n_probes = 0
        self._adapter: ModelAdapter | None = None
        self._plain = False
        self._hub: ProbeHub | None = None
        self._pending_hub_state: dict[str, Any] | None = None
        self._said_undefined: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(
            self, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs, **self.patterns
        )

    @property
    def active(self) -> bool:
        """Whether this callback takes part in probes (it did not step aside at setup)."""
        return self.disabled is None

    # ---- targets -------------------------------------------------------------------------------------------------
    def resolved(self, pl_module: nn.Module) -> tuple[ModelAdapter | None, AnalysisTargets]:
        """``(adapter, targets)`` of the model under training (targets re-read: PDE coefficients are live)."""
        if self._adapter is not None and self._adapter.root is unwrap(pl_module) and self._plain:
            return self._adapter, self._adapter.targets()
        adapter, targets = resolve(pl_module, need=self.needs, **self.patterns)
        self._plain = all(v is None for v in self.patterns.values())
        self._adapter = adapter
        return adapter, targets

    def targets(self, pl_module: nn.Module) -> AnalysisTargets:
        """The targets this callback analyses."""
        return self.resolved(pl_module)[1]

    @override
    def guard_context(self) -> str:
        adapter = self._adapter
        if adapter is None:
            return ""
        return f"model family {adapter.family!r}, model {type(adapter.model).__name__}"

    def step_aside(self, why: str) -> None:
        """Warn once and stop taking part (``on_missing="warn"``)."""
        self.disabled = why
        rank_zero_warn(f"{type(self).__name__} is switched off for this run: {why}")

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Checks at ``setup``; raise :class:`TargetNotFoundError` (or ``ValueError``) for what cannot work."""
        self.resolved(pl_module)
        if (why := uncallable(pl_module)) is not None:  # a module without forward() and nothing inside to call
            raise TargetNotFoundError(why)
        if self.probe_loader(trainer) is None:
            raise TargetNotFoundError(
                f"{type(self).__name__} needs validation (or training) data for its probe set: give the trainer a "
                "val_dataloader or a datamodule with one"
            )

    def probe_loader(self, trainer: L.Trainer) -> DataLoader | None:
        """The loader the probe set comes from."""
        return validation_loader(trainer)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if skip_fit_setup(self, trainer, stage):
            return
        try:
            self.check(trainer, pl_module)
        except (TargetNotFoundError, ValueError) as err:
            if self.on_missing == "raise":
                self.let_through(err)  # on_missing decides, whatever on_error says
                raise
            self.step_aside(str(err))
            return
        self._hub = ProbeHub.of(trainer)
        self._hub.attach(self)
        with contextlib.suppress(Exception):  # built here, not inside the first probe (an iterable dataset: later)
            self._hub.probe_set(trainer, self)
        if self._pending_hub_state is not None:
            self._hub.load_state_dict(self._pending_hub_state)
            self._pending_hub_state = None

    @property
    def hub(self) -> ProbeHub:
        """The trainer's probe hub (after setup)."""
        if self._hub is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: attach it to a Trainer and call fit()")
        return self._hub

    # ---- what to capture (override) ------------------------------------------------------------------------------
    def request(self) -> Request:
        """What this callback needs from the model's probe forward."""
        return Request()

    def extra_models(self, pl_module: nn.Module) -> dict[str, tuple[nn.Module, Request]]:
        """Other models to run on the same probe batches: ``{key: (module, request)}`` (same key: one forward)."""
        return {}

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the start of training, before the start probe (every rank; no collectives): e.g. copy the model.

        Called by the hub for every callback of the trainer, once per fit, from whichever probe callback's
        ``on_train_start`` comes first, so it does not depend on the order of the trainer's callbacks.
        """

    def begin(self, session: ProbeSession) -> None:
        """Start of a probe (every rank): e.g. create the stores."""

    def consume(self, pb: ProbeBatch) -> None:
        """One probe batch with the shared captures (every rank; a rank's stand-in batch has an empty index)."""

    def finish(self, session: ProbeSession) -> None:
        """End of a probe (every rank): collectives, then rank-zero logging."""

    # ---- cadence (decided by the hub's planner, pdelightning.probing.planner) ---------------------------------------
    def mark_probed(self, step: int, final: bool) -> None:
        """Called by the hub after :meth:`finish` (a probe repeated at the same step after a resume is not counted)."""
        if step != self.last_probe_step:
            self._n_probes += 1
        self.last_probe_step = step

    @property
    def figures_due(self) -> bool:
        """Whether the current probe draws figures (the last of training; also every ``figure_every_n_probes``-th)."""
        k = self.figure_every_n_probes
        final = self._hub is not None and self._hub.final
        return final or (k is not None and self._n_probes % k == 0)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hub is None or not self.active:
            return
        self._hub.start_clock(trainer)
        self.write_layout(trainer)
        self._hub.on_hook(trainer, pl_module, "start")

    def _on_hook(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str) -> None:
        if self._hub is not None and self.active:
            self._hub.on_hook(trainer, pl_module, hook)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._on_hook(trainer, pl_module, "batch_end")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_hook(trainer, pl_module, "epoch_end")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_hook(trainer, pl_module, "train_end")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hub is not None:
            self._hub.figures.drain()  # the worker writes the last figures after fit returns, before the process exits

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._hub is not None:
            self._hub.figures.drain()

    # ---- state -----------------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """A subclass's own history, for checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    @override
    def state_dict(self) -> dict[str, Any]:
        hub = self._hub.state_dict() if self._hub is not None else None
        return {"n_probes": self._n_probes, "last_probe_step": self.last_probe_step, "hub": hub, **self.extra_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._n_probes = int(state_dict.get("n_probes", 0))
        self.last_probe_step = int(state_dict.get("last_probe_step", -1))
        hub = state_dict.get("hub")
        if hub:
            if self._hub is not None:
                self._hub.load_state_dict(hub)
            else:
                self._pending_hub_state = hub
        self.load_extra_state(state_dict)
