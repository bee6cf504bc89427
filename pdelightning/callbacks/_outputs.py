"""Where the analysis results go: every logger of the run, each the way it takes them.

* **Scalars** go to every logger (``log_metrics``), on rank zero.
* **Figures** go to every ``TensorBoardLogger`` (an image at the step), to every logger that takes images (W&B's
  ``WandbLogger.log_image``, an artifact ``figures/<tag>_step<N>.png`` of an ``MLFlowLogger`` run, any logger with a
  ``log_image(key, images, step)`` method), and, for a logger with a log directory but no images (``CSVLogger``),
  to PNG files ``<log_dir>/figures/<tag>_step<N>.png``, said once with the directory. With no logger that takes
  them, figures are not drawn, and that is said once.
* **Histograms** go to TensorBoard and W&B (other loggers have no histogram type; the notice above says so).
* ``logger=False`` (no logger at all): nothing measured is written, said once (:func:`no_logger`). Callbacks
  attached by the ``PDELIGHTNING_CALLBACKS`` plugin (``on_missing="warn"``: they step aside when the run lacks what
  they need) switch off at setup and run no probe; callbacks attached explicitly still run (their results stay in
  their attributes, e.g. ``PDEFit.history``, and ``StabilityMonitor(action="stop")`` still acts on the run).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from pdelightning.callbacks._strategy import warn_unverified_strategy
from pdelightning.probing.figures import FigureOutputs
from pdelightning.utils import warn_once


def takes_images(logger: Logger) -> bool:
    """Whether ``logger`` takes image files: ``MLFlowLogger`` (as artifacts) or one with a ``log_image`` method."""
    return isinstance(logger, MLFlowLogger) or callable(getattr(logger, "log_image", None))


def deliver_image(logger: Logger, tag: str, path: str, step: int) -> None:
    """Hand the PNG file ``path`` of figure ``tag`` at ``step`` to ``logger`` (it keeps its own copy)."""
    if isinstance(logger, MLFlowLogger):
        folder = os.path.dirname(os.path.join("figures", tag))
        logger.experiment.log_artifact(logger.run_id, path, artifact_path=folder)
    else:
        logger.log_image(key=tag, images=[path], step=step)  # type: ignore[attr-defined]


def _log_dir(logger: Logger) -> str | None:
    try:
        log_dir = logger.log_dir  # type: ignore[attr-defined]
    except Exception:
        return None
    return log_dir if isinstance(log_dir, str) and log_dir else None


def figure_outputs(trainer: L.Trainer) -> FigureOutputs:
    """Where this run's figures go (empty on ranks other than zero; see the module docstring)."""
    out = FigureOutputs()
    if not trainer.is_global_zero:
        return out
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            out.writers.append(logger.experiment)
        elif takes_images(logger):
            out.deliver.append(partial(deliver_image, logger))
        elif (log_dir := _log_dir(logger)) is not None:
            folder = os.path.join(log_dir, "figures")
            out.png_dirs.append(folder)
            warn_once(
                logger,
                "figures as files",
                f"pdelightning: {type(logger).__name__} takes no images: figures are written as PNG files to "
                f"{folder}{os.sep}<tag>_step<N>.png (histograms only go to TensorBoard or W&B)",
                say=rank_zero_info,
            )
    if not out and trainer.loggers:
        names = ", ".join(type(lg).__name__ for lg in trainer.loggers)
        warn_once(
            trainer,
            "no figures",
            f"pdelightning: no logger of this run takes figures or has a log directory ({names}): figures are not "
            "drawn; add a TensorBoardLogger, CSVLogger or WandbLogger to get them",
            say=rank_zero_info,
        )
    return out


def takes_histograms(trainer: L.Trainer) -> bool:
    """Whether a logger of this run (rank zero) takes histograms: TensorBoard or W&B."""
    return trainer.is_global_zero and any(isinstance(lg, (TensorBoardLogger, WandbLogger)) for lg in trainer.loggers)


def log_histogram(trainer: L.Trainer, tag: str, values: Tensor, step: int | None = None) -> None:
    """Write a histogram of ``values`` to every logger that takes histograms (rank zero)."""
    if not values.numel() or not takes_histograms(trainer):
        return
    step = trainer.global_step if step is None else step
    values = values.detach().float().cpu()
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(tag, values, global_step=step)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({tag: wandb.Histogram(values.numpy()), "trainer/global_step": step})


def no_logger(trainer: L.Trainer) -> bool:
    """Whether the run has no logger (``logger=False``), so nothing measured is written. Said once per trainer."""
    if getattr(trainer, "loggers", True):  # a trainer with loggers, or none at all (a hook called by hand)
        return False
    warn_once(
        trainer,
        "no logger",
        "pdelightning: the Trainer has no logger (logger=False), so nothing the analysis callbacks measure is "
        "written: those attached by PDELIGHTNING_CALLBACKS (on_missing='warn') are switched off and run no probe; "
        "callbacks attached explicitly still run, their results only in their attributes. Give the Trainer a "
        "logger (e.g. CSVLogger or TensorBoardLogger) to record them.",
    )
    return True


def steps_aside_without_logger(callback: Any, trainer: L.Trainer) -> bool:
    """Whether ``callback`` switches off because the run has no logger: attached by the plugin (``on_missing="warn"``)
    and not acting on the run (``StabilityMonitor(action="stop")`` does). The run is told once either way.
    """
    if not no_logger(trainer):
        return False
    return getattr(callback, "on_missing", "raise") == "warn" and getattr(callback, "action", None) != "stop"


def skip_fit_setup(callback: Any, trainer: L.Trainer, stage: str) -> bool:
    """The start of a callback's ``setup``: ``True`` when it has nothing to set up, i.e. outside ``fit``, or the run
    has no logger and the callback steps aside (:func:`steps_aside_without_logger`; ``callback.disabled`` then says
    why). Otherwise warns once about an unverified strategy and returns ``False``.
    """
    if stage != "fit":
        return True
    if steps_aside_without_logger(callback, trainer):  # logger=False under the plugin: nothing to write to
        callback.disabled = "the Trainer has no logger (logger=False)"
        return True
    warn_unverified_strategy(trainer)
    return False
