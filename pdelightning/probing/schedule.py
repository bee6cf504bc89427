"""When to probe: a fixed cadence, or a time budget that spaces probes so analysis stays a fraction of training.

:class:`BudgetSchedule` is pure bookkeeping on numbers the caller measures (seconds from a clock, steps), so it is
tested with a fake clock. The rule: with ``b`` the budget (e.g. 0.03), ``c`` the cost of the last probe, ``s`` the
measured wall time of a training step and ``R`` the steps left of ``N``, the training time projected for the whole
run is ``T = T_so_far + R s`` and the analysis allowed in it ``b T``. After reserving ``c`` for the final probe, the
``k = floor((b T - spent - c) / c)`` probes still affordable are spread evenly over the remaining steps (never closer
than an explicit ``min_spacing``); ``k < 1`` leaves only the final probe. With an unknown length the steady-state
spacing ``c / (b s)`` is used. The first probe (step 0) and the last (end of training) always happen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BudgetSchedule:
    """Spacing of probes under a time budget (see the module docstring).

    Attributes:
        budget: analysis time as a fraction of training time, in ``(0, 1)``.
        min_spacing: never probe more often than every ``min_spacing`` steps (an explicit ``every_n_steps``).
        spent: analysis seconds so far (probes and other analysis work, e.g. gradient reads).
        train_seconds: wall seconds of training so far, analysis excluded (set by :meth:`tick`).
        start_step: the global step at which this (possibly resumed) run started timing.
        next_step: the next scheduled interior probe, or ``None`` (only the final probe remains, or not yet planned).
        last_cost: seconds of the last probe.
        probes: number of probes recorded.
        steps: the steps at which probes happened (for the user and the tests).
    """

    budget: float
    min_spacing: int | None = None
    spent: float = 0.0
    train_seconds: float = 0.0
    start_step: int = 0
    next_step: int | None = None
    last_cost: float | None = None
    probes: int = 0
    steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, (int, float)) and 0 < self.budget < 1):
            raise ValueError(f"budget={self.budget!r} must be a fraction in (0, 1), e.g. 0.03 for 3 % of training time")
        if self.min_spacing is not None and self.min_spacing < 1:
            raise ValueError(f"min_spacing={self.min_spacing} must be a positive number of steps")

    def fraction(self) -> float:
        """Realised analysis time over training time so far (``nan`` before any training time)."""
        return self.spent / self.train_seconds if self.train_seconds > 0 else float("nan")

    def step_time(self, step: int) -> float | None:
        """Measured wall seconds per training step (analysis excluded), or ``None`` before any step."""
        done = step - self.start_step
        return self.train_seconds / done if done > 0 and self.train_seconds > 0 else None

    def tick(self, wall_since_start: float) -> None:
        """Update the training time from the wall time since training started (analysis time is subtracted)."""
        self.train_seconds = max(0.0, wall_since_start - self.spent)

    def record_probe(self, step: int, cost: float) -> None:
        """Account one probe of ``cost`` seconds at ``step``."""
        self.spent += cost
        self.last_cost = cost
        self.probes += 1
        self.steps.append(int(step))

    def add(self, seconds: float) -> None:
        """Account analysis work that is not a probe (e.g. reading gradients)."""
        self.spent += seconds

    def plan(self, step: int, total_steps: float | None) -> int | None:
        """The next interior probe step after ``step`` (``None``: only the final probe remains, or no step time yet).

        Args:
            step: the current global step.
            total_steps: the run's total number of optimizer steps, or ``None``/``inf`` when unknown.
        """
        s = self.step_time(step)
        c = self.last_cost
        if s is None or c is None or c <= 0:
            self.next_step = None
            return None
        lowest = self.min_spacing or 1
        if total_steps is None or not math.isfinite(total_steps):
            spacing = max(lowest, math.ceil(c * (1 - self.budget) / (self.budget * s)))
            self.next_step = step + spacing
            return self.next_step
        remaining = int(total_steps) - step
        projected = self.train_seconds + remaining * s
        allowance = self.budget * projected - self.spent - c
        k = math.floor(allowance / c) if allowance > 0 else 0
        if k < 1 or remaining <= 1:
            self.next_step = None
            return None
        spacing = max(lowest, math.ceil(remaining / (k + 1)))
        nxt = step + spacing
        self.next_step = nxt if nxt < int(total_steps) else None
        return self.next_step

    def floor_fraction(self, step: int, total_steps: float | None) -> float | None:
        """What the always-run probes (start and end) alone will cost, as a fraction of the projected training time.

        ``None`` while the step time, the probe cost or the run's length is unknown. Above :attr:`budget`, the budget
        cannot be kept whatever the spacing (the run is too short for the probes attached).
        """
        s, c = self.step_time(step), self.last_cost
        if s is None or c is None or total_steps is None or not math.isfinite(total_steps):
            return None
        projected = self.train_seconds + max(0, int(total_steps) - step) * s
        return 2 * c / projected if projected > 0 else None

    def expected_probes(self, step: int, total_steps: float | None) -> int | None:
        """How many probes the whole run gets under this budget, as planned now (``None`` while unknown).

        The probes done, the interior ones still affordable (as :meth:`plan` counts them) and the final one.
        """
        s, c = self.step_time(step), self.last_cost
        if s is None or c is None or c <= 0 or total_steps is None or not math.isfinite(total_steps):
            return None
        remaining = max(0, int(total_steps) - step)
        allowance = self.budget * (self.train_seconds + remaining * s) - self.spent - c
        k = math.floor(allowance / c) if allowance > 0 and remaining > 1 else 0
        k = min(k, max(0, remaining - 1) // (self.min_spacing or 1))
        return self.probes + k + 1

    def cadence_advice(self, step: int, total_steps: float | None, want: int = 12) -> str | None:
        """The fixed cadence that gives about ``want`` probes, and what it would cost (``None`` while unknown)."""
        s, c = self.step_time(step), self.last_cost
        if s is None or c is None or total_steps is None or not math.isfinite(total_steps):
            return None
        total = int(total_steps)
        spacing = max(1, total // (want - 1))  # a fixed cadence probes at step 0 and every spacing steps
        probes = 1 + total // spacing
        return (
            f"For about {probes} points set every_n_steps={spacing} on the analysis callbacks (about {probes * c:.0f} "
            f"s of analysis, {probes * c / (total * s):.0%} of this run's training time), or raise their budget."
        )

    def few_probes_message(self, step: int, total_steps: float | None, fewer_than: int = 10) -> str | None:
        """What to tell the user when the budget alone gives fewer than ``fewer_than`` probes (curves of a few points),
        with :meth:`cadence_advice`; ``None`` when there are enough or the numbers are not known yet.
        """
        n = self.expected_probes(step, total_steps)
        advice = self.cadence_advice(step, total_steps)
        if n is None or n >= fewer_than or advice is None:
            return None
        return (
            f"analysis budget {self.budget:.0%}: this run of {int(total_steps)} steps gets about {n} probes "  # type: ignore[arg-type]
            f"({self.last_cost:.2f} s each), so every analysis curve will have about {n} points. {advice}"
        )

    def due(self, step: int) -> bool:
        """Whether an interior probe is scheduled at ``step`` (or was missed before it)."""
        return self.next_step is not None and step >= self.next_step

    def state_dict(self) -> dict[str, Any]:
        """Everything, for checkpoints (a resumed run keeps its budget and its probe steps)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``budget`` and ``min_spacing`` stay this run's settings."""
        for k in ("spent", "train_seconds", "start_step", "next_step", "last_cost", "probes"):
            if k in state:
                setattr(self, k, state[k])
        self.steps = list(state.get("steps", []))
