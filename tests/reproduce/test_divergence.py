"""Divergence that is training's (planted loss series with known verdicts) and the under-training flag."""

from __future__ import annotations

import math

import pytest

from pdelightning_reproduce.divergence import (
    LOSS_MULTIPLE,
    MIN_UPDATES,
    divergence_of_record,
    training_divergence,
    under_trained,
)

HEALTHY = [2.3, 2.2, 2.0, 1.8, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4]


def test_blow_up_of_the_first_forward_is_not_trainings_divergence() -> None:
    # step 1 (the first forward, before any update) is 50 nats; training then brings the loss down
    d = training_divergence([50.0, 40.0, *HEALTHY[1:]])
    assert d.status == "trained" and d.diverged is False and d.step is None and d.initial_loss == 50.0
    nan_init = training_divergence([math.nan, math.nan, math.nan])
    assert nan_init.status == "broken_at_init" and nan_init.diverged is None


def test_nan_at_step_40_is_divergence() -> None:
    losses = [2.3] + [1.0] * 38 + [math.nan, math.nan]
    d = training_divergence(losses)
    assert (d.status, d.step, d.reason, d.diverged) == ("diverged", 40, "nonfinite", True)
    # a non-finite loss counts even before MIN_UPDATES: it does not recover
    assert training_divergence([2.3, 2.0, math.inf]).step == 3


def test_three_times_the_initial_loss_at_step_2_with_k_5_is_not_yet_divergence() -> None:
    spike = [2.0, 6.5, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5]  # 3.25 x the initial loss after 1 update, then recovery
    d = training_divergence(spike, multiple=3.0, min_updates=5)
    assert d.status == "trained" and d.bound == pytest.approx(6.0)
    stays = [2.0, 6.5, 6.6, 6.7, 6.8, 6.9, 7.0, 7.1]  # stays above: judged once 5 updates are done (step 6)
    d = training_divergence(stays, multiple=3.0, min_updates=5)
    assert (d.status, d.step, d.reason) == ("diverged", 6, "exceeds_multiple")
    # the series ends (the run was stopped) while still above the bound and before k: undecided, not diverged
    assert training_divergence(stays[:3], multiple=3.0, min_updates=5).status == "undecided"
    # exactly at the bound is not above it
    assert training_divergence([2.0] + [6.0] * 10, multiple=3.0, min_updates=5).status == "trained"


def test_default_rule_and_recorder_step_numbering() -> None:
    assert LOSS_MULTIPLE == 3.0 and MIN_UPDATES == 10
    losses = [2.3] * 10 + [7.0] * 3  # 7.0 > 6.9 first seen at step 11 (10 updates before it)
    assert training_divergence(losses).step == 11
    assert training_divergence(losses[:10] + [6.8] * 3).status == "trained"
    # explicit steps (RunRecorder's), a series that is not contiguous
    d = training_divergence([2.3, 2.0, 9.0], steps=[1, 5, 20])
    assert (d.status, d.step) == ("diverged", 20)


def test_record_reader_and_bad_input() -> None:
    rec = {"losses": [2.3, 1.0, math.nan], "loss_steps": [1, 2, 3]}
    assert divergence_of_record(rec).step == 3
    with pytest.raises(KeyError, match="no loss series"):
        divergence_of_record({"max_train_loss": 3.0})
    with pytest.raises(ValueError, match=r"multiple=1\.0 must be > 1"):
        training_divergence(HEALTHY, multiple=1.0)
    with pytest.raises(ValueError, match="min_updates=0"):
        training_divergence(HEALTHY, min_updates=0)
    with pytest.raises(ValueError, match="first recorded step is 3"):
        training_divergence([2.3, 2.0], steps=[3, 4])
    with pytest.raises(ValueError, match="steps has 1 entries, losses 2"):
        training_divergence([2.3, 2.0], steps=[1])
    assert training_divergence([]).status == "undecided" and training_divergence([2.3]).status == "undecided"


def test_under_trained_reads_the_plateau_record() -> None:
    assert under_trained({"plateau_met": False, "stop_reason": "max_epochs"})
    assert under_trained({"plateau_met": False, "stop_reason": "max_steps"})
    assert not under_trained({"plateau_met": True, "stop_reason": "plateau", "plateau_epoch": 6})
    assert not under_trained({"plateau_met": False, "stop_reason": "diverged"})


def test_docstring_examples() -> None:
    import doctest

    import pdelightning_reproduce.divergence as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
