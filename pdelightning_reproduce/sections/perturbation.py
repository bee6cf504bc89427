"""Perturbation sensitivity on 20 Newsgroups (§3.5): loss and accuracy vs ε of noise on the embedding."""

from __future__ import annotations

import math

import numpy as np

from pdelightning.analysis.perturbation import format_eps
from pdelightning_reproduce import figures, paper
from pdelightning_reproduce.rules import (
    BY_ID,
    EPS_GRID,
    NEWSGROUPS_LAYERS,
    PERTURBATION_FROM_EPS,
    PERTURBATION_GAP,
)
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table, accuracy_text, cell, curve_stats, est
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import bootstrap_groups, claim_result, difference_of_means

MODELS = (("Transformer", "newsgroups_transformer"), ("PDE", "newsgroups_pde"))
LABELS = [f"eps={format_eps(e)}" for e in EPS_GRID]
LOW = np.array([e < PERTURBATION_FROM_EPS for e in EPS_GRID])
HIGH = ~LOW


def curves(results: Results, setting: str) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """``seed -> relative loss increase per ε`` and ``seed -> accuracy drop per ε``."""
    rel, drop = {}, {}
    loss_t, acc_t = results.table(setting, "loss"), results.table(setting, "acc")
    for seed in results.seeds(setting):
        clean = results.per_seed(setting, "loss_clean").get(seed)
        acc0 = results.per_seed(setting, "acc_clean").get(seed)
        if clean is None or loss_t.empty or seed not in loss_t.index:
            continue
        loss = np.array([float(loss_t.loc[seed, k]) if k in loss_t.columns else math.nan for k in LABELS])
        acc = np.array([float(acc_t.loc[seed, k]) if k in acc_t.columns else math.nan for k in LABELS])
        rel[seed] = (loss - clean) / clean
        drop[seed] = acc0 - acc
    return rel, drop


def divergence_eps(pde: np.ndarray, transformer: np.ndarray) -> float:
    """log10 of the smallest ε where the seed-mean relative loss increase of the PDE exceeds the Transformer's by
    more than ``PERTURBATION_GAP``; ``+inf`` when nowhere on the grid.

    Example::

        >>> divergence_eps(np.array([[0.0] * 4 + [0.5] * 9]), np.zeros((1, 13)))
        -2.0
    """
    gap = np.nanmean(pde, axis=0) - np.nanmean(transformer, axis=0)
    hit = np.nonzero(gap > PERTURBATION_GAP)[0]
    return float(np.log10(EPS_GRID[hit[0]])) if hit.size else math.inf


def perturbation(results: Results) -> Section:
    """The three §3.5 claims (loss), the same claim on accuracy, the ε table and per-layer amplification."""
    sec = Section("perturbation", "Perturbation sensitivity (§3.5)")
    n_pert = results.values("newsgroups_pde", "perturbation_n")
    where = f"the first {int(n_pert[0])} posts of the probe set" if n_pert.size else "the probe set"
    sec.intro = (
        f"Paper: {paper.PERTURBATION_SOURCE}. Ours: Gaussian noise ε × (each sample's embedding RMS) added to the "
        f"embedding of {where}, at the final checkpoint; ε on a grid fixed before the runs (1e-4 to 1e2 in half "
        "decades). Both models end in a LayerNorm, so neither output is bounded by architecture alone. Relative loss "
        "increase = (loss(ε) − clean) / clean; accuracy drop = clean − acc(ε)."
    )
    per_model = {label: curves(results, s) for label, s in MODELS}
    rel = {label: c[0] for label, c in per_model.items()}
    drop = {label: c[1] for label, c in per_model.items()}
    low = {label: [float(np.nanmax(v[LOW])) for v in rel[label].values()] for label in rel}
    lookup = {(f"max_rel_increase_low_{label.lower()}", ""): est(low[label]) for label in low}
    sec.claims.append(claim_result(
        BY_ID["pert.similar_low"], lookup,
        ours="largest relative increase below ε = 1e-3: " + "; ".join(f"{k} {cell(est(v))}" for k, v in low.items()),
        accuracy=accuracy_text(results, MODELS),
    ))  # fmt: skip
    for rule, key, what, per_seed_curves in (
        ("pert.pde_faster_loss", "rel_increase_diff", "mean relative loss increase", rel),
        ("pert.pde_faster_acc", "acc_drop_diff", "mean accuracy drop", drop),
    ):
        high = {label: [float(np.mean(v[HIGH])) for v in c.values()] for label, c in per_seed_curves.items()}
        diff = difference_of_means(high["PDE"], high["Transformer"])
        sec.claims.append(claim_result(
            BY_ID[rule], {(key, ""): diff},
            ours=f"{what} over ε ≥ 1e-3: PDE {cell(est(high['PDE']))}, Transformer "
                 f"{cell(est(high['Transformer']))}; difference {cell(diff)}",
            accuracy=accuracy_text(results, MODELS), estimates={"diff": diff},
        ))  # fmt: skip
    groups = [
        np.vstack(list(rel[k].values())) if rel[k] else np.zeros((0, len(EPS_GRID))) for k in ("PDE", "Transformer")
    ]
    div = bootstrap_groups(groups, lambda g: divergence_eps(g[0], g[1]), drop_nan=False)
    sec.claims.append(claim_result(
        BY_ID["pert.divergence_near"], {("log10_divergence_eps", ""): div},
        ours=f"log10 ε of divergence {cell(div)} (+inf: nowhere on the grid)",
        accuracy=accuracy_text(results, MODELS), estimates={"log10_eps": div},
    ))  # fmt: skip
    stats = {(label, kind): curve_stats(d[label]) for kind, d in (("loss", rel), ("acc", drop)) for label in rel}
    rows = []
    for j, eps in enumerate(EPS_GRID):
        row = [format_eps(eps)]
        for kind in ("loss", "acc"):
            for label in ("Transformer", "PDE"):
                src = rel if kind == "loss" else drop
                row.append(cell(est([v[j] for v in src[label].values()])))
        rows.append(row)
    sec.tables.append(Table(["ε", "rel. loss increase T", "rel. loss increase PDE", "accuracy drop T",
                             "accuracy drop PDE"], rows, "Seed means with 95 % bootstrap intervals."))  # fmt: skip
    amp_rows = []
    for la in NEWSGROUPS_LAYERS:
        amp_rows.append([la] + [cell(est(results.values(s, "amplification", la))) for _, s in MODELS])
    sec.tables.append(Table(["layer", "amplification T", "amplification PDE"], amp_rows,
                            "||Δh_l|| / ||Δh_0|| at ε = 1e-2 (no paper value, no verdict)."))  # fmt: skip
    for kind, ylabel in (("loss", "relative loss increase"), ("acc", "accuracy drop")):
        series = [(label, *stats[(label, kind)]) for label in ("Transformer", "PDE") if len(stats[(label, kind)][0])]
        sec.figures.append(FigureSpec(f"{kind}_vs_eps", f"{ylabel.capitalize()} vs ε (95 % intervals over seeds)",
                                      figures.eps_curves, {"eps": list(EPS_GRID), "series": series, "ylabel": ylabel,
                                                           "marks": [1e-3, 1e-2]}))  # fmt: skip
    return sec
