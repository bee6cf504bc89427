"""Small helpers shared by the task, the callbacks and the command line."""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from pdelightning.compat import should_update_logs

_WARNED: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()


class InputError(ValueError):
    """Something the user gave (a value, a config, a file) is wrong; the message names it and the fix.

    The command line prints these as one ``error:`` line without a traceback and exits with status 2.
    """


def warn_once(owner: object, key: str, message: str, say: Callable[[str], Any] = rank_zero_warn) -> None:
    """Warn ``message`` (rank zero) the first time ``owner`` (e.g. a callback) says something about ``key``; ``say``
    (e.g. ``rank_zero_info``) for a notice rather than a warning.

    Example::

        >>> import warnings
        >>> class Owner: ...
        >>> owner = Owner()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     for _ in range(3):
        ...         warn_once(owner, "W_O", "no W^O found")
        >>> len(caught)
        1
    """
    try:
        said = _WARNED.setdefault(owner, set())
    except TypeError:  # not weak-referenceable: say it every time rather than never
        said = set()
    if key not in said:
        said.add(key)
        say(message)


def should_log(trainer: L.Trainer | None) -> bool:
    """Whether the trainer writes logs on the current step (honours ``log_every_n_steps``).

    Each ``self.log`` call costs even when the logger writes nothing, so hot-path code asks first.
    Outside a trainer (a bare module call) it answers ``True``.
    """
    if trainer is None:
        return True
    return should_update_logs(trainer)


def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), numpy and Python, as plain checkpointable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
