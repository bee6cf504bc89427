"""Gradient flow on 20 Newsgroups (§3.4): normalised, scale-free comparisons; absolute decades are context only."""

from __future__ import annotations

import math

import numpy as np

from pdelightning_reproduce import figures, paper
from pdelightning_reproduce.rules import BY_ID, NEWSGROUPS_LAYERS
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table, accuracy_text, cell, curve_stats, est
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import ClaimResult, claim_result, difference_of_means, log10_ratio_of_means

MODELS = (
    ("Transformer", "newsgroups_transformer"),
    ("PDE", "newsgroups_pde"),
    ("§3.4 linear PDE", "newsgroups_pde_linear"),
)
#: The PDE models compared with the Transformer, with their two rules: ours, and the paper's §3.4 model.
COMPARED = (
    ("PDE", "newsgroups_pde", "grad.pde_higher", "grad.pde_first_layer"),
    ("§3.4 linear PDE", "newsgroups_pde_linear", "grad.linear_higher", "grad.linear_first_layer"),
)


def median_over_training(results: Results, setting: str, quantity: str) -> dict[int, np.ndarray]:
    """``seed -> per-layer median over the checkpoints after step 0`` of a per-layer quantity."""
    out = {}
    for seed in results.seeds(setting):
        row = []
        for la in NEWSGROUPS_LAYERS:
            steps, values = results.trajectory(setting, quantity, la, seed)
            v = values[(steps > 0) & np.isfinite(values)]
            row.append(float(np.median(v)) if v.size else math.nan)
        if np.isfinite(row).any():
            out[seed] = np.array(row)
    return out


def _model_claims(
    results: Results, rel: dict[str, dict[int, np.ndarray]], label: str, s: str, higher: str, first_layer: str
) -> list[ClaimResult]:
    """A PDE model's two model-vs-model claims against the Transformer (``rel``: relative gradients per label)."""
    layer_mean = {m: [float(np.nanmean(v)) for v in rel[m].values()] for m in (label, "Transformer")}
    ratio = log10_ratio_of_means(layer_mean[label], layer_mean["Transformer"])
    acc = [("Transformer", "newsgroups_transformer"), (label, s)]
    first = est([math.log10(v[0] / np.nanmax(v[1:])) for v in rel[label].values() if np.all(v > 0)])
    spread = {
        m: [math.log10(np.nanmax(v) / np.nanmin(v)) for v in rel[m].values() if np.all(v > 0)]
        for m in (label, "Transformer")
    }
    d_spread = difference_of_means(spread[label], spread["Transformer"])
    return [
        claim_result(
            BY_ID[higher],
            {("log10_relgrad_ratio", ""): ratio},
            ours=f"layer-mean relative gradient: {label} {cell(est(layer_mean[label]))}, Transformer "
            f"{cell(est(layer_mean['Transformer']))}; log10 ratio {cell(ratio)}",
            accuracy=accuracy_text(results, acc),
            estimates={"ratio": ratio},
        ),
        claim_result(
            BY_ID[first_layer],
            {("log10_first_over_other", ""): first, ("spread_diff", ""): d_spread},
            ours=f"{label} log10(blocks.0 / largest other) {cell(first)}; log10(max/min) spread {label} "
            f"{cell(est(spread[label]))} vs Transformer {cell(est(spread['Transformer']))}",
            accuracy=accuracy_text(results, acc),
            estimates={"first": first, "spread": d_spread},
        ),
    ]


def gradients(results: Results) -> Section:
    """The §3.4 claims on relative gradients ``||dCE/dθ_l|| / ||θ_l||``."""
    sec = Section("gradients", "Gradient flow (§3.4)")
    sec.intro = (
        f"Paper: {paper.GRADIENT_SOURCE}. Ours: at every analysed checkpoint, the gradient of the cross-entropy on a "
        "fixed batch of training-split samples (eval mode) for each block's parameters; the relative gradient "
        "||dCE/dθ_l|| / ||θ_l|| and the mean absolute gradient per entry; per run the median over the checkpoints "
        "after step 0. Absolute magnitudes depend on width, learning rate, loss scale and the IB weight (none stated "
        "by the paper), so the decade claims are not comparable; the model-vs-model and layer-vs-layer claims use "
        "the relative gradient, which is scale-free. The paper's §3.4 PDE is 'embedding and multiple linear "
        "layers' (`newsgroups_pde_linear`, no attention): both model-vs-model claims are read for it too, beside "
        "ours (the attention + FFN 'full PDE')."
    )
    rel = {label: median_over_training(results, s, "relgrad") for label, s in MODELS}
    absm = {label: median_over_training(results, s, "grad_abs_mean") for label, s in MODELS}
    for label, rid, rng in (
        ("Transformer", "grad.range_transformer", paper.GRADIENT_RANGE_TRANSFORMER),
        ("PDE", "grad.range_pde", paper.GRADIENT_RANGE_PDE),
    ):
        m = curve_stats(absm[label])[0]
        sec.claims.append(
            claim_result(
                BY_ID[rid],
                {},
                ours=(
                    f"mean |gradient| per entry, per block: {', '.join(f'{x:.2e}' for x in m)} "
                    f"(paper range {rng[0]:g}–{rng[1]:g})"
                )
                if len(m)
                else "—",
                accuracy=accuracy_text(results, [(label, dict(MODELS)[label])]),
            )
        )
    for label, s, higher, first_layer in COMPARED:
        sec.claims.extend(_model_claims(results, rel, label, s, higher, first_layer))
    rows = []
    for j, la in enumerate(NEWSGROUPS_LAYERS):
        row = [la]
        for label, _ in MODELS:
            row += [cell(est([v[j] for v in rel[label].values()])), cell(est([v[j] for v in absm[label].values()]))]
        rows.append(row)
    sec.tables.append(
        Table(
            [
                "layer",
                "relative grad T",
                "mean |grad| T",
                "relative grad PDE",
                "mean |grad| PDE",
                "relative grad §3.4 PDE",
                "mean |grad| §3.4 PDE",
            ],
            rows,
            "Medians over training per run; seed means with 95 % t intervals.",
        )
    )
    series = [(label, *curve_stats(rel[label])) for label, _ in MODELS if rel[label]]
    sec.figures.append(
        FigureSpec(
            "gradient_magnitude",
            "Relative gradient ||dCE/dθ_l|| / ||θ_l|| per block (median over training)",
            figures.layer_curves,
            {"labels": list(NEWSGROUPS_LAYERS), "series": series, "ylabel": "relative gradient", "logy": True},
        )
    )
    return sec
