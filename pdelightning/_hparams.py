"""Real ``hp_metric`` and hparams: the run's final validation metrics, written once at the end of ``fit``.

Lightning's ``TensorBoardLogger`` writes the hyperparameters at the start of training with the placeholder
``hp_metric = -1`` (``default_hp_metric=True``). Our configs set ``default_hp_metric: false`` and the CLI calls
:func:`log_final_hparams` at the end of ``fit`` (``on_fit_end``, before Lightning closes the loggers, so no second
event file is opened): ``hp_metric`` becomes the final ``val/acc`` (``val/loss`` when there is no
accuracy), and TensorBoard's HParams tab lists the hyperparameters beside ``hp_metric``, ``val/acc`` and ``val/loss``
(the last logged values of those tags).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from pdelightning.compat import logger_hparams, tensorboard_file_writer

__all__ = ["final_metrics", "log_final_hparams"]


def final_metrics(callback_metrics: dict[str, Any]) -> dict[str, float]:
    """``{"hp_metric": val/acc (else val/loss), "val/...": value}`` from the trainer's final metrics (``{}``: none).

    Example::

        >>> final_metrics({"val/acc": 0.95, "val/loss": 0.2, "train/loss": 0.1})
        {'hp_metric': 0.95, 'val/acc': 0.95, 'val/loss': 0.2}
    """
    val = {k: float(v) for k, v in sorted(callback_metrics.items()) if k.startswith("val/")}
    headline = val.get("val/acc", val.get("val/loss"))
    return {} if headline is None else {"hp_metric": headline, **val}


def log_final_hparams(trainer: Any) -> None:
    """Write ``hp_metric`` (at the last step) and the hparams with the final validation metrics (rank 0)."""
    metrics = final_metrics(dict(trainer.callback_metrics))
    if not trainer.is_global_zero or not metrics:
        return
    from torch.utils.tensorboard.summary import hparams

    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        logger.log_metrics({"hp_metric": metrics["hp_metric"]}, step=trainer.global_step)  # val/* are logged already
        writer = tensorboard_file_writer(logger)
        if writer is None:
            continue
        for summary in hparams(logger_hparams(logger), metrics):
            writer.add_summary(summary, trainer.global_step)
        logger.experiment.flush()
