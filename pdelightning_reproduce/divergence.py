"""Divergence that is training's, and training that has not finished: pure functions over what a run records.

**Divergence** (issue 18, item 4). A run has *diverged* when, after the optimiser has changed the weights, its
training loss becomes non-finite, or exceeds :data:`LOSS_MULTIPLE` times its initial loss after at least
:data:`MIN_UPDATES` optimiser steps. The initial loss is the loss of the first training batch, computed before any
update; that first forward never counts as divergence (a model whose first forward blows up was broken by its
initialisation, not by training: v2 counted such a run, ``sweep_pde`` eq. (21) = 3 seed 1, "diverged at step 1").

* ``LOSS_MULTIPLE = 3`` (ours): in the v2 runs (``docs/reproduction/runs.csv``) every run that trained peaked at
  most 1.25 times its first loss (2.85 nats against about 2.3 for 10 classes: Adam noise and the first steps), while
  every blow-up reached 16 to 4,700 times it (37 to 10,785 nats); 3 sits between with a margin on both sides, and a
  loss of 3 x ln C is far worse than guessing.
* ``MIN_UPDATES = 10`` (ours): Adam's first updates move every weight by about the learning rate whatever its
  gradient (bias correction), the regime of the v2 blow-ups "at step 2"; a run is judged only once it had 10 updates
  to recover (about 5 % of a one-epoch sweep, 211 steps). A non-finite loss after the first update counts at once:
  it does not recover (its gradients make every weight non-finite).

Steps are numbered as :class:`~pdelightning_reproduce.recorder.RunRecorder` records them: the loss of training batch
``i`` (from 1) is recorded at ``step = i``, the optimiser step count *after* that batch's update, so the loss recorded
at step ``s`` was computed after ``s - 1`` updates (step 1 is the first forward).

**Under-training** (issue 18, item 5). A main run is at its plateau when its plateau criterion (Lightning's
``EarlyStopping`` in its config) stopped it: its ``run.json`` says ``plateau_met: true`` and ``stop_reason:
"plateau"``. Any other main run that did not diverge stopped at its ``max_epochs`` / ``max_steps`` cap while its
validation curve still improved (:func:`under_trained`); its verdicts are "not comparable: under-trained".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: a loss above this many times the initial loss, after MIN_UPDATES updates, is divergence (ours; see above)
LOSS_MULTIPLE = 3.0
#: optimiser steps (updates) before the loss is compared with the multiple (ours; see above)
MIN_UPDATES = 10

Reason = Literal["nonfinite", "exceeds_multiple", ""]
Status = Literal["diverged", "trained", "undecided", "broken_at_init"]


@dataclass(frozen=True)
class Divergence:
    """The verdict of :func:`training_divergence` on one run.

    Attributes:
        status: ``"diverged"``; ``"trained"`` (no divergence: the series passed ``min_updates`` updates, or ended
            earlier with its last loss within the bound); ``"undecided"`` (it ended before ``min_updates`` updates
            with its last loss above the bound, e.g. a run stopped by an older rule, or it holds only the first
            forward or nothing); ``"broken_at_init"`` (the first forward is not finite: there is no initial loss, and
            training never started from a working model).
        step: the recorded step of the first divergent loss (``None`` unless diverged).
        reason: ``"nonfinite"``, ``"exceeds_multiple"`` or ``""``.
        initial_loss: the first forward's loss (``nan`` for an empty series).
        bound: ``multiple x initial_loss``.
    """

    status: Status
    step: int | None
    reason: Reason
    initial_loss: float
    bound: float

    @property
    def diverged(self) -> bool | None:
        """``True`` / ``False``, or ``None`` when the record cannot say (``undecided``, ``broken_at_init``)."""
        return {"diverged": True, "trained": False}.get(self.status)


def training_divergence(
    losses: Sequence[float],
    steps: Sequence[int] | None = None,
    multiple: float = LOSS_MULTIPLE,
    min_updates: int = MIN_UPDATES,
) -> Divergence:
    """Whether training (not the first forward) diverged, from a run's training losses in order.

    Args:
        losses: the training loss of every batch, in order.
        steps: the step each loss was recorded at (``RunRecorder``'s numbering: ``s - 1`` updates before it);
            default ``1, 2, ...``. The first element is the first forward (it must be step 1 for a run recorded
            from its start).
        multiple: the bound as a multiple of the initial loss (> 1).
        min_updates: updates before the multiple applies (>= 1).

    Returns:
        a :class:`Divergence`.

    Raises:
        ValueError: on ``multiple <= 1``, ``min_updates < 1``, ``steps`` of another length than ``losses``, or a
            first step other than 1.

    Example::

        >>> training_divergence([2.3, 50.0, 2.0]).status  # a spike after one update, then recovery
        'trained'
        >>> training_divergence([2.3, 50.0]).status  # stopped during the spike, before it could recover
        'undecided'
        >>> training_divergence([2.3, *[1.0] * 20, float("nan")]).step  # NaN after 21 updates
        22
    """
    if not multiple > 1:
        raise ValueError(f"multiple={multiple} must be > 1")
    if min_updates < 1:
        raise ValueError(f"min_updates={min_updates} must be >= 1 (the first forward never counts)")
    steps = list(range(1, len(losses) + 1)) if steps is None else list(steps)
    if len(steps) != len(losses):
        raise ValueError(f"steps has {len(steps)} entries, losses {len(losses)}; they must match")
    if not losses:
        return Divergence("undecided", None, "", math.nan, math.nan)
    if steps[0] != 1:
        raise ValueError(f"the first recorded step is {steps[0]}; the series must start at the first forward (step 1)")
    initial = float(losses[0])
    if not math.isfinite(initial):
        return Divergence("broken_at_init", None, "", initial, math.nan)
    bound = multiple * initial
    for step, loss in zip(steps[1:], losses[1:], strict=True):
        value = float(loss)
        if not math.isfinite(value):
            return Divergence("diverged", int(step), "nonfinite", initial, bound)
        if step - 1 >= min_updates and value > bound:
            return Divergence("diverged", int(step), "exceeds_multiple", initial, bound)
    short = steps[-1] - 1 < min_updates  # ended before the multiple applied
    if len(losses) == 1 or (short and float(losses[-1]) > bound):
        return Divergence("undecided", None, "", initial, bound)
    return Divergence("trained", None, "", initial, bound)


def divergence_of_record(record: Mapping[str, Any], **rule: Any) -> Divergence:
    """:func:`training_divergence` of a run's ``run.json`` (its ``loss_steps`` and ``losses``, as
    :class:`~pdelightning_reproduce.recorder.RunRecorder` records them); ``rule`` overrides ``multiple`` /
    ``min_updates``.

    Raises:
        KeyError: when the record holds no loss series (runs recorded before the series was kept), naming the keys.
    """
    if "losses" not in record or "loss_steps" not in record:
        raise KeyError(f"the run record has no loss series ('losses', 'loss_steps'); it has {sorted(record)}")
    return training_divergence(list(record["losses"]), list(record["loss_steps"]), **rule)


def under_trained(record: Mapping[str, Any]) -> bool:
    """Whether a run stopped before its plateau criterion was met (and did not diverge).

    ``True`` for a run whose ``run.json`` has ``plateau_met`` false and a ``stop_reason`` of ``"max_epochs"`` or
    ``"max_steps"``: its validation curve was still improving (by more than the criterion's ``min_delta`` within its
    patience) when the cap ended it. A diverged or failed run is not "under-trained" (its verdict says why); a run
    without a plateau criterion (a sweep) is never at its plateau, so only main runs should be asked.
    """
    return not record.get("plateau_met") and record.get("stop_reason") in ("max_epochs", "max_steps")


def field_value(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]`` with pandas' missing values (``nan``, ``""``, ``"None"``) read as ``None``."""
    v = row.get(key)
    if (
        v is None
        or (isinstance(v, float) and math.isnan(v))
        or (isinstance(v, str) and v.strip() in ("", "nan", "None"))
    ):
        return None
    return v


def flag_value(v: Any) -> bool | None:
    """A boolean field as ``True`` / ``False`` (``"true"``, ``"1"``, ``"1.0"`` are true), ``None`` when missing."""
    if v is None:
        return None
    return str(v).strip().lower() in ("true", "1", "1.0")


def recorded_divergence(row: Mapping[str, Any]) -> bool | None:
    """A run's divergence verdict from its ``runs.csv`` row (or ``run.json``), as this module judges it.

    ``True`` / ``False`` from ``training_divergence`` (``diverged`` / ``trained``); ``None`` when the verdict cannot
    say (``undecided``, ``broken_at_init``) or the row has no verdict: a run recorded before it (v2 stopped its runs
    at ``10 ln C`` and kept no loss series) was not measured this way.

    Example::

        >>> recorded_divergence({"training_divergence": "diverged"}), recorded_divergence({"diverged": True})
        (True, None)
    """
    status = field_value(row, "training_divergence")
    return {"diverged": True, "trained": False}.get(str(status)) if status is not None else None


def recorded_under_trained(row: Mapping[str, Any]) -> bool:
    """Whether a main run's ``runs.csv`` row (or ``run.json``) says it stopped before its plateau: its recorded
    ``under_trained`` flag, else :func:`under_trained` of its ``plateau_met`` and ``stop_reason`` (a missing
    ``plateau_met`` is not a plateau). A run that diverged or failed is never "under-trained".

    Example::

        >>> recorded_under_trained({"plateau_met": float("nan"), "stop_reason": "max_epochs", "status": "complete"})
        True
    """
    if field_value(row, "status") in ("failed", "diverged"):
        return False
    flag = flag_value(field_value(row, "under_trained"))
    if flag is not None:
        return flag
    return under_trained(
        {"plateau_met": flag_value(field_value(row, "plateau_met")), "stop_reason": field_value(row, "stop_reason")}
    )
