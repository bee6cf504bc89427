"""Planted summaries: long-format rows with known values, to test the rules on structured results."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from pdelightning_reproduce.summary import COLUMNS, RUN_FIELDS, Results

SEEDS = (0, 1, 2, 3, 4)


class Planter:
    """Collects rows and run records; :meth:`results` builds a :class:`Results`."""

    def __init__(self, seed: int = 0) -> None:
        self.rows: list[tuple] = []
        self.runs: list[dict] = []
        self.rng = np.random.default_rng(seed)

    def add(
        self,
        setting: str,
        quantity: str,
        values: Callable[[int], Sequence[float] | float],
        layers: Sequence[str] = ("",),
        stage: str = "final",
        step: int = 1000,
        cell: str = "",
        seeds: Sequence[int] = SEEDS,
        noise: float = 0.0,
    ) -> Planter:
        """``values(seed)`` gives one value per layer (or a scalar for one layer)."""
        for s in seeds:
            v = np.atleast_1d(np.asarray(values(s), dtype=float))
            v = v + noise * self.rng.standard_normal(v.shape)
            for layer, x in zip(layers, v, strict=True):
                self.rows.append((setting, cell, s, step, stage, quantity, layer, float(x)))
        return self

    def trajectory(
        self,
        setting: str,
        quantity: str,
        layer: str,
        steps: Sequence[int],
        values: Callable[[int], Sequence[float]],
        seeds: Sequence[int] = SEEDS,
    ) -> Planter:
        """One value per step (first = init, last = final)."""
        for s in seeds:
            for k, (st, x) in enumerate(zip(steps, values(s), strict=True)):
                stage = "init" if k == 0 else "final" if k == len(steps) - 1 else ""
                self.rows.append((setting, "", s, st, stage, quantity, layer, float(x)))
        return self

    def run(self, setting: str, cell: str = "", seeds: Sequence[int] = SEEDS, **fields: object) -> Planter:
        """Run records (``status`` defaults to complete)."""
        for s in seeds:
            rec = dict.fromkeys(RUN_FIELDS)
            rec.update(setting=setting, cell=cell, seed=s, status="complete", diverged=False)
            rec.update({k: (v(s) if callable(v) else v) for k, v in fields.items()})
            self.runs.append(rec)
        return self

    def results(self) -> Results:
        df = pd.DataFrame(self.rows, columns=list(COLUMNS))
        runs = pd.DataFrame(self.runs, columns=list(RUN_FIELDS)) if self.runs else None
        if runs is not None:
            runs["cell"] = runs["cell"].astype(str)
        return Results(df, runs)
