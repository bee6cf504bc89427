"""The budget schedule on a fake clock: probes at the start and the end, spacing from measured costs."""

from __future__ import annotations

import itertools
import math

import pytest

from pdelightning.probing.schedule import BudgetSchedule


def simulate(
    budget: float, total: int, step_time: float, probe_cost: float, min_spacing: int | None = None
) -> tuple[list[int], float]:
    """Run a fake training loop: every step costs ``step_time`` seconds, every probe ``probe_cost``.

    The loop follows the hub's protocol: a probe at step 0, a first plan after 5 steps (a measured step time), a
    plan after every interior probe, and the final probe at the last step. Returns the probe steps and the
    realised analysis fraction.
    """
    sched = BudgetSchedule(budget, min_spacing)
    clock = 0.0
    sched.record_probe(0, probe_cost)
    clock += probe_cost
    planned = False
    for step in range(1, total + 1):
        clock += step_time
        sched.tick(clock)
        if step == total:
            sched.record_probe(step, probe_cost)
            clock += probe_cost
            sched.tick(clock)
            break
        if not planned and step >= 5:
            sched.plan(step, total)
            planned = True
        if sched.due(step):
            sched.record_probe(step, probe_cost)
            clock += probe_cost
            sched.tick(clock)
            sched.plan(step, total)
    return sched.steps, sched.fraction()


def test_probes_at_start_and_end_and_within_budget() -> None:
    steps, fraction = simulate(0.03, total=1000, step_time=0.1, probe_cost=0.2)
    assert steps[0] == 0 and steps[-1] == 1000
    # 3 % of 100 s is 3 s: 15 probes of 0.2 s, the two fixed ones included
    assert 10 <= len(steps) <= 15
    assert fraction <= 0.03 + 1e-9
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) <= 1.6 * min(gaps)  # spread over the run (re-planned after each probe, so not exactly even)


def test_expensive_probes_are_spaced_further_apart() -> None:
    cheap, _ = simulate(0.03, total=1000, step_time=0.1, probe_cost=0.1)
    dear, _ = simulate(0.03, total=1000, step_time=0.1, probe_cost=0.5)
    assert len(cheap) > len(dear) >= 2
    assert (dear[2] - dear[1]) > (cheap[2] - cheap[1])


def test_a_probe_too_expensive_for_the_budget_leaves_start_and_end_only() -> None:
    steps, _ = simulate(0.03, total=100, step_time=0.01, probe_cost=1.0)
    assert steps == [0, 100]


def test_floor_fraction_is_what_the_start_and_end_probes_cost() -> None:
    sched = BudgetSchedule(0.03)
    sched.record_probe(0, 1.0)
    sched.tick(1.0 + 10 * 0.5)  # 10 steps of 0.5 s after a 1 s probe
    assert sched.floor_fraction(10, math.inf) is None  # unknown length
    # projected training: 5 s so far + 90 steps x 0.5 s = 50 s; two probes of 1 s = 4 %
    assert sched.floor_fraction(10, 100) == pytest.approx(2.0 / 50.0)
    assert BudgetSchedule(0.03).floor_fraction(10, 100) is None  # no probe cost yet


def test_explicit_spacing_is_the_closest_allowed() -> None:
    free, _ = simulate(0.5, total=200, step_time=0.1, probe_cost=0.01)
    capped, _ = simulate(0.5, total=200, step_time=0.1, probe_cost=0.01, min_spacing=50)
    assert min(b - a for a, b in itertools.pairwise(free[1:-1])) < 50
    assert all(b - a >= 50 for a, b in itertools.pairwise(capped[1:-1]))


def test_unknown_length_uses_the_steady_state_spacing() -> None:
    sched = BudgetSchedule(0.05)
    sched.record_probe(0, 0.5)
    sched.tick(0.5 + 10 * 0.1)
    # c (1 - b) / (b s) = 0.5 * 0.95 / (0.05 * 0.1) = 95 steps
    assert sched.plan(10, None) == 10 + 95
    assert sched.plan(10, math.inf) == 10 + 95


def test_no_plan_without_a_step_time_and_state_round_trip() -> None:
    sched = BudgetSchedule(0.03)
    sched.record_probe(0, 0.2)
    assert sched.plan(0, 100) is None and not sched.due(50)
    sched.tick(5.2)
    nxt = sched.plan(20, 1000)
    assert nxt is not None and sched.due(nxt) and not sched.due(nxt - 1)
    copy = BudgetSchedule(0.03)
    copy.load_state_dict(sched.state_dict())
    assert copy.state_dict() == sched.state_dict()
    copy.steps.append(7)
    assert sched.steps == [0]  # restored state is a copy


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5])
def test_bad_budget_names_the_value(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"budget={bad!r} must be a fraction in \(0, 1\)"):
        BudgetSchedule(bad)


def test_probe_set_doctests() -> None:
    import doctest

    from pdelightning.probing import probe_set

    assert doctest.testmod(probe_set, raise_on_error=False).failed == 0


def test_expected_probes_is_what_the_schedule_then_runs() -> None:
    steps, _ = simulate(0.03, total=1000, step_time=0.1, probe_cost=0.2)
    sched = BudgetSchedule(0.03)
    sched.record_probe(0, 0.2)
    sched.tick(0.2 + 5 * 0.1)
    assert sched.expected_probes(5, 1000) == pytest.approx(len(steps), abs=1)
    assert sched.few_probes_message(5, 1000) is None  # about 15 probes: enough for a curve
    assert BudgetSchedule(0.03).expected_probes(5, 1000) is None  # no probe cost measured yet


def test_too_few_probes_are_said_with_the_cadence_that_gives_a_curve() -> None:
    # the quickstart at the default budget: 315 steps of 0.2 s (63 s) and 2 s probes; 3 % is 1.9 s: start and end only
    steps, _ = simulate(0.03, total=315, step_time=0.2, probe_cost=2.0)
    assert steps == [0, 315]
    sched = BudgetSchedule(0.03)
    sched.record_probe(0, 2.0)
    sched.tick(2.0 + 5 * 0.2)
    assert sched.expected_probes(5, 315) == 2
    message = sched.few_probes_message(5, 315)
    assert message is not None
    # every 315 // 11 = 28 steps: probes at 0, 28, ..., 308: 12 probes of 2 s = 24 s, 24 s / 63 s of training = 38 %
    assert "about 2 probes" in message and "every_n_steps=28" in message and "For about 12 points" in message
    assert "about 24 s of analysis, 38 % of this run's training time" in message.replace("38%", "38 %")
