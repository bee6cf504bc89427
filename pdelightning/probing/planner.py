"""Planning probes: which callback is due at which moment, and the time budget's decisions.

:class:`ProbePlanner` is pure: it reads no trainer and runs nothing. The hub (:mod:`pdelightning.probing.hub`)
describes each hook as a :class:`Moment` and passes the numbers it reads from the trainer (the run's total steps); the
planner takes its times from an injected clock (a ``Callable[[], float]``, ``time.perf_counter`` by default, as
Lightning's ``Throughput`` takes its times from outside), its warnings go to an injected ``warn``, and the one
decision the ranks must share (the next interior probe of the budget) is reduced by an ``agree`` function the hub
passes (the identity on one process). So it is tested with a fake clock and no Trainer.

**Cadence** (:meth:`ProbePlanner.is_due`): the start probe (step 0, and again at a resumed run's first step when its
checkpoint was taken right after a probe); a fixed ``every_n_steps`` / ``every_n_epochs`` cadence exactly as given;
or, in budget mode, the interior probes the shared :class:`~pdelightning.probing.schedule.BudgetSchedule` plans and
the last probe of training. The first plan is made five steps after training starts (a measured step time and the
start probe's cost are needed); each later plan after each budgeted probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pdelightning.probing.protocol import Budgeted, Cadence
from pdelightning.probing.schedule import BudgetSchedule

__all__ = ["DEFAULT_BUDGET", "PROBE_HOOKS", "Moment", "ProbePlanner", "check_cadence", "is_final"]

DEFAULT_BUDGET = 0.03
PROBE_HOOKS = ("start", "batch_end", "epoch_end", "train_end")
CALIBRATION_STEPS = 5  # the first budget plan waits this many steps for a measured step time

C = TypeVar("C", bound=Cadence)
Agree = Callable[[int | None], int | None]
Total = float | None | Callable[[], float | None]  # the run's total steps (None: unknown), or how to read them


def steps_of(total: Total) -> float | None:
    """The run's total steps: ``total`` itself, or read from it (read only when a decision needs it)."""
    return total() if callable(total) else total


def _same(value: int | None) -> int | None:
    return value


def _ignore(message: str) -> None:
    pass


@dataclass(frozen=True)
class Moment:
    """Everything a due decision reads at a hook: equal moments, equal decisions.

    The step alone is not enough: with gradient accumulation or manual optimisation several batches share a step, and
    only the epoch's last of them is due for an ``every_n_epochs`` cadence.

    Attributes:
        step: the global (optimizer) step.
        epoch: the current epoch.
        is_last_batch: whether this is the epoch's last batch.
        hook: one of :data:`PROBE_HOOKS`.
        final: whether a probe now is the last of training (see :func:`is_final`).
    """

    step: int
    epoch: int
    is_last_batch: bool
    hook: str
    final: bool = False


def is_final(hook: str, step: int, epoch: int, is_last_batch: bool, max_steps: Any, max_epochs: Any) -> bool:
    """Whether a probe at ``hook`` is the last of training (``max_steps`` reached, or the last batch or end of the
    last epoch; always at ``train_end``, never at ``start``).
    """
    steps_done = max_steps is not None and 0 < max_steps <= step
    last_epoch = max_epochs is not None and 0 < max_epochs <= epoch + 1
    if hook == "batch_end":
        return steps_done or (is_last_batch and last_epoch)
    if hook == "epoch_end":
        return last_epoch or steps_done
    return hook == "train_end"


def check_cadence(
    every_n_steps: int | None, every_n_epochs: int | None, budget: float | str | None, probe_at_start: bool
) -> float | None:
    """The budget a callback runs under (``"auto"``: :data:`DEFAULT_BUDGET` unless a fixed cadence is given).

    Raises:
        ValueError: for a non-positive cadence, a budget outside (0, 1), or no cadence at all.
    """
    for arg, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{arg}={value!r} must be a positive integer or None")
    if budget == "auto":
        budget = DEFAULT_BUDGET if every_n_steps is None and every_n_epochs is None else None
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < float(budget) < 1):
        raise ValueError(f"budget={budget!r} must be a fraction in (0, 1) (e.g. 0.03), 'auto' or None")
    if budget is None and every_n_steps is None and every_n_epochs is None and not probe_at_start:
        raise ValueError(
            "set budget, every_n_steps or every_n_epochs (or probe_at_start): this callback would never run"
        )
    return None if budget is None else float(budget)


class ProbePlanner:
    """When the callbacks of one trainer probe (see the module docstring).

    Args:
        clock: seconds from any fixed origin (``time.perf_counter`` by default; a fake clock in tests).
        warn: where the budget's advice goes (the hub passes ``rank_zero_warn``).

    Attributes:
        schedule: the shared budget schedule, or ``None`` while nothing is budgeted.
        checked: the last moment every callback was checked at (its other callbacks' hooks need not check again).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, warn: Callable[[str], None] = _ignore) -> None:
        self.clock = clock
        self.warn = warn
        self.schedule: BudgetSchedule | None = None
        self.checked: Moment | None = None
        self._t0: float | None = None
        self._wall_offset = 0.0
        self._calibrate_at: int | None = None
        self._started_at: int | None = None
        self._floor_warned = False

    # ---- the budget's inputs ---------------------------------------------------------------------------------
    def fold(self, spenders: Iterable[Budgeted]) -> None:
        """Fold the budgets of everything that spends analysis time into one schedule: the smallest budget, and the
        largest ``every_n_steps`` among the budgeted as the closest spacing.
        """
        budgeted = [c for c in spenders if c.budget is not None]
        if budgeted:
            budget = min(float(c.budget) for c in budgeted)  # type: ignore[arg-type]
            spacing = max((c.every_n_steps or 0 for c in budgeted), default=0) or None
            if self.schedule is None:
                self.schedule = BudgetSchedule(budget, spacing)
            else:
                self.schedule.budget, self.schedule.min_spacing = budget, spacing

    def start_clock(self, step: int) -> None:
        """Start timing training at ``step`` (once per fit), continuing a restored schedule's clock."""
        if self._t0 is None:
            self._t0 = self.clock()
            if self.schedule is not None:
                self._wall_offset = self.schedule.train_seconds + self.schedule.spent
                if step == 0:
                    self.schedule.start_step = 0
                self._calibrate_at = step + CALIBRATION_STEPS

    def wall(self) -> float:
        """Wall seconds of this fit, plus those of the run it resumed."""
        return self._wall_offset + (self.clock() - self._t0 if self._t0 is not None else 0.0)

    def add(self, seconds: float) -> None:
        """Account analysis work done outside a probe."""
        if self.schedule is not None:
            self.schedule.add(seconds)

    # ---- who is due --------------------------------------------------------------------------------------------
    def start_once(self, step: int) -> bool:
        """``True`` the first time it is asked at ``step``: every callback's ``on_train_start`` asks, one probes."""
        if self._started_at == step:
            return False
        self._started_at = step
        return True

    def is_due(self, c: Cadence, m: Moment, total: Total = None, agree: Agree = _same) -> bool:
        """Whether callback ``c`` probes at moment ``m`` (``total``: the run's steps, ``None`` when unknown)."""
        if m.hook == "start":
            # a run resumed from a checkpoint taken right after a probe logs that probe again: the log purge on
            # resume removed everything at the checkpoint's step (what the killed run's next batch had logged too)
            return (c.probe_at_start and m.step == 0) or (m.step > 0 and c.last_probe_step == m.step)
        if c.budget is not None:
            if m.hook == "train_end":
                return c.last_probe_step != m.step
            return m.final or (m.hook == "batch_end" and self.budget_due(m.step, total, agree))
        epoch_hit = bool(c.every_n_epochs) and (m.epoch + 1) % c.every_n_epochs == 0  # type: ignore[operator]
        if m.hook == "batch_end":
            step_hit = bool(c.every_n_steps) and m.step % c.every_n_steps == 0  # type: ignore[operator]
            return step_hit or (epoch_hit and m.is_last_batch)
        return m.hook == "epoch_end" and epoch_hit

    def due(self, callbacks: Sequence[C], m: Moment, total: Total = None, agree: Agree = _same) -> list[C]:
        """The active callbacks of ``callbacks`` due at ``m``, in order (one probe per step: a callback that probed
        at this step is not due again, except for the start probe).
        """
        due = [c for c in callbacks if c.active and (c.last_probe_step != m.step or m.hook == "start")]
        return [c for c in due if self.is_due(c, m, total, agree)]

    def budget_due(self, step: int, total: Total = None, agree: Agree = _same) -> bool:
        """Whether the shared budget schedule has an interior probe at ``step`` (making the first plan when due)."""
        if self.schedule is None:
            return False
        self._calibrate(step, total, agree)
        return self.schedule.due(step)

    def gradient_read_due(self, step: int, total: Total = None, agree: Agree = _same) -> bool:
        """For reads in budget mode (GradientFlow): the first step, the last, and the step that leads to a probe."""
        sched = self.schedule
        if sched is None:
            return False
        self._calibrate(step, total, agree)
        nxt, n = step + 1, steps_of(total)
        last = n is not None and nxt >= n
        return step == 0 or last or (sched.next_step is not None and nxt >= sched.next_step)

    # ---- the budget's decisions --------------------------------------------------------------------------------
    def plan(self, step: int, total: Total = None, agree: Agree = _same) -> int | None:
        """Plan the next interior probe after ``step`` (every rank follows ``agree``'s plan) and advise once when
        the budget gives too few probes; returns the planned step (``None``: only the final probe remains).
        """
        sched = self.schedule
        assert sched is not None
        sched.tick(self.wall())
        n = steps_of(total)
        sched.next_step = agree(sched.plan(step, n))
        floor = sched.floor_fraction(step, n)
        few = None if self._floor_warned else sched.few_probes_message(step, n)
        if not self._floor_warned and floor is not None and floor > sched.budget:
            self._floor_warned = True
            self.warn(
                f"analysis budget {sched.budget:.0%}: the probes at the start and the end of training alone will cost "
                f"about {floor:.0%} of this run ({sched.last_cost:.2f} s per probe); the run gets only those two. "
                "Attach fewer callbacks, lower their max_samples, or train longer to keep within the budget. "
                + (sched.cadence_advice(step, n) or "")
            )
        elif few is not None:
            self._floor_warned = True  # one message per run about too few probes
            self.warn(few)
        return sched.next_step

    def _calibrate(self, step: int, total: Total, agree: Agree) -> None:
        sched = self.schedule
        assert sched is not None
        if self._calibrate_at is not None and step >= self._calibrate_at and sched.last_cost is not None:
            self._calibrate_at = None
            if sched.next_step is None:
                self.plan(step, total, agree)  # the first plan needs a measured step time; every rank reaches this

    def after_probe(
        self, step: int, cost: float, final: bool, budgeted: bool, total: Total = None, agree: Agree = _same
    ) -> None:
        """Account a probe of ``cost`` seconds at ``step`` (``budgeted``: a callback in budget mode took part) and
        plan the next one (a probe repeated at the same step after a resume is not counted again).
        """
        sched = self.schedule
        if sched is None or not budgeted or (sched.steps and sched.steps[-1] == step):
            return
        sched.record_probe(step, cost)
        if not final:
            self.plan(step, total, agree)
        else:
            sched.tick(self.wall())

    def after_read(
        self, step: int, seconds: float, probes_budgeted: bool, total: Total = None, agree: Agree = _same
    ) -> None:
        """Account a read outside probes. With budgeted probe callbacks (``probes_budgeted``) it only adds to the time
        spent; without, the reads drive the schedule themselves, as probes do.
        """
        sched = self.schedule
        if sched is None:
            return
        if probes_budgeted:
            sched.add(seconds)
            return
        sched.record_probe(step, seconds)
        n = steps_of(total)
        if n is not None and step + 1 >= n:
            sched.tick(self.wall())
            return
        if sched.step_time(step) is not None:
            self.plan(step, n, agree)

    def overhead(self, step: int) -> float | None:
        """Analysis seconds over training seconds so far (``None`` before any training or without a budget)."""
        if self.schedule is None:
            return None
        self.schedule.tick(self.wall())
        fraction = self.schedule.fraction()
        return fraction if step > self.schedule.start_step and fraction == fraction else None

    # ---- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (tiny)."""
        return {"schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule."""
        if self.schedule is not None and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])
