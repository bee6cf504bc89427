"""What every claim section returns, and the small helpers they share.

A section function takes :class:`~pdelightning_reproduce.summary.Results` and returns a :class:`Section`: its
claims as :class:`~pdelightning_reproduce.verdicts.ClaimResult` (the verdicts the tests check), tables of numbers
(plain rows, rendered later) and figure specifications (drawn later). Nothing here formats Markdown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import ClaimResult, Estimate, fmt, interval_text, mean_interval


@dataclass
class Table:
    """A table of already formatted cells."""

    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class FigureSpec:
    """A figure to draw: ``draw(**data)`` returns a matplotlib ``Figure``; saved as ``figures/<name>.png``."""

    name: str
    caption: str
    draw: Callable[..., Any]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    """One section of the report.

    Attributes:
        key: stable key (``table2``, ``attention``, ...).
        title: heading.
        intro: what was measured, on which runs (Markdown-free prose).
        claims: the verdicts.
        tables: supporting numbers.
        figures: figure specifications.
        notes: further remarks (caveats, context).
    """

    key: str
    title: str
    intro: str = ""
    claims: list[ClaimResult] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def est(values: Sequence[float] | np.ndarray) -> Estimate:
    """Seed mean with its one-sample t interval (:func:`~pdelightning_reproduce.verdicts.mean_interval`)."""
    return mean_interval(values)


def est_bounded(values: Sequence[float] | np.ndarray, lo: float = 0.0, hi: float = 1.0) -> Estimate:
    """:func:`est` of a quantity that lies in ``[lo, hi]`` (an accuracy), its interval intersected with that
    range: the true mean lies in it, so the intersection covers whenever the t interval does (same coverage), and no
    printed limit lies where the quantity cannot.

    Example::

        >>> e = est_bounded([0.99, 1.0, 0.9])
        >>> e.hi, round(est([0.99, 1.0, 0.9]).hi, 3)
        (1.0, 1.105)
    """
    e = mean_interval(values)
    if e.missing:
        return e
    return replace(e, lo=max(e.lo, lo), hi=min(e.hi, hi), method=f"{e.method}, within [{fmt(lo)}, {fmt(hi)}]")


def cell(e: Estimate) -> str:
    """A table cell: ``value [lo, hi]``, or ``—``."""
    if e.missing:
        return "—"
    if e.n == 1:
        return f"{fmt(e.value)} (n=1)"
    return interval_text(e.value, e.lo, e.hi)


def per_seed(
    results: Results, setting: str, quantity: str, layers: Sequence[str], stage: str = "final", cell_name: str = ""
) -> dict[int, np.ndarray]:
    """``seed -> values at layers`` (``nan`` where absent)."""
    tab = results.table(setting, quantity, cell_name, stage)
    out = {}
    for seed in tab.index if not tab.empty else []:
        out[int(seed)] = np.array([float(tab.loc[seed, la]) if la in tab.columns else math.nan for la in layers])
    return out


def accuracy_text(results: Results, settings: Sequence[tuple[str, str]], quantity: str = "test_acc") -> str:
    """``label accuracy X [lo, hi] (n)`` for each ``(label, setting)``: on the full test split (``test_acc``) where
    it was measured, else on the probe set (``probe_acc``, final checkpoint), labelled as such.
    """
    parts = []
    for label, s in settings:
        e, where = est_bounded(results.values(s, quantity)), ""
        if e.missing and quantity == "test_acc":
            e, where = est_bounded(results.values(s, "probe_acc")), " (probe set)"
        if not e.missing:
            parts.append(f"{label}{where} {cell(e)}" + (f" (n={e.n})" if e.n > 1 else ""))
    return ("test accuracy: " + "; ".join(parts)) if parts else "test accuracy: —"


def curve_stats(values: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seed mean and t interval of each column of ``seed -> vector``."""
    if not values:
        return np.array([]), np.array([]), np.array([])
    mat = np.vstack(list(values.values()))
    ests = [est(mat[:, j]) for j in range(mat.shape[1])]
    return (np.array([e.value for e in ests]), np.array([e.lo for e in ests]), np.array([e.hi for e in ests]))


def budget_text(results: Results, settings: Sequence[str]) -> str:
    """How the runs of ``settings`` were trained, from the run table's ``cuts`` (each distinct text once), or the
    design's words when no run recorded a cut.
    """
    r = results.runs
    if "cuts" not in r or r.empty:
        return "one epoch of MNIST per run"
    texts = [str(t) for t in r[r["setting"].isin(list(settings))]["cuts"] if isinstance(t, str) and t]
    return "; ".join(dict.fromkeys(texts)) or "one epoch of MNIST per run"


def disjoint_seeds(results: Results, pair_name: str) -> list[int]:
    """The model seeds of the analysed units of ``pair_<name>`` that share no model
    (:func:`pdelightning_reproduce.pairs.disjoint_units`); reference seeds from ``settings.PAIRS``.
    """
    from pdelightning_reproduce.pairs import disjoint_units
    from pdelightning_reproduce.settings import PAIRS

    pair = {p.name: p for p in PAIRS}[pair_name.removeprefix("pair_")]
    units = results.seeds(f"pair_{pair.name}")
    pool = tuple(sorted(set(results.seeds(pair.model)) | set(results.seeds(pair.reference)) | set(units)))
    return disjoint_units((s, pair.reference_seed(s, pool)) for s in units)


def only(values: dict[int, np.ndarray], seeds: Sequence[int]) -> dict[int, np.ndarray]:
    """``values`` restricted to ``seeds``."""
    return {s: v for s, v in values.items() if s in set(seeds)}
