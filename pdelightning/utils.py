"""Small helpers shared by the task, the callbacks and the command line."""

from __future__ import annotations

import lightning.pytorch as L


class InputError(ValueError):
    """Something the user gave (a value, a config, a file) is wrong; the message names it and the fix.

    The command line prints these as one ``error:`` line without a traceback and exits with status 2.
    """


def should_log(trainer: L.Trainer | None) -> bool:
    """Whether the trainer writes logs on the current step (honours ``log_every_n_steps``).

    Each ``self.log`` call costs even when the logger writes nothing, so hot-path code asks first.
    Outside a trainer (a bare module call) it answers ``True``.
    """
    if trainer is None:
        return True
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except (AttributeError, NotImplementedError):
        return True
