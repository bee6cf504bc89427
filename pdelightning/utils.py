"""Small helpers shared by the task, the callbacks and the command line."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
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
