"""The base of every probe callback: when to probe, on what, and where results go.

A probe callback declares what it needs from a probe forward (:meth:`ProbeCallback.request`, and
:meth:`ProbeCallback.extra_models` for reference and null models), and consumes the shared captures batch by
batch (:meth:`ProbeCallback.consume`) before finishing with its collectives and logging
(:meth:`ProbeCallback.finish`). The forwards themselves are run once for all callbacks due at a step by the
trainer's :class:`~pdelightning.probing.hub.ProbeHub`.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.base import ModelAdapter
from pdelightning.adapters.registry import TargetNotFoundError, resolve, unwrap
from pdelightning.callbacks._layout import DETAIL, build_layout, finite_only, is_detail
from pdelightning.callbacks._outputs import figure_outputs, log_histogram, steps_aside_without_logger
from pdelightning.callbacks._strategy import warn_unverified_strategy
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.probing.batch import split_batch as _split
from pdelightning.probing.batch import uncallable
from pdelightning.probing.capture import Request
from pdelightning.probing.guard import ON_ERROR, GuardedCallback
from pdelightning.probing.hub import ProbeBatch, ProbeHub, ProbeSession
from pdelightning.probing.loaders import validation_loader
from pdelightning.probing.probe_set import DEFAULT_PROBE_SIZE
from pdelightning.probing.store import GatherStore

__all__ = [
    "DEFAULT_PROBE_SIZE",
    "ON_ERROR",
    "GatherStore",
    "ProbeCallback",
    "log_scalars",
    "split_batch",
    "tensorboard",
    "validation_loader",
    "write_layout",
]

DEFAULT_BUDGET = 0.03
ON_MISSING = ("raise", "warn")


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)`` of a batch (the first positional input, or the dict of keyword inputs)."""
    args, kwargs, labels = _split(batch)
    return (kwargs if kwargs else args[0]), labels


_LAYOUT_STATE = "_pdelightning_layout"  # SummaryWriter attribute: proposed charts, tags logged, layout written


def tensorboard(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger`` on rank zero, else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
    """Write scalars to every logger at ``step`` (default: the current global step), on rank zero only."""
    if not trainer.is_global_zero or not metrics:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step if step is None else step)


def write_layout(trainer: L.Trainer, name: str, charts: Mapping[str, list[str]], logged: Iterable[str] = ()) -> None:
    """Propose callback ``name``'s charts ``{title: [tag regex, ...]}``, note the tags ``logged`` just now, and
    (re)write the run's Custom Scalars layout when it changed (rank 0).

    The layout holds only charts that match logged tags (:func:`~pdelightning.callbacks._layout.build_layout`): it
    is written again as new tags appear, and TensorBoard shows the last one written.
    """
    writer = tensorboard(trainer)
    if writer is None:
        return
    state = getattr(writer, _LAYOUT_STATE, None)  # on the writer itself: a later run's writer starts afresh
    if state is None:
        state = {"proposed": {}, "tags": set(), "written": None}
        setattr(writer, _LAYOUT_STATE, state)
    state["proposed"][name] = dict(charts)
    state["tags"].update(t for t in logged if t.startswith(f"analysis/{name}/"))
    layout = build_layout(state["proposed"], state["tags"])
    if layout and layout != state["written"]:
        state["written"] = layout
        writer.add_custom_scalars(layout)


class ProbeCallback(GuardedCallback):
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
    """

    name: ClassVar[str] = "probe"
    needs: ClassVar[tuple[str, ...]] = ("layers",)
    #: regexes of the secondary quantities, logged as ``analysis/<name>/detail/<quantity>[/<layer>]``
    detail: ClassVar[tuple[str, ...]] = ()
    #: ``{quantity: why it can be undefined}``: an undefined value is not logged (and said once), never NaN
    undefined: ClassVar[dict[str, str]] = {}

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
        for arg, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{arg}={value!r} must be a positive integer or None")
        if budget == "auto":
            budget = DEFAULT_BUDGET if every_n_steps is None and every_n_epochs is None else None
        if budget is not None and not (isinstance(budget, (int, float)) and 0 < float(budget) < 1):
            raise ValueError(f"budget={budget!r} must be a fraction in (0, 1) (e.g. 0.03), 'auto' or None")
        if budget is None and every_n_steps is None and every_n_epochs is None and not probe_at_start:
            raise ValueError(
                "set budget, every_n_steps or every_n_epochs (or probe_at_start): this callback would never run"
            )
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
        self.budget: float | None = None if budget is None else float(budget)
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
        self._final = False
        self._adapter: ModelAdapter | None = None
        self._plain = False
        self._hub: ProbeHub | None = None
        self._pending_hub_state: dict[str, Any] | None = None
        self._said_undefined: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs, **self.patterns
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
        if stage != "fit":
            return
        if steps_aside_without_logger(self, trainer):  # logger=False under the plugin: nothing to write to
            self.disabled = "the Trainer has no logger (logger=False)"
            return
        warn_unverified_strategy(trainer)
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

    # ---- cadence ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _steps_done(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        return trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1

    def is_due(self, trainer: L.Trainer, hook: str, final: bool) -> bool:
        """Whether this callback probes at ``hook`` (``start``, ``batch_end``, ``epoch_end``, ``train_end``) now."""
        step = trainer.global_step
        if hook == "start":
            # a run resumed from a checkpoint taken right after a probe logs that probe again: the log purge on
            # resume removed everything at the checkpoint's step (what the killed run's next batch had logged too)
            return (self.probe_at_start and step == 0) or (step > 0 and self.last_probe_step == step)
        if self.budget is not None:
            if hook == "train_end":
                return self.last_probe_step != step
            return final or (hook == "batch_end" and self.hub.budget_due(trainer))
        epoch_hit = bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0  # type: ignore[operator]
        if hook == "batch_end":
            step_hit = bool(self.every_n_steps) and step % self.every_n_steps == 0  # type: ignore[operator]
            return step_hit or (epoch_hit and bool(trainer.is_last_batch))
        if hook == "epoch_end":
            return epoch_hit
        return False

    def mark_probed(self, step: int, final: bool) -> None:
        """Called by the hub after :meth:`finish` (a probe repeated at the same step after a resume is not counted)."""
        if step != self.last_probe_step:
            self._n_probes += 1
        self.last_probe_step = step

    @property
    def figures_due(self) -> bool:
        """Whether the current probe draws figures (the last of training; also every ``figure_every_n_probes``-th)."""
        k = self.figure_every_n_probes
        return self._final or (k is not None and self._n_probes % k == 0)

    def _hub_step(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str, final: bool) -> None:
        if self._hub is None or not self.active:
            return
        if hook != "start" and self._hub.checked == self._hub.check_key(trainer, hook, final):
            return  # another callback's hook checked every callback at this step and hook already
        for c in self._hub.callbacks:
            c._final = final
        try:
            self._hub.step(trainer, pl_module, hook, final)
        finally:
            for c in self._hub.callbacks:
                c._final = False

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hub is None or not self.active:
            return
        self._hub.start_clock(trainer)
        self.write_layout(trainer)
        self._hub_step(trainer, pl_module, "start", final=False)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        final = self._steps_done(trainer) or (bool(trainer.is_last_batch) and self._last_epoch(trainer))
        self._hub_step(trainer, pl_module, "batch_end", final)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hub_step(trainer, pl_module, "epoch_end", self._last_epoch(trainer) or self._steps_done(trainer))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hub_step(trainer, pl_module, "train_end", final=True)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hub is not None:
            self._hub.figures.drain()  # the worker writes the last figures after fit returns, before the process exits

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._hub is not None:
            self._hub.figures.drain()

    # ---- output ----------------------------------------------------------------------------------------------------
    def key(self, quantity: str, layer: str | None = None) -> str:
        """``analysis/<callback>/<quantity>[/<layer>]``, or ``analysis/<callback>/detail/...`` for a quantity that
        matches :attr:`detail`.
        """
        group = f"{DETAIL}/" if is_detail(quantity, self.detail) else ""
        return f"analysis/{self.name}/{group}{quantity}" + (f"/{layer}" if layer else "")

    def log_scalars(self, trainer: L.Trainer, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
        """Write the finite scalars to every logger at ``step`` (default: the current global step), rank zero only;
        an undefined value is left out and said once (:func:`finite_only`). The layout follows the tags logged.
        """
        if not trainer.is_global_zero:
            return
        kept = finite_only(metrics, self._said_undefined, type(self).__name__, self.undefined)
        log_scalars(trainer, kept, step)
        write_layout(trainer, self.name, self.layout(), kept)

    def figure(self, session: ProbeSession, tag: str, draw: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Draw ``draw(*args, **kwargs)`` (a matplotlib figure) under ``tag`` for every logger that takes figures
        (rank 0; see :mod:`pdelightning.callbacks._outputs`), in the figure worker process when ``draw`` is a
        module-level function (see :mod:`pdelightning.probing.figures`).
        """
        if self.figures_due and (out := figure_outputs(session.trainer)):
            session.figures.submit(out, tag, session.step, draw, *args, **kwargs)

    def add_histogram(self, trainer: L.Trainer, tag: str, values: Tensor) -> None:
        """Write a histogram to every logger that takes histograms (TensorBoard, W&B; rank zero)."""
        log_histogram(trainer, tag, values)

    def layout(self) -> dict[str, list[str]]:
        """Custom-scalars charts: ``{chart title: [tag regex, ...]}``; one multiline chart per quantity."""
        return {}

    def write_layout(self, trainer: L.Trainer) -> None:
        """Merge this callback's charts into the run's custom-scalars layout (rank zero)."""
        write_layout(trainer, self.name, self.layout())

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


def no_grad_unless(needed: bool) -> Any:
    """``torch.enable_grad()`` when ``needed``, else a null context (probes run under ``no_grad``)."""
    return torch.enable_grad() if needed else contextlib.nullcontext()
