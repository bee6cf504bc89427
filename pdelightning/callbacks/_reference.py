"""Loading the reference model that AttentionSimilarity and InformationFlow compare against."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning.pytorch as L
from torch import nn


def import_object(path: str, arg: str = "reference_class") -> object:
    """Import ``package.module.Name``; a bad path raises ``ValueError`` naming ``arg`` and the path.

    Example::

        >>> import_object("torch.nn.Linear").__name__
        'Linear'
    """
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"{arg}={path!r} must be a dotted path such as 'pdelightning.task.ClassificationTask'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{arg}={path!r} cannot be imported: {err}") from err


def import_lightning_module_class(path: str) -> type[L.LightningModule]:
    """:func:`import_object`, checked to be a ``LightningModule`` subclass (it needs ``load_from_checkpoint``)."""
    cls = import_object(path)
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise ValueError(f"reference_class={path!r} is not a LightningModule subclass (it needs load_from_checkpoint)")
    return cls


def load_reference_checkpoint(path: str | Path, cls: type | None, hint: str) -> nn.Module:
    """Load the reference: ``cls.load_from_checkpoint(path)`` on the CPU (default ``cls``: ClassificationTask).

    Args:
        path: the checkpoint.
        cls: the ``LightningModule`` class that wrote it, or ``None``.
        hint: what to do instead when the checkpoint's hyperparameters cannot rebuild the model (a task built
            in Python rather than from a config), in the caller's argument names.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        TypeError: when ``load_from_checkpoint`` cannot rebuild the module, with ``hint``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference_checkpoint={str(path)!r} does not exist")
    if cls is None:
        from pdelightning.task import ClassificationTask

        cls = ClassificationTask
    try:
        return cls.load_from_checkpoint(str(path), map_location="cpu")  # type: ignore[attr-defined]
    except TypeError as err:
        raise TypeError(
            f"{cls.__name__}.load_from_checkpoint({str(path)!r}) failed ({err}). If the checkpoint comes from a task "
            f"built in Python (its hparams do not hold the model), {hint}; for another LightningModule give "
            "reference_class"
        ) from err
