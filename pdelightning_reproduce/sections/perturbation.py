"""Perturbation sensitivity on 20 Newsgroups (§3.5): loss and accuracy vs ε of noise on the embedding."""

from __future__ import annotations

import math

import numpy as np

from pdelightning.analysis.perturbation import format_eps
from pdelightning_reproduce import figures, paper, stats
from pdelightning_reproduce.rules import (
    BY_ID,
    EPS_GRID,
    NEWSGROUPS_LAYERS,
    PAPER_EPS_RANGE,
    PERTURBATION_FROM_EPS,
    PERTURBATION_GAP,
)
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table, accuracy_text, cell, curve_stats, est
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import MISSING, Estimate, claim_result, difference_of_means, fmt

MODELS = (("Transformer", "newsgroups_transformer"), ("PDE", "newsgroups_pde"))
LABELS = [f"eps={format_eps(e)}" for e in EPS_GRID]
LOW = np.array([e < PERTURBATION_FROM_EPS for e in EPS_GRID])
PAPER_RANGE = np.array([PERTURBATION_FROM_EPS <= e <= PAPER_EPS_RANGE[1] * (1 + 1e-9) for e in EPS_GRID])
LARGE = ~LOW & ~PAPER_RANGE


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


def _stack(curves_by_seed: dict[int, np.ndarray]) -> np.ndarray:
    return np.vstack(list(curves_by_seed.values())) if curves_by_seed else np.zeros((0, len(EPS_GRID)))


def divergence_interval(pde: np.ndarray, transformer: np.ndarray) -> Estimate:
    """log10 of the divergence ε (:func:`divergence_eps`) with an interval from the Welch interval of the gap
    PDE − Transformer at every ε: low = the first ε whose upper limit exceeds ``PERTURBATION_GAP`` (it may have
    diverged there), high = the first ε whose lower limit does (it surely has); ``+inf`` where none does.
    """
    if pde.shape[0] < 2 or transformer.shape[0] < 2:
        return MISSING
    w = stats.welch_diff(pde.T, transformer.T)  # one interval per ε

    def first(mask: np.ndarray) -> float:
        hit = np.nonzero(mask)[0]
        return float(np.log10(EPS_GRID[hit[0]])) if hit.size else math.inf

    n = int(min(pde.shape[0], transformer.shape[0]))
    return Estimate(
        divergence_eps(pde, transformer),
        first(w.high > PERTURBATION_GAP),
        first(w.low > PERTURBATION_GAP),
        n,
        "Welch per ε, inverted over the grid",
    )


def similar_low(results: Results, rel: dict[str, dict[int, np.ndarray]]) -> tuple[Estimate, Estimate, float]:
    """The low-ε difference (Welch, PDE − Transformer of the mean relative loss increase over ε < 1e-3), the same
    divided by the pooled seed-to-seed SD of the relative clean loss, and that SD.
    """
    low = {label: [float(np.nanmean(v[LOW])) for v in rel[label].values()] for label in rel}
    diff = difference_of_means(low["PDE"], low["Transformer"])
    sds = []
    for _, s in MODELS:
        clean = np.array(list(results.per_seed(s, "loss_clean").values()), dtype=float)
        if clean.size > 1 and clean.mean() != 0:
            sds.append(float(np.std(clean / clean.mean(), ddof=1)))
    sd = float(np.sqrt(np.mean(np.square(sds)))) if len(sds) == 2 else math.nan
    if diff.missing or not sd > 0:
        return diff, MISSING, sd
    scaled = Estimate(diff.value / sd, diff.lo / sd, diff.hi / sd, diff.n, f"Welch / pooled seed SD {sd:.3g}")
    return diff, scaled, sd


def perturbation(results: Results) -> Section:
    """The three §3.5 claims (loss), the same claim on accuracy, the ε table and per-layer amplification."""
    sec = Section("perturbation", "Perturbation sensitivity (§3.5)")
    n_pert = results.values("newsgroups_pde", "perturbation_n")
    where = f"the first {int(n_pert[0])} posts of the probe set" if n_pert.size else "the probe set"
    sec.intro = (
        f"Paper: {paper.PERTURBATION_SOURCE}. Ours: Gaussian noise ε × (each sample's embedding RMS) added to the "
        f"embedding of {where}, at the final checkpoint; ε on a grid fixed before the runs (1e-4 to 1e2 in half "
        "decades). Both models end in a LayerNorm, so neither output is bounded by architecture alone. Relative loss "
        "increase = (loss(ε) − clean) / clean; accuracy drop = clean − acc(ε). The paper's claims are judged over "
        "its own ε range (1e-4 to 1e-1 of the input scale; 'faster' over 1e-3 ≤ ε ≤ 1e-1), and the same claims "
        "over ε > 1e-1 separately (large ε: noise comparable to the embedding itself)."
    )
    per_model = {label: curves(results, s) for label, s in MODELS}
    rel = {label: c[0] for label, c in per_model.items()}
    drop = {label: c[1] for label, c in per_model.items()}
    diff, scaled, sd = similar_low(results, rel)
    sec.claims.append(
        claim_result(
            BY_ID["pert.similar_low"],
            {("low_diff_sd", ""): scaled},
            ours=f"mean relative loss increase below ε = 1e-3, PDE − Transformer {cell(diff)} = {cell(scaled)} "
            f"seed-to-seed SDs of the relative clean loss (SD {fmt(sd)})",
            accuracy=accuracy_text(results, MODELS),
            estimates={"diff": diff, "scaled": scaled},
        )
    )
    for rule, key, what, per_seed_curves, mask, scope in (
        (
            "pert.pde_faster_loss",
            "rel_increase_diff",
            "mean relative loss increase",
            rel,
            PAPER_RANGE,
            "1e-3 ≤ ε ≤ 1e-1",
        ),
        (
            "pert.pde_faster_loss_large",
            "rel_increase_diff_large",
            "mean relative loss increase",
            rel,
            LARGE,
            "ε > 1e-1",
        ),
        ("pert.pde_faster_acc", "acc_drop_diff", "mean accuracy drop", drop, PAPER_RANGE, "1e-3 ≤ ε ≤ 1e-1"),
        ("pert.pde_faster_acc_large", "acc_drop_diff_large", "mean accuracy drop", drop, LARGE, "ε > 1e-1"),
    ):
        part = {label: [float(np.mean(v[mask])) for v in c.values()] for label, c in per_seed_curves.items()}
        d = difference_of_means(part["PDE"], part["Transformer"])
        sec.claims.append(
            claim_result(
                BY_ID[rule],
                {(key, ""): d},
                ours=f"{what} over {scope}: PDE {cell(est(part['PDE']))}, Transformer "
                f"{cell(est(part['Transformer']))}; difference {cell(d)}",
                accuracy=accuracy_text(results, MODELS),
                estimates={"diff": d},
            )
        )
    div = divergence_interval(_stack(rel["PDE"]), _stack(rel["Transformer"]))
    sec.claims.append(
        claim_result(
            BY_ID["pert.divergence_near"],
            {("log10_divergence_eps", ""): div},
            ours=f"log10 ε of divergence {cell(div)} (+inf: nowhere on the grid)",
            accuracy=accuracy_text(results, MODELS),
            estimates={"log10_eps": div},
        )
    )
    stats = {(label, kind): curve_stats(d[label]) for kind, d in (("loss", rel), ("acc", drop)) for label in rel}
    rows = []
    for j, eps in enumerate(EPS_GRID):
        row = [format_eps(eps)]
        for kind in ("loss", "acc"):
            for label in ("Transformer", "PDE"):
                src = rel if kind == "loss" else drop
                row.append(cell(est([v[j] for v in src[label].values()])))
        rows.append(row)
    sec.tables.append(
        Table(
            ["ε", "rel. loss increase T", "rel. loss increase PDE", "accuracy drop T", "accuracy drop PDE"],
            rows,
            "Seed means with 95 % t intervals.",
        )
    )
    amp_rows = []
    for la in NEWSGROUPS_LAYERS:
        amp_rows.append([la] + [cell(est(results.values(s, "amplification", la))) for _, s in MODELS])
    sec.tables.append(
        Table(
            ["layer", "amplification T", "amplification PDE"],
            amp_rows,
            "||Δh_l|| / ||Δh_0|| at ε = 1e-2 (no paper value, no verdict).",
        )
    )
    for kind, ylabel in (("loss", "relative loss increase"), ("acc", "accuracy drop")):
        series = [(label, *stats[(label, kind)]) for label in ("Transformer", "PDE") if len(stats[(label, kind)][0])]
        sec.figures.append(
            FigureSpec(
                f"{kind}_vs_eps",
                f"{ylabel.capitalize()} vs ε (95 % intervals over seeds)",
                figures.eps_curves,
                {"eps": list(EPS_GRID), "series": series, "ylabel": ylabel, "marks": [1e-3, 1e-2]},
            )
        )
    return sec
