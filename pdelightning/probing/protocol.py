"""What the probe hub needs from a callback: the probe protocol.

The hub (:mod:`pdelightning.probing.hub`) and its planner (:mod:`pdelightning.probing.planner`) talk to the
callbacks only through these protocols (structural types: a class implements them by having the members, without
deriving from them). :class:`~pdelightning.callbacks.ProbeCallback` implements :class:`ProbeClient`; a callback that
spends analysis time outside probes (GradientFlow's gradient reads) implements :class:`Budgeted`.

* :class:`Guarded`: the failure guard (:mod:`pdelightning.probing.guard`): what failed, and switching it off.
* :class:`Budgeted`: what the shared time budget reads (the budget and the closest spacing allowed).
* :class:`Cadence`: what the planner reads to decide whether a callback is due.
* :class:`ProbeClient`: all of that, plus what a probe asks of the callback (its probe set, what to capture, and the
  ``prepare``, ``begin``, ``consume``, ``finish`` steps).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import nn

    from pdelightning.adapters.base import ModelAdapter
    from pdelightning.models.protocol import AnalysisTargets
    from pdelightning.probing.capture import Request
    from pdelightning.probing.session import ProbeBatch, ProbeSession

__all__ = ["Budgeted", "Cadence", "Guarded", "ProbeClient"]


class Guarded(Protocol):
    """A callback whose failures the guard records and agrees on across ranks (:mod:`~pdelightning.probing.guard`)."""

    @property
    def failed(self) -> bool:
        """Whether it raised (recorded on this rank, or switched off after an agreement)."""
        ...

    @property
    def failure_pending(self) -> bool:
        """Whether a failure was recorded on this rank that the ranks have not agreed on yet."""
        ...

    def record_failure(self, err: BaseException, where: str, trainer: Any) -> bool:
        """Record ``err`` raised in ``where``; ``False`` when the caller must re-raise it."""
        ...

    def guarded(self, where: str, trainer: Any) -> AbstractContextManager[None]:
        """A block of its work whose failure is recorded (or re-raised)."""
        ...

    def switch_off(self, reporter_rank: int, this_rank: int) -> None:
        """Switch it off for the rest of the run (rank ``reporter_rank`` says why)."""
        ...


class Budgeted(Protocol):
    """What the shared time budget reads from whatever spends analysis time under it."""

    budget: float | None  # analysis time as a fraction of training time; None: fixed cadence only
    every_n_steps: int | None  # fixed cadence; with a budget, the closest spacing the budget may choose


class Cadence(Budgeted, Protocol):
    """What the planner reads to decide whether a callback probes at a given moment."""

    every_n_epochs: int | None
    probe_at_start: bool
    last_probe_step: int  # -1 before the first probe

    @property
    def active(self) -> bool:
        """Whether it takes part in probes (it did not step aside at setup)."""
        ...


class ProbeClient(Cadence, Guarded, Protocol):
    """What the hub needs from a probe callback (:class:`~pdelightning.callbacks.ProbeCallback` implements it)."""

    probe_size: int
    probe_batch_size: int
    seed: int

    @property
    def name(self) -> str:
        """Its name in metric keys and in the probe timings."""
        ...

    def probe_loader(self, trainer: Any) -> Any:
        """The ``DataLoader`` its probe set is drawn from (or ``None``)."""
        ...

    def resolved(self, pl_module: nn.Module) -> tuple[ModelAdapter | None, AnalysisTargets]:
        """``(adapter, targets)`` of the model under training."""
        ...

    def request(self) -> Request:
        """What it needs captured from the model's probe forward."""
        ...

    def extra_models(self, pl_module: nn.Module) -> dict[str, tuple[nn.Module, Request]]:
        """Other models to run on the same probe batches: ``{key: (module, request)}``."""
        ...

    def prepare(self, trainer: Any, pl_module: Any) -> None:
        """At the start of training, before the start probe (rank-local)."""
        ...

    def begin(self, session: ProbeSession) -> None:
        """Start of a probe (rank-local)."""
        ...

    def consume(self, pb: ProbeBatch) -> None:
        """One probe batch with the shared captures (rank-local)."""
        ...

    def finish(self, session: ProbeSession) -> None:
        """End of a probe: collectives, then rank-zero logging."""
        ...

    def mark_probed(self, step: int, final: bool) -> None:
        """Told by the hub after :meth:`finish` that it probed at ``step``."""
        ...
