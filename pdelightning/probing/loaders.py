"""Where a probe set comes from: the run's validation data, else its training data (read from the trainer)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from pdelightning.compat import fit_train_dataloader, fit_val_dataloader

__all__ = ["validation_loader"]


def validation_loader(trainer: L.Trainer) -> DataLoader | None:
    """The ``DataLoader`` the probe set is drawn from: the validation data (of the datamodule or the trainer),
    else, with a warning, the training data; ``None`` if there is neither.
    """
    dm = trainer.datamodule
    no_val = trainer.limit_val_batches == 0
    getters: list[Callable[[], Any]] = []
    if not no_val:
        getters = [
            lambda: dm.val_dataloader() if dm is not None else None,
            lambda: trainer.val_dataloaders,
            # loaders given to fit() are reachable before the loops load them (setup), only through the loop's source
            lambda: fit_val_dataloader(trainer),
        ]
    for get in getters:
        try:
            loader = get()
        except Exception:
            continue
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, DataLoader):
            return loader
    train = None
    train_getters: list[Callable[[], Any]] = [
        lambda: dm.train_dataloader() if dm is not None else None,
        lambda: trainer.train_dataloader,
        lambda: fit_train_dataloader(trainer),
    ]
    for get in train_getters:
        with contextlib.suppress(Exception):
            train = get()
        if isinstance(train, (list, tuple)):
            train = train[0] if train else None
        if isinstance(train, DataLoader):
            why = "limit_val_batches=0" if no_val else "no validation data"
            rank_zero_warn(f"pdelightning: {why}: the analysis probe set is drawn from the training data")
            return train
    return None
