"""When an analysis callback itself fails: caught, reported once, switched off on every rank; training goes on.

Every analysis callback derives from :class:`GuardedCallback`. With ``on_error="warn"`` (what the
``PDELIGHTNING_CALLBACKS`` plugin sets) an exception raised by the callback is caught, reported once by a
:class:`CallbackFailedWarning` (the callback, the model family, the error with its last frame, how to report it),
and the callback is switched off for the rest of the run. With ``on_error="raise"`` (the default of a callback
attached by hand) the exception propagates as before.

**Where failures are caught.** In two places, both outside the callbacks' own code:

* every Lightning hook a guarded callback defines (:data:`HOOKS`, wrapped once per class by
  ``__init_subclass__``, so a subclass's override is covered without a ``try`` of its own; a hook that calls
  ``super()`` is guarded once, by the outermost call);
* the probe hub's run loop (:mod:`pdelightning.probing.hub`), per callback around ``request``, ``extra_models``,
  ``begin``, ``consume`` and ``finish``, and around the shared probe forward (its failure is charged to every
  callback of that forward).

**Agreement across ranks.** Under DDP a failure may happen on one rank only, and a callback switched off on one
rank but not on the others would leave a collective waiting. So a failure is only *recorded* where it happens;
the callback keeps its place (its hooks still run, guarded, and a recorded failure skips its probe work) until
:func:`agree`, at a point every rank reaches with the same callbacks in the same order, reduces the ranks'
failure flags in one ``all_reduce`` (``max``) and switches off, on every rank together, each callback that failed
anywhere. The lowest failing rank reports it. The agreement points are:

* the end of ``setup`` (stage ``fit``) of each guarded callback;
* in each probe, after the local work of every callback due (the forwards, ``begin``, ``consume``: no collectives)
  and *before* any ``finish`` (where the collectives are): a callback that failed in its local work on any rank is
  switched off before any collective of that probe, so no rank waits on a gather another rank skipped;
* after every ``finish`` of the probe (a rank-zero failure in logging switches the callback off everywhere);
* outside probes, before the collective of a hook that has one: GradientFlow's read steps, StabilityMonitor's
  loss checks (their rank-local part runs in :meth:`GuardedCallback.guarded`, then :func:`agree`, then the
  collective).

The one case no guard can repair is a rank that raises *between* collectives of code every rank runs (e.g. in
``finish`` before its gather, while another rank is in the gather): ``finish`` therefore does only rank-independent
work before its collectives (the same computation on the same gathered values and the same weights), and its
rank-zero work (logging, figures) after them. On one process the agreement is immediate and costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback

from pdelightning._checks import check_choice
from pdelightning.probing.protocol import Guarded

__all__ = ["HOOKS", "ON_ERROR", "CallbackFailedWarning", "GuardedCallback", "agree", "fail_all"]

ON_ERROR = ("raise", "warn")
_NOT_GUARDED = ("on_save_checkpoint", "on_load_checkpoint")
HOOKS = frozenset(
    n for n in vars(Callback) if (n.startswith("on_") or n in ("setup", "teardown")) and n not in _NOT_GUARDED
)
"""The Lightning hooks the guard wraps (checkpoint hooks are left alone: a failed restore must not pass silently)."""
_CLEANUP = frozenset({"teardown", "on_exception"})  # run (guarded) even after the callback was switched off
_OWNER = "_pdelightning_guard_owner"  # set on an error re-raised by a callback's guard: other guards let it pass
_LET_THROUGH = object()
_MESSAGE_CHARS = 300


class CallbackFailedWarning(UserWarning):
    """An analysis callback raised and was switched off for the rest of the run (``on_error="warn"``)."""


@dataclass
class _Failure:
    where: str
    error: str  # "TypeName: message"
    frame: str  # "file:line in function" of the innermost frame


def _describe(err: BaseException, where: str) -> _Failure:
    message = " ".join(str(err).split())
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 3] + "..."
    frames = traceback.extract_tb(err.__traceback__)
    frame = "unknown"
    if frames:
        last = frames[-1]
        parts = Path(last.filename).parts
        keep = next((i for i, p in enumerate(parts) if p in ("pdelightning", "site-packages")), None)
        name = "/".join(parts[keep + (parts[keep] == "site-packages") :]) if keep is not None else last.filename
        frame = f"{name}:{last.lineno} in {last.name}"
    return _Failure(where, f"{type(err).__name__}: {message}" if message else type(err).__name__, frame)


class GuardedCallback(Callback):
    """A callback whose hooks are guarded (see the module docstring); ``on_error`` chooses what a failure does.

    Subclasses call :meth:`init_guard` in ``__init__`` and may override :meth:`guard_context` to name the model
    family in the report.
    """

    on_error: str = "raise"
    _failure: _Failure | None = None
    _errored: bool = False
    _guard_depth: int = 0
    disabled: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in HOOKS & set(vars(cls)):
            fn = vars(cls)[name]
            if callable(fn) and not getattr(fn, "_guarded", False):
                setattr(cls, name, _guard_hook(name, fn))

    def init_guard(self, on_error: str) -> None:
        """Check and store ``on_error`` (``"raise"`` or ``"warn"``)."""
        check_choice("on_error", on_error, ON_ERROR)
        self.on_error = on_error

    @property
    def failed(self) -> bool:
        """Whether this callback raised (recorded on this rank, or switched off after an agreement)."""
        return self._failure is not None or self._errored

    @property
    def failure_pending(self) -> bool:
        """Whether a failure was recorded on this rank and the ranks have not agreed on it yet (see :func:`agree`)."""
        return self._failure is not None and not self._errored

    def guard_context(self) -> str:
        """What the report says about the model (the adapter family, the model class), or ``""``."""
        return ""

    def record_failure(self, err: BaseException, where: str, trainer: L.Trainer | None) -> bool:
        """Record ``err`` raised in ``where``; ``False`` when the caller must re-raise it (``on_error="raise"``, or
        an error another callback's guard already re-raised). On one process the callback is switched off at once.
        """
        owner = getattr(err, _OWNER, None)
        if owner is not None and owner is not self:  # another guard's error, or one let through
            return False
        if self.on_error == "raise":
            with contextlib.suppress(Exception):
                setattr(err, _OWNER, self)
            return False
        if self._failure is None and not self._errored:
            self._failure = _describe(err, where)
        if _world(trainer) <= 1:
            self.switch_off(reporter_rank=0, this_rank=0)
        return True

    @staticmethod
    def let_through(err: BaseException) -> None:
        """Mark ``err`` to propagate past every guard (e.g. ``TargetNotFoundError`` under ``on_missing="raise"``)."""
        with contextlib.suppress(Exception):
            setattr(err, _OWNER, _LET_THROUGH)

    @contextlib.contextmanager
    def guarded(self, where: str, trainer: L.Trainer | None) -> Iterator[None]:
        """Run a block of this callback's work; a failure in it is recorded (``on_error="warn"``) or re-raised."""
        try:
            yield
        except Exception as err:
            if not self.record_failure(err, where, trainer):
                raise

    def switch_off(self, reporter_rank: int, this_rank: int) -> None:
        """Switch this callback off for the rest of the run; rank ``reporter_rank`` warns (once) with the failure."""
        if self._errored:
            return
        failure = self._failure
        self._errored = True
        self.disabled = self.disabled or f"failed in {failure.where if failure else 'another rank'}"
        if reporter_rank != this_rank or failure is None:
            return
        name = type(self).__name__
        context = self.guard_context()
        rank = f" on rank {this_rank}" if this_rank else ""
        warnings.warn(
            f"pdelightning: {name} failed in {failure.where}{rank}"
            + (f" ({context})" if context else "")
            + f": {failure.error} [at {failure.frame}]. {name} is switched off for the rest of this run (on every "
            "rank); training goes on.\n"
            f"How to report it: open an issue on pdelightning with this message, your model's class and the "
            f"library versions; attach {name}(on_error='raise') yourself to get the full traceback.",
            CallbackFailedWarning,
            stacklevel=2,
        )


def agree(trainer: L.Trainer, callbacks: Sequence[Guarded]) -> None:
    """Switch off, on every rank, each of ``callbacks`` that failed on any rank (see the module docstring).

    Every rank must call this at the same point with the same callbacks in the same order (one ``all_reduce``
    under DDP, none on one process); the lowest rank that failed reports the failure.
    """
    callbacks = list(callbacks)
    if not callbacks:
        return
    world, rank = trainer.world_size, trainer.global_rank
    flags = [c.failure_pending for c in callbacks]
    if world <= 1:
        first = [0 if f else None for f in flags]
    else:
        # the lowest failing rank r is the highest (world - r); 0: failed nowhere
        t = torch.tensor([float(world - rank) if f else 0.0 for f in flags], device=trainer.strategy.root_device)
        t = trainer.strategy.reduce(t, reduce_op="max")
        first = [None if v <= 0 else world - round(v) for v in t.tolist()]
    for c, r in zip(callbacks, first, strict=True):
        if r is not None:
            c.switch_off(reporter_rank=r, this_rank=rank)


def fail_all(callbacks: Sequence[Guarded], err: BaseException, where: str, trainer: L.Trainer) -> None:
    """Charge ``err`` (raised by work the ``callbacks`` share, e.g. the probe forward) to each of them; re-raise it
    if any of them has ``on_error="raise"``.
    """
    handled = [c.record_failure(err, where, trainer) for c in callbacks]
    if not all(handled):
        raise err


def _guard_hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def hook(self: GuardedCallback, trainer: L.Trainer, *args: Any, **kwargs: Any) -> Any:
        if self._guard_depth:  # called through super() from a guarded hook: that one guards
            return fn(self, trainer, *args, **kwargs)
        if self._errored and name not in _CLEANUP:
            return None
        self._guard_depth += 1
        try:
            return fn(self, trainer, *args, **kwargs)
        except Exception as err:
            if not self.record_failure(err, name, trainer):
                raise
            return None
        finally:
            self._guard_depth -= 1
            if name == "setup" and _stage(args, kwargs) == "fit" and _world(trainer) > 1:
                agree(trainer, [self])

    hook._guarded = True  # type: ignore[attr-defined]
    return hook


def _stage(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs.get("stage", args[1] if len(args) > 1 else None)


def _world(trainer: L.Trainer | None) -> int:
    """The number of processes (1 without a trainer, e.g. a hook called by hand)."""
    return int(getattr(trainer, "world_size", 1) or 1)
