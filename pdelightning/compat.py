"""Every read of a private Lightning attribute, in one place: each is a small named function that says what it reads,
the Lightning versions it was checked with, and what it does when the attribute is not there.
"""

from __future__ import annotations

from typing import Any

# --- probing ---


def fit_val_dataloader(trainer: Any) -> Any:
    """The validation loader given to ``trainer.fit(...)``, before the loops have loaded it (at ``setup``).

    Reads ``trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()`` (the ``_DataLoaderSource`` of the fit
    loop's validation loop). Checked with Lightning 2.6.6. Fallback: ``None`` when that attribute is missing or
    raises (the caller then looks elsewhere for data).
    """
    try:
        return trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
    except Exception:
        return None


def fit_train_dataloader(trainer: Any) -> Any:
    """The training loader given to ``trainer.fit(...)``, before the fit loop has loaded it (at ``setup``).

    Reads ``trainer.fit_loop._data_source.dataloader()``. Checked with Lightning 2.6.6. Fallback: ``None`` when that
    attribute is missing or raises.
    """
    try:
        return trainer.fit_loop._data_source.dataloader()
    except Exception:
        return None


def callback_state_key(callback: Any, **kwargs: Any) -> str:
    """The checkpoint key of ``callback`` made of its class name and ``kwargs``, as Lightning's own callbacks make it.

    Calls ``Callback._generate_state_key(**kwargs)`` (``f"{qualname}{kwargs!r}"``). Checked with Lightning 2.6.6.
    Fallback: the same string built here when the method is missing.
    """
    generate = getattr(callback, "_generate_state_key", None)
    if callable(generate):
        return str(generate(**kwargs))
    return f"{type(callback).__qualname__}{kwargs!r}"
