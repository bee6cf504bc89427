"""Probing: one probe forward for every analysis callback due, on a fixed probe set, under a shared time budget.

- :mod:`~pdelightning.probing.protocol`: what the hub needs from a callback (:class:`ProbeClient`).
- :mod:`~pdelightning.probing.planner`: planning, pure and clock-injected: which callback is due when, the budget.
- :mod:`~pdelightning.probing.schedule`: the budget's arithmetic (:class:`BudgetSchedule`).
- :mod:`~pdelightning.probing.hub`: running: the shared forwards and the callbacks' steps (:class:`ProbeHub`).
- :mod:`~pdelightning.probing.session`: what a probe hands the callbacks (:class:`ProbeSession`, :class:`ProbeBatch`).
- :mod:`~pdelightning.probing.capture`: what one forward captures (:class:`Request`, :class:`Capture`).
- :mod:`~pdelightning.probing.guard`: a failing callback is switched off on every rank, training goes on.
- :mod:`~pdelightning.probing.probe_set`, :mod:`~pdelightning.probing.loaders`: the fixed probe samples.
- :mod:`~pdelightning.probing.store`: per-sample statistics gathered across ranks (:class:`GatherStore`).
- :mod:`~pdelightning.probing.figures`: figures drawn in a worker process.

The callbacks built on it are in :mod:`pdelightning.callbacks` (their base: :class:`~pdelightning.callbacks.
ProbeCallback`); nothing here imports them.
"""

from pdelightning.probing.capture import Capture, Captured, Request
from pdelightning.probing.figures import FigureWorker
from pdelightning.probing.guard import ON_ERROR, CallbackFailedWarning, GuardedCallback, agree
from pdelightning.probing.hub import ProbeHub
from pdelightning.probing.loaders import validation_loader
from pdelightning.probing.planner import DEFAULT_BUDGET, Moment, ProbePlanner, check_cadence, is_final
from pdelightning.probing.probe_set import DEFAULT_PROBE_SIZE, ProbeSet
from pdelightning.probing.protocol import Budgeted, Cadence, Guarded, ProbeClient
from pdelightning.probing.schedule import BudgetSchedule
from pdelightning.probing.session import MODEL, ProbeBatch, ProbeSession
from pdelightning.probing.store import GatherStore

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_PROBE_SIZE",
    "MODEL",
    "ON_ERROR",
    "BudgetSchedule",
    "Budgeted",
    "Cadence",
    "CallbackFailedWarning",
    "Capture",
    "Captured",
    "FigureWorker",
    "GatherStore",
    "Guarded",
    "GuardedCallback",
    "Moment",
    "ProbeBatch",
    "ProbeClient",
    "ProbeHub",
    "ProbePlanner",
    "ProbeSession",
    "ProbeSet",
    "Request",
    "agree",
    "check_cadence",
    "is_final",
    "validation_loader",
]
