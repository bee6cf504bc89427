"""Running probes: one probe forward for every callback due, the shared captures, the callbacks' steps.

Every probe callback (a :class:`~pdelightning.probing.protocol.ProbeClient`, e.g.
:class:`~pdelightning.callbacks.ProbeCallback`) attached to a trainer registers with that trainer's
:class:`ProbeHub`. When a callback's hook fires, the hub asks its planner (:class:`~pdelightning.probing.planner.
ProbePlanner`, pure: which callback is due at this moment, the time budget's decisions) which callbacks are due, and
runs ONE pass over the fixed probe set: per probe batch, one forward of the model with the union of the hooks they
asked for (:class:`~pdelightning.probing.capture.Request`), one forward of each distinct reference or null model,
and hands every callback the same :class:`ProbeBatch`. Callbacks then finish (collectives, logging) in turn. A
callback alone works the same way, with a hub of one.

**Failures.** A probe has a rank-local part (the shared forwards, each callback's ``request``, ``begin`` and
``consume``: no collectives) and a collective part (each callback's ``finish``: its gathers first, then rank-zero
logging). A callback that raises in either (``on_error="warn"``) is recorded as failed and skips the rest of the
probe; between the two parts, and again after the last ``finish``, the ranks agree in one ``all_reduce`` which
callbacks failed anywhere and switch those off on every rank together
(:func:`~pdelightning.probing.guard.agree`). A callback that failed in its local part on one rank is thus switched
off before any collective of the probe, on every rank: no rank waits on a gather another rank skipped. The design,
and the one case it cannot repair, are in :mod:`pdelightning.probing.guard`.

The hub measures what each probe costs (for the planner's budget), logs ``analysis/overhead/fraction`` (analysis
seconds over training seconds so far) and ``analysis/overhead/probe_seconds``, and sends figures to the figure
worker process when a probe is over.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, ClassVar

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
from pdelightning.probing.planner import Moment, ProbePlanner, is_final
from pdelightning.probing.probe_set import ProbeSet, probe_set_of
from pdelightning.probing.protocol import Budgeted, ProbeClient
from pdelightning.probing.schedule import BudgetSchedule
from pdelightning.probing.session import MODEL, ProbeBatch, ProbeSession, forward_batch

__all__ = ["MODEL", "ProbeBatch", "ProbeHub", "ProbeSession"]

_NONE = 2**62  # "no interior probe planned", for reductions (max wins: the most conservative plan)


class ProbeHub:
    """The probes of one trainer (see the module docstring). Get it with :meth:`of`.

    Attributes:
        callbacks: the probe callbacks attached (in attach order).
        readers: analysis that is not a probe but spends time under the shared budget (GradientFlow).
        planner: who is due when, and the budget (:class:`~pdelightning.probing.planner.ProbePlanner`).
        figures: the figure worker process.
        final: whether the probes now running are the last of training (read by the callbacks' figures).
        history: one row per probe: its step, cost and logged overhead, and each part's seconds.
    """

    _hubs: ClassVar[weakref.WeakKeyDictionary[Any, ProbeHub]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.callbacks: list[ProbeClient] = []
        self.readers: list[Budgeted] = []
        self.planner = ProbePlanner(clock=time.perf_counter, warn=rank_zero_warn)
        self.figures = FigureWorker()
        self.final = False
        self._probe_sets: dict[tuple[int, int, int, int, int], ProbeSet] = {}
        self._total: tuple[float | None] | None = None  # the run's total steps, read once per fit
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

    @property
    def schedule(self) -> BudgetSchedule | None:
        """The shared budget schedule (the planner's), or ``None`` while nothing is budgeted."""
        return self.planner.schedule

    def attach(self, callback: ProbeClient) -> None:
        """Register a probe callback (idempotent) and fold its budget into the shared schedule."""
        if callback not in self.callbacks:
            self.callbacks.append(callback)
        self.planner.fold([*self.callbacks, *self.readers])

    def attach_reader(self, reader: Budgeted) -> None:
        """Register analysis that is not a probe (GradientFlow's reads) with the shared budget."""
        if reader not in self.readers:
            self.readers.append(reader)
        self.planner.fold([*self.callbacks, *self.readers])

    def record_read(self, trainer: L.Trainer, seconds: float) -> None:
        """Account one read (every rank calls this at the same steps). Without budgeted probe callbacks, reads
        drive the schedule themselves (as probes do); otherwise they only add to the time spent.
        """
        probes_budgeted = any(c.budget is not None and c.active for c in self.callbacks)
        self.planner.after_read(trainer.global_step, seconds, probes_budgeted, *self._run_info(trainer))

    # ---- what the planner reads from the trainer -----------------------------------------------------------------
    def start_clock(self, trainer: L.Trainer) -> None:
        """Start timing training (once per fit), continuing a restored schedule's clock."""
        self._total = None  # read again at each fit's start: max_steps or the data may have changed
        self.planner.start_clock(trainer.global_step)

    def wall(self) -> float:
        """Wall seconds of this fit, plus those of the run it resumed."""
        return self.planner.wall()

    def add_analysis_time(self, seconds: float) -> None:
        """Account analysis work done outside a probe (e.g. GradientFlow's gradient reads)."""
        self.planner.add(seconds)

    def total_steps(self, trainer: L.Trainer) -> float | None:
        """The run's total optimizer steps, or ``None`` when unknown (read once per fit: it is asked every step)."""
        if self._total is None:
            try:
                total: float | None = float(trainer.estimated_stepping_batches)
            except Exception:
                total = None
            self._total = (total if total is not None and total > 0 else None,)
        return self._total[0]

    def _run_info(self, trainer: L.Trainer) -> tuple[Any, Any]:
        """``(total, agree)`` for the planner: the run's total steps (read when needed) and the plan every rank
        follows (the latest, most conservative, of the ranks' plans).
        """

        def agree_plan(value: int | None) -> int | None:
            if trainer.world_size <= 1:
                return value
            t = torch.tensor([float(_NONE if value is None else value)], device=trainer.strategy.root_device)
            agreed = int(trainer.strategy.reduce(t, reduce_op="max").item())
            return None if agreed >= _NONE else agreed

        return (lambda: self.total_steps(trainer)), agree_plan

    def budget_due(self, trainer: L.Trainer) -> bool:
        """Whether the shared budget schedule has an interior probe at this step."""
        return self.planner.budget_due(trainer.global_step, *self._run_info(trainer))

    def gradient_read_due(self, trainer: L.Trainer) -> bool:
        """For GradientFlow in budget mode: read the gradients of the step that leads to a probe (and the first)."""
        return self.planner.gradient_read_due(trainer.global_step, *self._run_info(trainer))

    @staticmethod
    def moment(trainer: L.Trainer, hook: str, final: bool | None = None) -> Moment:
        """The moment of ``hook`` now (``final`` by default from the trainer's ``max_steps`` / ``max_epochs``)."""
        step, epoch, last = trainer.global_step, trainer.current_epoch, bool(trainer.is_last_batch)
        if final is None:
            final = is_final(hook, step, epoch, last, trainer.max_steps, trainer.max_epochs)
        return Moment(step, epoch, last, hook, final)

    # ---- running -----------------------------------------------------------------------------------------------
    def on_hook(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str) -> None:
        """A probe callback's hook fired: probe every callback due now (once per moment, whichever callback asks)."""
        m = self.moment(trainer, hook)
        if hook != "start" and self.planner.checked == m:
            return  # another callback's hook checked every callback at this moment already
        self.step(trainer, pl_module, hook, m.final)

    def step(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str, final: bool = False) -> None:
        """Run one probe for every callback due at this hook and step (idempotent per step)."""
        if trainer.sanity_checking:
            return
        m = self.moment(trainer, hook, final)
        if hook == "start":
            if not self.planner.start_once(m.step):
                return  # every callback's on_train_start calls this; the start probe runs once
            self.prepare(trainer, pl_module)
        self.final = final
        try:
            due = self.planner.due(self.callbacks, m, *self._run_info(trainer))
            if due:
                self.run(trainer, pl_module, due, final)
        finally:
            self.final = False
        # every callback calls this from its own hook; all of them were just checked, so the others need not be
        self.planner.checked = None if hook == "start" else m

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every callback's ``prepare``, before the start probe.

        The start probe runs at the first probe callback's ``on_train_start``, before the later callbacks' own
        ``on_train_start``: what a callback needs from the start of training (AttentionSimilarity's copy of the
        model) is taken here, for all of them, whatever their order in the trainer's list. Rank-local (its time is
        analysis time); the ranks then agree who failed, before the probe's first collective.
        """
        t0 = self.planner.clock()
        ready = [c for c in self.callbacks if c.active]
        for c in ready:
            with c.guarded("prepare", trainer):
                c.prepare(trainer, pl_module)
        self.add_analysis_time(self.planner.clock() - t0)
        agree(trainer, ready)

    def probe_set(self, trainer: L.Trainer, callback: ProbeClient) -> ProbeSet:
        """The probe set of ``callback``'s spec (shared by callbacks with the same size, batch size and seed)."""
        key = (callback.probe_size, callback.probe_batch_size, callback.seed, trainer.global_rank, trainer.world_size)
        if key not in self._probe_sets:
            loader = callback.probe_loader(trainer)
            self._probe_sets[key] = probe_set_of(
                trainer, loader, callback.probe_size, callback.probe_batch_size, callback.seed
            )
        return self._probe_sets[key]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, due: list[ProbeClient], final: bool) -> None:
        """One probe of the callbacks ``due``: shared forwards per probe-set group, then each callback finishes."""
        t0 = self.planner.clock()
        step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        timings: dict[str, float] = {"forward": 0.0}
        try:
            groups: dict[tuple[int, int, int], list[ProbeClient]] = {}
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
        cost = self.planner.clock() - t0
        self.last_timings = timings | {"total": cost}
        budgeted = any(c.budget is not None for c in due)
        self.planner.after_probe(step, cost, final, budgeted, *self._run_info(trainer))
        self._log_overhead(trainer, step, cost)

    def _models(
        self, trainer: L.Trainer, pl_module: L.LightningModule, due: list[ProbeClient]
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
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        members: list[ProbeClient],
        final: bool,
        step: int,
        timings: dict[str, float],
    ) -> ProbeSession | None:
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
            trainer,
            pl_module,
            step,
            final,
            targets,
            adapters,
            modules={k: m for k, (m, _) in models.items()},
            probe_size=probe.size,
            figures=self.figures,
            timings=timings,
            partner=probe.partner,
            rank=probe.rank,
            figure_position=probe.figure_position,
        )
        for c in members:
            if not c.failed:
                with c.guarded("begin", trainer):
                    c.begin(session)
        with torch.no_grad():
            for raw, index in probe:
                ok = [c for c in members if not c.failed]
                if not ok:
                    break
                t = self.planner.clock()
                try:
                    pb = forward_batch(session, models, raw, index)
                except Exception as err:
                    fail_all(ok, err, "the probe forward", trainer)
                    break
                timings["forward"] += self.planner.clock() - t
                for c in ok:
                    t = self.planner.clock()
                    with c.guarded("consume", trainer):
                        c.consume(pb)
                    timings[c.name] = timings.get(c.name, 0.0) + self.planner.clock() - t
                del pb
        return session

    def _finish(self, members: list[ProbeClient], session: ProbeSession | None, timings: dict[str, float]) -> None:
        """Each member's ``finish`` (collectives, then rank-zero logging), after the ranks agreed who failed."""
        for c in members:
            if c.failed or session is None:
                continue
            t = self.planner.clock()
            with c.guarded("finish", session.trainer):
                c.finish(session)
            c.mark_probed(session.step, session.final)
            timings[c.name] = timings.get(c.name, 0.0) + self.planner.clock() - t

    def _log_overhead(self, trainer: L.Trainer, step: int, cost: float) -> None:
        metrics = {"analysis/overhead/probe_seconds": cost}
        fraction = self.planner.overhead(step)  # None before any training, or without a budget
        if fraction is not None:
            metrics["analysis/overhead/fraction"] = fraction
        self.history.append({"step": step, **metrics, **{f"seconds/{k}": v for k, v in self.last_timings.items()}})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # ---- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state (saved by every probe callback; tiny)."""
        return self.planner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule (from whichever callback's checkpoint state comes first)."""
        self.planner.load_state_dict(state)
