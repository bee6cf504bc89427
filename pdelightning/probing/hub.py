"""One probe forward for every callback: the hub that schedules probes, runs them once, and shares the captures.

Every :class:`~pdelightning.callbacks._probe.ProbeCallback` attached to a trainer registers with that trainer's
:class:`ProbeHub`. When a callback's hook fires, the hub collects every callback due at this step, and runs ONE
pass over the fixed probe set: per probe batch, one forward of the model with the union of the hooks they asked for
(:class:`~pdelightning.probing.capture.Request`), one forward of each distinct reference or null model, and hands
every callback the same :class:`ProbeBatch`. Callbacks then finish (collectives, logging) in turn. A callback alone
works the same way, with a hub of one.

**Failures.** A probe has a rank-local part (the shared forwards, each callback's ``request``, ``begin`` and
``consume``: no collectives) and a collective part (each callback's ``finish``: its gathers first, then rank-zero
logging). A callback that raises in either (``on_error="warn"``) is recorded as failed and skips the rest of the
probe; between the two parts, and again after the last ``finish``, the ranks agree in one ``all_reduce`` which
callbacks failed anywhere and switch those off on every rank together
(:func:`~pdelightning.probing.guard.agree`). A callback that failed in its local part on one rank is thus switched
off before any collective of the probe, on every rank: no rank waits on a gather another rank skipped. The design,
and the one case it cannot repair, are in :mod:`pdelightning.probing.guard`.

The hub also keeps the time budget (:class:`~pdelightning.probing.schedule.BudgetSchedule`) shared by all callbacks
in budget mode, measures what each probe costs, logs ``analysis/overhead/fraction`` (analysis seconds over training
seconds so far) and ``analysis/overhead/probe_seconds``, and sends figures to the figure worker process when a probe
is over.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from pdelightning.adapters.base import ModelAdapter
from pdelightning.adapters.registry import resolve
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.probing.capture import Request
from pdelightning.probing.figures import FigureWorker
from pdelightning.probing.guard import agree, fail_all
from pdelightning.probing.probe_set import ProbeSet, probe_set_of
from pdelightning.probing.schedule import BudgetSchedule
from pdelightning.probing.session import MODEL, ProbeBatch, ProbeSession, forward_batch

__all__ = ["MODEL", "ProbeBatch", "ProbeHub", "ProbeSession"]

if TYPE_CHECKING:
    from pdelightning.callbacks._probe import ProbeCallback

_NONE = 2**62  # "no interior probe planned", for reductions (max wins: the most conservative plan)


class ProbeHub:
    """The probes of one trainer (see the module docstring). Get it with :meth:`of`."""

    _hubs: ClassVar[weakref.WeakKeyDictionary[Any, ProbeHub]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.callbacks: list[ProbeCallback] = []
        self.readers: list[Any] = []
        self.figures = FigureWorker()
        self.schedule: BudgetSchedule | None = None
        self._probe_sets: dict[tuple[int, int, int, int, int], ProbeSet] = {}
        self._t0: float | None = None
        self._wall_offset = 0.0
        self._calibrate_at: int | None = None
        self._started_at: int | None = None
        self._floor_warned = False
        self._total: tuple[float | None] | None = None  # the run's total steps, read once per fit
        self.checked: tuple[Any, ...] | None = None  # the last moment (see check_key) every callback was checked at
        self._extra: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Any]] = weakref.WeakKeyDictionary()
        self.last_timings: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    @classmethod
    def of(cls, trainer: L.Trainer) -> ProbeHub:
        """The hub of ``trainer`` (created on first use)."""
        hub = cls._hubs.get(trainer)
        if hub is None:
            hub = cls._hubs[trainer] = cls()
        return hub

    def attach(self, callback: ProbeCallback) -> None:
        """Register a probe callback (idempotent) and fold its budget into the shared schedule."""
        if callback not in self.callbacks:
            self.callbacks.append(callback)
        self._fold_budgets()

    def attach_reader(self, reader: Any) -> None:
        """Register analysis that is not a probe (GradientFlow's reads) with the shared budget."""
        if reader not in self.readers:
            self.readers.append(reader)
        self._fold_budgets()

    def record_read(self, trainer: L.Trainer, seconds: float) -> None:
        """Account one read (every rank calls this at the same steps). Without budgeted probe callbacks, reads
        drive the schedule themselves (as probes do); otherwise they only add to the time spent.
        """
        if self.schedule is None:
            return
        if any(c.budget is not None and c.active for c in self.callbacks):
            self.schedule.add(seconds)
            return
        self.schedule.record_probe(trainer.global_step, seconds)
        total = self.total_steps(trainer)
        if total is not None and trainer.global_step + 1 >= total:
            self.schedule.tick(self.wall())
            return
        if self.schedule.step_time(trainer.global_step) is not None:
            self._plan(trainer)

    def _fold_budgets(self) -> None:
        budgeted = [c for c in [*self.callbacks, *self.readers] if c.budget is not None]
        if budgeted:
            budget = min(float(c.budget) for c in budgeted)  # type: ignore[arg-type]
            spacing = max((c.every_n_steps or 0 for c in budgeted), default=0) or None
            if self.schedule is None:
                self.schedule = BudgetSchedule(budget, spacing)
            else:
                self.schedule.budget, self.schedule.min_spacing = budget, spacing

    # ---- time ------------------------------------------------------------------------------------------------
    def start_clock(self, trainer: L.Trainer) -> None:
        """Start timing training (once per fit), continuing a restored schedule's clock."""
        self._total = None  # read again at each fit's start: max_steps or the data may have changed
        if self._t0 is None:
            self._t0 = time.perf_counter()
            if self.schedule is not None:
                self._wall_offset = self.schedule.train_seconds + self.schedule.spent
                if trainer.global_step == 0:
                    self.schedule.start_step = 0
                self._calibrate_at = trainer.global_step + 5

    def wall(self) -> float:
        """Wall seconds of this fit, plus those of the run it resumed."""
        return self._wall_offset + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def add_analysis_time(self, seconds: float) -> None:
        """Account analysis work done outside a probe (e.g. GradientFlow's gradient reads)."""
        if self.schedule is not None:
            self.schedule.add(seconds)

    # ---- scheduling ----------------------------------------------------------------------------------------------
    def total_steps(self, trainer: L.Trainer) -> float | None:
        """The run's total optimizer steps, or ``None`` when unknown (read once per fit: it is asked every step)."""
        if self._total is None:
            try:
                total: float | None = float(trainer.estimated_stepping_batches)
            except Exception:
                total = None
            self._total = (total if total is not None and total > 0 else None,)
        return self._total[0]

    def _agree(self, trainer: L.Trainer, value: int | None) -> int | None:
        """The plan every rank follows: the latest (most conservative) of the ranks' plans."""
        if trainer.world_size <= 1:
            return value
        t = torch.tensor([float(_NONE if value is None else value)], device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(t, reduce_op="max").item())
        return None if agreed >= _NONE else agreed

    def _plan(self, trainer: L.Trainer) -> None:
        sched = self.schedule
        assert sched is not None
        sched.tick(self.wall())
        total = self.total_steps(trainer)
        sched.next_step = self._agree(trainer, sched.plan(trainer.global_step, total))
        floor = sched.floor_fraction(trainer.global_step, total)
        few = None if self._floor_warned else sched.few_probes_message(trainer.global_step, total)
        if not self._floor_warned and floor is not None and floor > sched.budget:
            self._floor_warned = True
            rank_zero_warn(
                f"analysis budget {sched.budget:.0%}: the probes at the start and the end of training alone will cost "
                f"about {floor:.0%} of this run ({sched.last_cost:.2f} s per probe); the run gets only those two. "
                "Attach fewer callbacks, lower their max_samples, or train longer to keep within the budget. "
                + (sched.cadence_advice(trainer.global_step, total) or "")
            )
        elif few is not None:
            self._floor_warned = True  # one message per run about too few probes
            rank_zero_warn(few)

    def _calibrate(self, trainer: L.Trainer) -> None:
        sched = self.schedule
        assert sched is not None
        if self._calibrate_at is not None and trainer.global_step >= self._calibrate_at and sched.last_cost is not None:
            self._calibrate_at = None
            if sched.next_step is None:
                self._plan(trainer)  # the first plan needs a measured step time; every rank reaches this step

    def budget_due(self, trainer: L.Trainer) -> bool:
        """Whether the shared budget schedule has an interior probe at this step."""
        if self.schedule is None:
            return False
        self._calibrate(trainer)
        return self.schedule.due(trainer.global_step)

    def gradient_read_due(self, trainer: L.Trainer) -> bool:
        """For GradientFlow in budget mode: read the gradients of the step that leads to a probe (and the first)."""
        sched = self.schedule
        if sched is None:
            return False
        self._calibrate(trainer)
        nxt = trainer.global_step + 1
        total = self.total_steps(trainer)
        last = total is not None and nxt >= total
        return trainer.global_step == 0 or last or (sched.next_step is not None and nxt >= sched.next_step)

    # ---- running -----------------------------------------------------------------------------------------------
    def step(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str, final: bool = False) -> None:
        """Run one probe for every callback due at this hook and step (idempotent per step)."""
        if trainer.sanity_checking:
            return
        if hook == "start":
            if self._started_at == trainer.global_step:
                return  # every callback's on_train_start calls this; the start probe runs once
            self._started_at = trainer.global_step
            self.prepare(trainer, pl_module)
        due = [c for c in self.callbacks if c.active and (c.last_probe_step != trainer.global_step or hook == "start")]
        due = [c for c in due if c.is_due(trainer, hook, final)]
        if due:
            self.run(trainer, pl_module, due, final)
        # every callback calls this from its own hook; all of them were just checked, so the others need not be
        self.checked = None if hook == "start" else self.check_key(trainer, hook, final)

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every callback's :meth:`~pdelightning.callbacks._probe.ProbeCallback.prepare`, before the start probe.

        The start probe runs at the first probe callback's ``on_train_start``, before the later callbacks' own
        ``on_train_start``: what a callback needs from the start of training (AttentionSimilarity's copy of the
        model) is taken here, for all of them, whatever their order in the trainer's list. Rank-local (its time is
        analysis time); the ranks then agree who failed, before the probe's first collective.
        """
        t0 = time.perf_counter()
        ready = [c for c in self.callbacks if c.active]
        for c in ready:
            with c.guarded("prepare", trainer):
                c.prepare(trainer, pl_module)
        self.add_analysis_time(time.perf_counter() - t0)
        agree(trainer, ready)

    @staticmethod
    def check_key(trainer: L.Trainer, hook: str, final: bool) -> tuple[Any, ...]:
        """Everything a callback's due decision reads from the trainer at ``hook``: equal keys, equal decisions.

        The step alone is not enough: with gradient accumulation or manual optimisation several batches share a
        step, and only the epoch's last of them is due for an ``every_n_epochs`` cadence.
        """
        return trainer.global_step, trainer.current_epoch, bool(trainer.is_last_batch), hook, final

    def probe_set(self, trainer: L.Trainer, callback: ProbeCallback) -> ProbeSet:
        """The probe set of ``callback``'s spec (shared by callbacks with the same size, batch size and seed)."""
        key = (callback.probe_size, callback.probe_batch_size, callback.seed, trainer.global_rank, trainer.world_size)
        if key not in self._probe_sets:
            loader = callback.probe_loader(trainer)
            self._probe_sets[key] = probe_set_of(
                trainer, loader, callback.probe_size, callback.probe_batch_size, callback.seed
            )
        return self._probe_sets[key]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, due: list[ProbeCallback], final: bool) -> None:
        """One probe of the callbacks ``due``: shared forwards per probe-set group, then each callback finishes."""
        t0 = time.perf_counter()
        step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        timings: dict[str, float] = {"forward": 0.0}
        try:
            groups: dict[tuple[int, int, int], list[ProbeCallback]] = {}
            for c in due:
                groups.setdefault((c.probe_size, c.probe_batch_size, c.seed), []).append(c)
            sessions = [(m, self._run_group(trainer, pl_module, m, final, step, timings)) for m in groups.values()]
            agree(trainer, due)  # every rank, before any collective of this probe (see probing/guard.py)
            for members, session in sessions:
                self._finish(members, session, timings)
            agree(trainer, due)
        finally:
            pl_module.train(was_training)
            self.figures.release()  # drawn in the worker process from now on, not competing with the probe
        cost = time.perf_counter() - t0
        self.last_timings = timings | {"total": cost}
        budgeted = any(c.budget is not None for c in due)
        repeat = bool(self.schedule is not None and self.schedule.steps and self.schedule.steps[-1] == step)
        if self.schedule is not None and budgeted and not repeat:
            self.schedule.record_probe(step, cost)
            if not final:
                self._plan(trainer)
            else:
                self.schedule.tick(self.wall())
        self._log_overhead(trainer, step, cost)

    def _models(
        self, trainer: L.Trainer, pl_module: L.LightningModule, due: list[ProbeCallback]
    ) -> dict[str, tuple[nn.Module, Request]]:
        models: dict[str, tuple[nn.Module, Request]] = {MODEL: (pl_module, Request())}
        for c in due:
            with c.guarded("request", trainer):
                wants, extras = c.request(), c.extra_models(pl_module)
            if c.failed:
                continue
            module, req = models[MODEL]
            models[MODEL] = (module, req | wants)
            for key, (extra, extra_req) in extras.items():
                have = models.get(key)
                models[key] = (extra, extra_req if have is None else have[1] | extra_req)
        return models

    def _resolve_extra(self, module: nn.Module, device: torch.device) -> tuple[Any, Any]:
        """A reference or null model on ``device`` in eval mode, and its targets (resolved once per model)."""
        if any(t.device != device for t in (*module.parameters(), *module.buffers())):
            module.to(device)
            self._extra.pop(module, None)
        module.eval()
        if module not in self._extra:
            self._extra[module] = resolve(module, need=())
        return self._extra[module]

    def _run_group(
        self, trainer: L.Trainer, pl_module: L.LightningModule, members: list[ProbeCallback], final: bool, step: int,
        timings: dict[str, float],
    ) -> ProbeSession | None:  # fmt: skip
        """The rank-local part of a probe (no collectives): the shared forwards, ``begin`` and ``consume``.

        A callback that raises is recorded as failed and skipped for the rest of the probe; a failure of the shared
        forward is charged to every member (see :mod:`pdelightning.probing.guard`).
        """
        try:
            probe = self.probe_set(trainer, members[0])
            models = self._models(trainer, pl_module, members)
            device = pl_module.device
            targets: dict[str, AnalysisTargets] = {}
            adapters: dict[str, ModelAdapter | None] = {}
            for key, (module, _) in models.items():
                if key == MODEL:
                    adapters[key], targets[key] = members[0].resolved(pl_module)
                else:
                    adapters[key], targets[key] = self._resolve_extra(module, device)
        except Exception as err:
            fail_all([c for c in members if not c.failed], err, "the probe set up", trainer)
            return None
        session = ProbeSession(
            trainer, pl_module, step, final, targets, adapters, {k: m for k, (m, _) in models.items()}, probe.size,
            self.figures, timings, probe.partner, probe.rank, probe.figure_position,
        )  # fmt: skip
        for c in members:
            if not c.failed:
                with c.guarded("begin", trainer):
                    c.begin(session)
        with torch.no_grad():
            for raw, index in probe:
                ok = [c for c in members if not c.failed]
                if not ok:
                    break
                t = time.perf_counter()
                try:
                    pb = forward_batch(session, models, raw, index)
                except Exception as err:
                    fail_all(ok, err, "the probe forward", trainer)
                    break
                timings["forward"] += time.perf_counter() - t
                for c in ok:
                    t = time.perf_counter()
                    with c.guarded("consume", trainer):
                        c.consume(pb)
                    timings[c.name] = timings.get(c.name, 0.0) + time.perf_counter() - t
                del pb
        return session

    def _finish(self, members: list[ProbeCallback], session: ProbeSession | None, timings: dict[str, float]) -> None:
        """Each member's ``finish`` (collectives, then rank-zero logging), after the ranks agreed who failed."""
        for c in members:
            if c.failed or session is None:
                continue
            t = time.perf_counter()
            with c.guarded("finish", session.trainer):
                c.finish(session)
            c.mark_probed(session.step, session.final)
            timings[c.name] = timings.get(c.name, 0.0) + time.perf_counter() - t

    def _log_overhead(self, trainer: L.Trainer, step: int, cost: float) -> None:
        metrics = {"analysis/overhead/probe_seconds": cost}
        if self.schedule is not None:
            self.schedule.tick(self.wall())
            fraction = self.schedule.fraction()
            if step > self.schedule.start_step and fraction == fraction:  # no ratio before any training (or nan)
                metrics["analysis/overhead/fraction"] = fraction
        self.history.append({"step": step, **metrics, **{f"seconds/{k}": v for k, v in self.last_timings.items()}})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ---- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (saved by every probe callback; tiny)."""
        return {"schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule (from whichever callback's checkpoint state comes first)."""
        if self.schedule is not None and state.get("schedule"):
            self.schedule.load_state_dict(state["schedule"])
