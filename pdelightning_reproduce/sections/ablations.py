"""The v2 stabilizer claims on MNIST, from sweeps across the stability boundary without gradient clipping.

Divergence is training's (:mod:`pdelightning_reproduce.divergence`): the verdict each run's record holds
(``training_divergence``). Runs recorded before it (v2's, stopped at ``10 ln C`` without a loss series) have none:
their divergence rules are "not comparable: not measured yet", and the cell tables show v2's stop beside it. The
PDE sweeps are classified by each run's measured eq. (21) at initialisation, so ``eq21-…`` cells (v2) and ``dt…``
cells (v3) are read alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pdelightning_reproduce import figures, paper, stats
from pdelightning_reproduce.divergence import (
    LOSS_MULTIPLE,
    MIN_UPDATES,
    field_value,
    flag_value,
    recorded_divergence,
)
from pdelightning_reproduce.rules import BY_ID, DIVERGENCE_LOSS_FACTOR, DRIFT_MIN_ACC
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table, budget_text, cell, est, est_bounded
from pdelightning_reproduce.settings import SWEEP_DEPTHS, SWEEP_LRS, depth_lr_cells
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import Estimate, claim_result, invalid_unless, rate_difference, ratio_of_means

BASE, NO_RES, NO_LN = "sweep_transformer", "sweep_no_residual", "sweep_no_layernorm"
PDE, PDE_STAB = "sweep_pde", "sweep_pde_stabilized"
ACC_QUANTITY = "probe_acc"
ACC_LABEL = "probe-set accuracy"
ACC_NOTE = "on the probe set (the fixed 1,000 MNIST test images), at the final step"
NOT_MEASURED = (
    "not measured yet: no run here carries the divergence verdict of pdelightning_reproduce.divergence (v2's runs "
    "stopped at the first loss above 10 ln 10, before that rule's 10 updates, and recorded no loss series)"
)
LABEL = {
    BASE: "baseline",
    NO_RES: "no residual",
    NO_LN: "no LayerNorm",
    PDE: "PDE, no stabilizers",
    PDE_STAB: "PDE, stabilized",
}


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (Wilson 1927), for displaying divergence rates.

    Example::

        >>> [round(x, 4) for x in wilson(0, 5)]
        [0.0, 0.4345]
    """
    r = stats.wilson(k, n)
    return float(r.low), float(r.high)


def _trained_rows(results: Results, setting: str, cell_name: str) -> list[dict]:
    rows = results.run_rows(setting, cell_name)
    return [r for r in rows.to_dict("records") if r.get("status") in ("complete", "diverged")]


def diverged(results: Results, setting: str, cell_name: str) -> dict[int, float]:
    """``seed -> 1.0 / 0.0``: the divergence verdict of each trained run of a cell
    (:func:`~pdelightning_reproduce.divergence.recorded_divergence`); runs it cannot judge, and runs recorded
    before it, are absent.
    """
    out = {}
    for r in _trained_rows(results, setting, cell_name):
        d = recorded_divergence(r)
        if d is not None:
            out[int(r["seed"])] = float(d)
    return out


def stopped_v2(results: Results, setting: str, cell_name: str) -> dict[int, float]:
    """``seed -> 1.0 / 0.0``: whether a trained run was stopped by v2's bound (non-finite or ``10 ln C``): its
    recorder stopped it (``stop_reason`` "diverged"), or, for a record made before training's verdict existed, its
    ``diverged`` flag. A v3 run is never stopped by that bound; its ``diverged`` is training's verdict.
    """
    out = {}
    for r in _trained_rows(results, setting, cell_name):
        flag = bool(flag_value(field_value(r, "diverged")))
        stopped = field_value(r, "stop_reason") == "diverged" or (
            field_value(r, "training_divergence") is None and flag
        )
        out[int(r["seed"])] = 1.0 if stopped else 0.0
    return out


def divergence_steps(results: Results, setting: str, cell_name: str) -> list[float]:
    """The step at which each diverged run of a cell diverged: training's (``divergence_at``, v3) where recorded,
    else the step v2's bound stopped it (``divergence_step``).
    """
    out = []
    for r in results.run_rows(setting, cell_name).to_dict("records"):
        v = field_value(r, "divergence_at")
        v = v if v is not None else field_value(r, "divergence_step")
        if v is not None:
            out.append(float(v))
    return out


def cells_run(results: Results, setting: str) -> list[str]:
    """The cells of a sweep that have runs, in name order."""
    return sorted({str(c) for c in results.run_rows(setting)["cell"]})


def eq21_at_init(results: Results, setting: str, cell_name: str) -> dict[int, float]:
    """``seed -> eq. (21) at initialisation`` (maximum over steps) as measured on each run's step-0 weights."""
    tab = results.table(setting, "eq21", cell_name, "init")
    return {} if tab.empty else {int(s): float(np.nanmax(tab.loc[s].to_numpy(dtype=float))) for s in tab.index}


def rate_groups(
    results: Results, a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]]
) -> tuple[tuple[int, int, int, int], list[float]]:
    """Run counts ``(k_a, n_a, k_b, n_b)`` pooled over the ``(setting, cell)`` lists ``a`` and ``b``, and per seed
    (seeds with runs in both groups) its rate in ``a`` minus its rate in ``b``.
    """
    return column_rates([diverged(results, s, c) for s, c in a], [diverged(results, s, c) for s, c in b])


def column_rates(
    cols_a: Sequence[dict[int, float]], cols_b: Sequence[dict[int, float]]
) -> tuple[tuple[int, int, int, int], list[float]]:
    """:func:`rate_groups` of ``seed -> diverged`` columns (one per cell, or per cell part)."""
    flat_a = [v for col in cols_a for v in col.values()]
    flat_b = [v for col in cols_b for v in col.values()]
    counts = (int(sum(flat_a)), len(flat_a), int(sum(flat_b)), len(flat_b))
    seeds = sorted(set().union(*(set(c) for c in cols_a)) & set().union(*(set(c) for c in cols_b)))
    per_seed = []
    for seed in seeds:
        va = [col[seed] for col in cols_a if seed in col]
        vb = [col[seed] for col in cols_b if seed in col]
        per_seed.append(float(np.mean(va) - np.mean(vb)))
    return counts, per_seed


def rate_diff(results: Results, a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]]) -> Estimate:
    """Divergence rate of the runs in ``a`` minus in ``b``: Newcombe + Fisher on the counts, enveloped with the
    seed-paired t interval (:func:`~pdelightning_reproduce.verdicts.rate_difference`).
    """
    counts, per_seed = rate_groups(results, a, b)
    return rate_difference(counts, per_seed)


def _last(results: Results, setting: str, quantity: str, cell_name: str) -> dict[int, float]:
    """``seed -> quantity at the last block`` (final checkpoint), diverged runs excluded."""
    layers = [la for la in results.layers(setting, quantity, cell_name) if la.startswith("blocks.")]
    if not layers:
        return {}
    values = results.per_seed(setting, quantity, layers[-1], cell_name)
    div, stop = diverged(results, setting, cell_name), stopped_v2(results, setting, cell_name)
    return {s: v for s, v in values.items() if max(div.get(s, 0.0), stop.get(s, 0.0)) == 0.0 and np.isfinite(v)}


def cell_table(results: Results, settings: Sequence[str], cells: Sequence[str]) -> list[list[str]]:
    """One row per setting x cell: runs, divergence (Wilson interval), step of divergence, accuracy, drift."""
    rows = []
    for s in settings:
        for c in cells:
            div, stop = diverged(results, s, c), stopped_v2(results, s, c)
            if not stop:
                continue
            k, n = int(sum(div.values())), len(div)
            lo, hi = wilson(k, n) if n else (np.nan, np.nan)
            steps = divergence_steps(results, s, c)
            eq21 = [float(np.nanmax(v)) for v in _per_seed_layers(results, s, "eq21", c, "init")]
            rows.append(
                [
                    LABEL.get(s, s),
                    c,
                    str(len(stop)),
                    f"{k}/{n} [{lo:.2f}, {hi:.2f}]" if n else "not measured",
                    f"{int(sum(stop.values()))}/{len(stop)}",
                    f"{float(np.median(steps)):g}" if steps else "—",
                    cell(est_bounded(results.values(s, ACC_QUANTITY, cell=c))),
                    cell(est(list(_last(results, s, "cka_to_embedding", c).values()))),
                    cell(est(list(_last(results, s, "erank", c).values()))),
                    cell(est(eq21)) if eq21 else "—",
                ]
            )
    return rows


def _per_seed_layers(results: Results, setting: str, quantity: str, cell_name: str, stage: str) -> list[np.ndarray]:
    tab = results.table(setting, quantity, cell_name, stage)
    return [] if tab.empty else [tab.loc[s].to_numpy(dtype=float) for s in tab.index]


def ablations(results: Results) -> Section:
    """The four v2 claims."""
    sec = Section("ablations", "Stabilizers: v2 ablations as sweeps (MNIST)")
    budget = (
        f"Transformer sweeps: {budget_text(results, (BASE, NO_RES, NO_LN))}; PDE sweeps: "
        f"{budget_text(results, (PDE, PDE_STAB))}"
    )
    sec.intro = (
        f"Paper: {paper.V2_SOURCE}. Ours: {budget}; Adam, no gradient clipping; the baseline and the "
        f"two ablated Transformers at depth {' / '.join(map(str, SWEEP_DEPTHS))} x learning rate "
        f"{' / '.join(f'{x:g}' for x in SWEEP_LRS)} (the cells that ran are listed below); the PDE simulator without "
        f"and with stabilizers over the cells that ran (v2: Δt chosen per seed for an eq. (21) target, `eq21-…`; v3: "
        "fixed Δt, `dt…`), each run classed by its eq. (21) measured at initialisation. A run diverged when training "
        "(not the first forward) made its loss non-finite, or above "
        f"{LOSS_MULTIPLE:g} x its first loss after at least {MIN_UPDATES} updates "
        "(pdelightning_reproduce.divergence, judged from the run's loss series); runs recorded without that verdict "
        f"(v2's, stopped at the first loss above {DIVERGENCE_LOSS_FACTOR:g} ln 10, with no loss series) are shown "
        "with v2's stop but not counted. Drift: linear CKA of the last layer to the embedding and the effective rank "
        "of its token matrix (rank collapse), at the final step, diverged or stopped runs excluded. Rates: Wilson 95 % "
        "intervals per cell; verdicts use differences pooled over cells: Newcombe's interval on the run counts with "
        "Fisher's exact one-sided test, enveloped with the paired t interval of the per-seed differences. Accuracy: "
        f"{ACC_NOTE}."
    )
    tcells = [c.name for c in depth_lr_cells()]
    low = {d: next(c.name for c in depth_lr_cells() if c.depth == d and c.lr == min(SWEEP_LRS)) for d in SWEEP_DEPTHS}
    lookup = {}
    parts = []
    for d, c in low.items():
        acc = est(results.values(NO_RES, ACC_QUANTITY, cell=c))
        untrained = (
            f"the no-residual nets at {c} have probe-set accuracy {cell(acc)} (n={acc.n}), not above {DRIFT_MIN_ACC}: "
            "the drift of a net that did not train says nothing about residual connections"
        )
        for q, key in (("cka_to_embedding", "cka_ratio"), ("erank", "erank_ratio")):
            a, b = _last(results, NO_RES, q, c), _last(results, BASE, q, c)
            ratio = ratio_of_means(list(a.values()), list(b.values()))
            lookup[(key, f"L{d}")] = invalid_unless(ratio, not acc.missing and acc.lo > DRIFT_MIN_ACC, untrained)
        parts.append(
            f"L{d}: CKA ratio {cell(lookup[('cka_ratio', f'L{d}')])}, rank ratio "
            f"{cell(lookup[('erank_ratio', f'L{d}')])}"
        )
    acc = "; ".join(
        f"{LABEL[s]} at {c}: {cell(est(results.values(s, ACC_QUANTITY, cell=c)))}"
        for s in (BASE, NO_RES)
        for c in low.values()
    )
    sec.claims.append(
        claim_result(BY_ID["v2.no_residual_drift"], lookup, ours="; ".join(parts), accuracy=f"{ACC_LABEL}: " + acc)
    )
    pairs = [((NO_LN, c), (BASE, c)) for c in tcells]
    d_ln = rate_diff(results, [p[0] for p in pairs], [p[1] for p in pairs])
    ran = [c for c in tcells if stopped_v2(results, NO_LN, c) and stopped_v2(results, BASE, c)]  # cells that ran
    sec.claims.append(
        claim_result(
            BY_ID["v2.no_layernorm_explosive"],
            {("divergence_rate_diff", ""): d_ln},
            ours=f"divergence rate no LayerNorm minus baseline, pooled over the {len(ran)} cells that ran (of "
            f"{len(tcells)}): {d_ln}",
            null=f"baseline pooled rate {_pooled(results, BASE, tcells)}",
            accuracy="see the cell table",
            estimates={"diff": d_ln},
            missing_reason=NOT_MEASURED,
        )
    )
    pcells = [c for c in cells_run(results, PDE) if c in cells_run(results, PDE_STAB)]
    d_pde = rate_diff(results, [(PDE, c) for c in pcells], [(PDE_STAB, c) for c in pcells])
    sec.claims.append(
        claim_result(
            BY_ID["v2.pde_unstable"],
            {("divergence_rate_diff", ""): d_pde},
            ours=f"divergence rate without minus with stabilizers, pooled over the {len(pcells)} PDE cells that ran: "
            f"{d_pde}",
            null=f"with stabilizers: {_pooled(results, PDE_STAB, pcells)}",
            accuracy="see the cell table",
            estimates={"diff": d_pde},
            missing_reason=NOT_MEASURED,
        )
    )
    above, below = [], []
    for c in cells_run(results, PDE):
        div, eq21 = diverged(results, PDE, c), eq21_at_init(results, PDE, c)
        above.append({k: v for k, v in div.items() if eq21.get(k, np.nan) > 1})
        below.append({k: v for k, v in div.items() if eq21.get(k, np.nan) <= 1})
    d_eq = rate_difference(*column_rates(above, below))
    sec.claims.append(
        claim_result(
            BY_ID["v2.eq21_predicts"],
            {("divergence_rate_diff", ""): d_eq},
            ours=f"divergence rate of the runs with eq. (21) at initialisation > 1 minus ≤ 1: {d_eq}",
            accuracy="see the cell table",
            estimates={"diff": d_eq},
            missing_reason=NOT_MEASURED,
        )
    )
    headers = [
        "setting",
        "cell",
        "runs",
        "diverged (training's) [Wilson 95 %]",
        "stopped at v2's bound",
        "median divergence step",
        ACC_LABEL,
        "CKA last layer to embedding",
        "effective rank last layer",
        "eq. (21) at init (max over steps)",
    ]
    sec.tables.append(Table(headers, cell_table(results, (BASE, NO_RES, NO_LN), tcells), "Transformer sweeps."))
    sec.tables.append(Table(headers, cell_table(results, (PDE, PDE_STAB), cells_run(results, PDE)), "PDE sweeps."))
    panels = []
    for s in (BASE, NO_RES, NO_LN):
        mat = np.full((len(SWEEP_DEPTHS), len(SWEEP_LRS)), np.nan)
        for c in depth_lr_cells():
            div = diverged(results, s, c.name)
            if div:
                mat[SWEEP_DEPTHS.index(c.depth), SWEEP_LRS.index(c.lr)] = np.mean(list(div.values()))
        panels.append((LABEL[s], mat))
    if any(np.isfinite(m).any() for _, m in panels):
        sec.figures.append(
            FigureSpec(
                "ablation_divergence",
                "Share of diverged runs per depth x learning rate",
                figures.heatmaps,
                {
                    "panels": panels,
                    "rows": [f"L{d}" for d in SWEEP_DEPTHS],
                    "cols": [f"{x:g}" for x in SWEEP_LRS],
                    "label": "diverged share",
                },
            )
        )
    return sec


def _pooled(results: Results, setting: str, cells: Sequence[str]) -> str:
    """Pooled divergence rate of one setting over cells: ``k/n`` with its Wilson interval."""
    runs = [v for c in cells for v in diverged(results, setting, c).values()]
    if not runs:
        return "—"
    k, n = int(sum(runs)), len(runs)
    lo, hi = wilson(k, n)
    return f"{k}/{n} [{lo:.2f}, {hi:.2f}] (Wilson)"
