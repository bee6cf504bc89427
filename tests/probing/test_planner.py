"""The probe planner with a fake clock and no Trainer: which steps are due under a fixed cadence and under the budget.

The known answers are worked by hand from the rule in ``probing/schedule.py``: with budget ``b``, a training step of
``s`` seconds, probes of ``c`` seconds, ``R`` of ``N`` steps left and ``spent`` seconds of analysis so far, the next
probe is ``ceil(R / (k + 1))`` steps on, ``k = floor((b (T + R s) - spent - c) / c)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pdelightning.probing import Moment, ProbePlanner, check_cadence, is_final


@dataclass
class Fake:
    """A callback as the planner sees it (the :class:`~pdelightning.probing.Cadence` protocol)."""

    budget: float | None = None
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    probe_at_start: bool = True
    last_probe_step: int = -1
    active: bool = True


class Clock:
    def __init__(self) -> None:
        self.t = 100.0  # any origin

    def __call__(self) -> float:
        return self.t


def simulate(
    callbacks: list[Fake],
    epochs: int,
    steps_per_epoch: int,
    step_seconds: float = 1.0,
    probe_seconds: float = 1.0,
    agree=None,
) -> tuple[list[tuple[str, int]], ProbePlanner, list[str]]:
    """Drive the planner as the hub does over a run: ``[(hook, step)]`` of every probe, the planner, its warnings."""
    clock, warnings = Clock(), []
    planner = ProbePlanner(clock=clock, warn=warnings.append)
    planner.fold(callbacks)
    total = float(epochs * steps_per_epoch)
    extra = {} if agree is None else {"agree": agree}
    probes: list[tuple[str, int]] = []

    def hook(name: str, step: int, epoch: int, last: bool) -> None:
        m = Moment(step, epoch, last, name, is_final(name, step, epoch, last, None, epochs))
        if name == "start" and not planner.start_once(step):
            return
        due = planner.due(callbacks, m, total, **extra)
        if due:
            t0 = clock()
            clock.t += probe_seconds
            for c in due:
                c.last_probe_step = step
            probes.append((name, step))
            planner.after_probe(step, clock() - t0, m.final, any(c.budget is not None for c in due), total, **extra)

    step = 0
    planner.start_clock(step)
    hook("start", step, 0, False)
    for epoch in range(epochs):
        for b in range(steps_per_epoch):
            clock.t += step_seconds
            step += 1
            hook("batch_end", step, epoch, b == steps_per_epoch - 1)
        hook("epoch_end", step, epoch, True)
    hook("train_end", step, epochs - 1, True)
    return probes, planner, warnings


def steps(probes: list[tuple[str, int]]) -> list[int]:
    return [s for _, s in probes]


def test_every_n_steps_probes_at_start_and_every_nth_step() -> None:
    probes, _, _ = simulate([Fake(every_n_steps=3)], epochs=2, steps_per_epoch=5)
    assert probes == [("start", 0), ("batch_end", 3), ("batch_end", 6), ("batch_end", 9)]


def test_every_n_epochs_probes_once_at_the_end_of_every_nth_epoch() -> None:
    # epochs 2 and 4 (1-based) end at steps 8 and 16; the batch_end of the epoch's last batch probes, the
    # epoch_end at the same step does not probe again
    probes, _, _ = simulate([Fake(every_n_epochs=2, probe_at_start=False)], epochs=4, steps_per_epoch=4)
    assert probes == [("batch_end", 8), ("batch_end", 16)]


def test_callbacks_with_different_cadences_share_one_probe_per_step() -> None:
    a, b = Fake(every_n_steps=2), Fake(every_n_steps=3, probe_at_start=False)
    probes, _, _ = simulate([a, b], epochs=1, steps_per_epoch=7)
    assert steps(probes) == [0, 2, 3, 4, 6]  # 6 is due for both: one probe
    assert (a.last_probe_step, b.last_probe_step) == (6, 6)


def test_budget_spaces_probes_to_keep_the_fraction() -> None:
    # b = 0.1, s = c = 1 s, N = 100. First plan at step 5 (5 steps after the start): T = 5, spent = 1,
    # k = floor((10 - 1 - 1) / 1) = 8, next = 5 + ceil(95 / 9) = 16. Then at 16: spent 2, k = 7, ceil(84 / 8) = 11
    # -> 27; 38; 49; at 49: spent 5, k = 4, ceil(51 / 5) = 11 -> 60; ceil(40 / 4) = 10 -> 70; 80; 90; at 90
    # spent 9, k = 0: only the final probe (step 100) remains. 10 probes of 1 s in 100 s of training: 10 %.
    probes, planner, warnings = simulate([Fake(budget=0.1)], epochs=4, steps_per_epoch=25)
    assert steps(probes) == [0, 16, 27, 38, 49, 60, 70, 80, 90, 100]
    assert probes[-1] == ("batch_end", 100)  # the final probe, on the last batch; not repeated at train_end
    assert planner.schedule is not None and planner.schedule.steps == steps(probes)
    assert planner.overhead(100) == pytest.approx(10 / 100)
    assert warnings == []


def test_every_n_steps_with_a_budget_is_the_closest_spacing() -> None:
    # as above, but never closer than 20 steps: 5 + 20 = 25, 45, 65, 85; at 85 the next (105) is past the end
    probes, _, _ = simulate([Fake(budget=0.1, every_n_steps=20)], epochs=4, steps_per_epoch=25)
    assert steps(probes) == [0, 25, 45, 65, 85, 100]


def test_a_budget_too_small_for_the_first_and_last_probe_says_so_once() -> None:
    # b = 0.01: the start and final probes alone cost 2 / 100 = 2 % of training
    probes, _, warnings = simulate([Fake(budget=0.01)], epochs=4, steps_per_epoch=25)
    assert steps(probes) == [0, 100]
    assert len(warnings) == 1 and "about 2% of this run" in warnings[0]


def test_the_ranks_follow_the_agreed_plan() -> None:
    # another rank planned 3 steps later: every rank probes at the later step (16 + 3)
    agreed = lambda v: None if v is None else v + 3  # noqa: E731
    probes, _, _ = simulate([Fake(budget=0.1)], epochs=4, steps_per_epoch=25, agree=agreed)
    assert steps(probes)[:2] == [0, 19]


def test_gradient_reads_come_on_the_first_step_and_from_the_step_before_a_probe() -> None:
    clock = Clock()
    planner = ProbePlanner(clock=clock)
    planner.fold([Fake(budget=0.1)])
    planner.start_clock(0)
    clock.t += 1.0
    planner.after_probe(0, 1.0, final=False, budgeted=True, total=100.0)  # the start probe (no step time yet)
    reads = []
    for step in range(100):
        if step:
            clock.t += 1.0
        if planner.gradient_read_due(step, 100.0):
            reads.append(step)
    assert planner.schedule is not None and planner.schedule.next_step == 16  # planned at step 5, as above
    # no probe moves the plan here: every step from the one before step 16 on reads (and step 99, the last)
    assert reads == [0, *range(15, 100)]


@pytest.mark.parametrize(
    ("hook", "step", "epoch", "last", "max_steps", "max_epochs", "final"),
    [
        ("start", 0, 0, False, 1, 1, False),
        ("batch_end", 8, 0, False, 8, None, True),  # max_steps reached
        ("batch_end", 7, 0, False, 8, None, False),
        ("batch_end", 6, 1, True, None, 2, True),  # the last batch of the last epoch
        ("batch_end", 3, 0, True, None, 2, False),
        ("epoch_end", 6, 1, True, None, 2, True),
        ("epoch_end", 3, 0, True, -1, 2, False),  # max_steps=-1: no step limit
        ("train_end", 5, 0, False, None, None, True),
    ],
)
def test_which_moment_is_the_last_of_training(hook, step, epoch, last, max_steps, max_epochs, final) -> None:
    assert is_final(hook, step, epoch, last, max_steps, max_epochs) is final


def test_check_cadence() -> None:
    assert check_cadence(None, None, "auto", True) == 0.03
    assert check_cadence(5, None, "auto", True) is None
    assert check_cadence(5, None, 0.1, True) == 0.1
    with pytest.raises(ValueError, match="every_n_steps=0 must be a positive integer"):
        check_cadence(0, None, "auto", True)
    with pytest.raises(ValueError, match=r"budget=1.5 must be a fraction in \(0, 1\)"):
        check_cadence(None, None, 1.5, True)
    with pytest.raises(ValueError, match="this callback would never run"):
        check_cadence(None, None, None, False)
