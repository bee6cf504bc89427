"""What a probe callback writes (rank zero): metric keys, scalars, the Custom Scalars layout, figures, histograms."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as L
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from pdelightning.callbacks._layout import DETAIL, build_layout, finite_only, is_detail
from pdelightning.callbacks._outputs import figure_outputs, log_histogram
from pdelightning.probing import ProbeSession

__all__ = ["ProbeOutput", "log_scalars", "tensorboard", "write_layout"]

# per SummaryWriter: the charts proposed, the tags logged, the layout written (a later run's writer starts afresh)
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


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
    state = _LAYOUTS.setdefault(writer, {"proposed": {}, "tags": set(), "written": None})
    state["proposed"][name] = dict(charts)
    state["tags"].update(t for t in logged if t.startswith(f"analysis/{name}/"))
    layout = build_layout(state["proposed"], state["tags"])
    if layout and layout != state["written"]:
        state["written"] = layout
        writer.add_custom_scalars(layout)


class ProbeOutput:
    """The output half of :class:`~pdelightning.callbacks.ProbeCallback`: keys, scalars, layout, figures."""

    #: the callback's name in its metric keys, ``analysis/<name>/...``
    name: ClassVar[str] = "probe"
    #: regexes of the secondary quantities, logged as ``analysis/<name>/detail/<quantity>[/<layer>]``
    detail: ClassVar[tuple[str, ...]] = ()
    #: ``{quantity: why it can be undefined}``: an undefined value is not logged (and said once), never NaN
    undefined: ClassVar[dict[str, str]] = {}
    _said_undefined: set[str]

    @property
    def figures_due(self) -> bool:
        """Whether the current probe draws figures."""
        return False

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
