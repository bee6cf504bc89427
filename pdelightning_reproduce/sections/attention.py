"""Attention on MNIST (§3.2): PDE seed s vs Transformer seed s+1, per layer, beside the nulls and the ceiling."""

from __future__ import annotations

import math

import numpy as np

from pdelightning_reproduce import figures, paper
from pdelightning_reproduce.rules import BY_ID, MNIST_LAYERS
from pdelightning_reproduce.sections.common import (
    FigureSpec,
    Section,
    Table,
    accuracy_text,
    cell,
    curve_stats,
    disjoint_seeds,
    est,
    only,
    per_seed,
)
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import (
    MISSING,
    ClaimResult,
    Estimate,
    claim_result,
    difference_of_means,
    fmt,
    invalid_unless,
    paired_difference,
)

PAIR, CEILING, SHARED = (
    "pair_pde_vs_transformer",
    "pair_transformer_vs_transformer",
    "pair_pde_vs_transformer_shared_init",
)
DIFFUSION = "pair_pde_diffusion_vs_transformer"
NULLS = ("uniform", "shuffled", "random_init")
ACC = (("Transformer", "mnist_transformer"), ("PDE", "mnist_pde"))
DIFFUSION_ACC = (("Transformer", "mnist_transformer"), ("diffusion-only PDE", "mnist_pde_diffusion"))


def _layer_means(values: dict[int, np.ndarray]) -> dict[int, float]:
    return {s: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for s, v in values.items()}


def _strongest(nulls: dict[str, dict[int, float]], pick: str) -> dict[int, float]:
    """Per pair unit: the strongest null (``max`` cosine or ``min`` KL over the nulls)."""
    out = {}
    for s in set().union(*(set(d) for d in nulls.values())):
        cand = [d[s] for d in nulls.values() if s in d and np.isfinite(d[s])]
        if cand:
            out[s] = max(cand) if pick == "max" else min(cand)
    return out


def relative_gap(
    ours: list[float], ceiling: list[float], null: list[float], metric: str
) -> tuple[Estimate, Estimate, Estimate]:
    """The gap to the ceiling (Welch), the null-to-ceiling spread (Welch) and their ratio: the gap's interval over
    the spread's point value; 0 = at the ceiling, 1 = at the null. Cosine: higher is closer; KL: lower is closer.

    Example::

        >>> g, s, r = relative_gap([0.3, 0.31, 0.29], [0.5, 0.52, 0.48], [0.35, 0.34, 0.36], "cosine")
        >>> round(r.value, 3), r.lo > 1
        (1.333, True)
    """
    sign = 1.0 if metric == "cosine" else -1.0
    gap = difference_of_means(np.multiply(sign, ceiling), np.multiply(sign, ours))
    spread = difference_of_means(np.multiply(sign, ceiling), np.multiply(sign, null))
    if gap.missing or spread.missing:
        return gap, spread, MISSING
    if not spread.value > 0:
        rel = Estimate(math.nan, math.nan, math.nan, gap.n, gap.method)
        return (
            gap,
            spread,
            invalid_unless(rel, False, f"the ceiling is no closer than the strongest null ({cell(spread)})"),
        )
    rel = Estimate(
        gap.value / spread.value,
        gap.lo / spread.value,
        gap.hi / spread.value,
        gap.n,
        f"{gap.method} / null-to-ceiling spread {fmt(spread.value)}",
    )
    return gap, spread, rel


def _claims(
    results: Results, pair: str, suffix: str, acc: tuple[tuple[str, str], ...], disjoint: list[int]
) -> list[ClaimResult]:
    """The cosine and KL claims of one model-vs-Transformer pair (``att.cosine{suffix}``, ``att.kl{suffix}``)."""
    out = []
    low = results.values(pair, "mixing_min")
    negative = low.size and float(np.nanmin(low)) < 0
    missing = (
        f"the diffusion steps' mixing matrices have negative entries (smallest {fmt(float(np.nanmin(low)))}): they "
        "are no distribution, eq. (21) with α = 0 fails"
        if negative
        else ""
    )
    for metric, rid, pick in (("cosine", "att.cosine", "max"), ("kl", "att.kl", "min")):
        values = per_seed(results, pair, metric, MNIST_LAYERS)
        ours = _layer_means(values)
        ceil = _layer_means(only(per_seed(results, CEILING, metric, MNIST_LAYERS), disjoint))
        nulls = {n: _layer_means(per_seed(results, pair, f"null_{n}_{metric}", MNIST_LAYERS)) for n in NULLS}
        null = _strongest(nulls, pick)
        vs_null = paired_difference([ours[k] for k in null if k in ours], [null[k] for k in null if k in ours])
        gap, spread, rel = relative_gap(list(ours.values()), list(ceil.values()), list(null.values()), metric)
        shared = est(list(_layer_means(per_seed(results, SHARED, metric, MNIST_LAYERS)).values()))
        out.append(
            claim_result(
                BY_ID[rid + suffix],
                {(f"{metric}_gap_rel", ""): rel, (f"{metric}_minus_null", ""): vs_null},
                ours=f"layer mean {cell(est(list(ours.values())))}; minus the strongest null {cell(vs_null)}; gap to "
                f"the ceiling {cell(gap)} over the "
                f"null-to-ceiling spread {cell(spread)}: relative gap {cell(rel)}",
                null="; ".join(f"{n} {cell(est(list(d.values())))}" for n, d in nulls.items())
                + f"; strongest per unit {cell(est(list(null.values())))}",
                ceiling=f"Transformer vs Transformer (disjoint units) {cell(est(list(ceil.values())))}; shared "
                f"initialisation (twins) {cell(shared)}",
                accuracy=accuracy_text(results, acc),
                estimates={"mean": est(list(ours.values())), "ceiling": est(list(ceil.values())), "rel": rel},
                missing_reason=missing,
            )
        )
    return out


def diffusion_null_note(results: Results) -> str:
    """What the nulls can say about the diffusion-only model: its mixing is the same for every input, so the
    reference "on another probe sample" null is the measure itself (permuting the samples changes nothing).
    """
    ours = est(list(_layer_means(per_seed(results, DIFFUSION, "cosine", MNIST_LAYERS)).values()))
    others = {
        n: est(list(_layer_means(per_seed(results, DIFFUSION, f"null_{n}_cosine", MNIST_LAYERS)).values()))
        for n in NULLS
        if n != "shuffled"
    }
    return (
        "The diffusion-only model's token mixing is the same for every input, so its null 'the reference on another "
        "probe sample' equals its measure by construction (a permutation of the samples changes nothing), and the "
        "strongest null of `att.*_diffusion` is at least the measure. The other nulls decide whether it is closer "
        f"to the Transformer than a null: cosine {cell(ours)} against "
        + ", ".join(f"{n} {cell(e)}" for n, e in others.items())
        + "."
    )


def attention(results: Results) -> Section:
    """The cosine and KL claims of §3.2 and the per-layer table."""
    sec = Section("attention", "Attention: PDE vs Transformer (§3.2)")
    sec.intro = (
        f"Paper: {paper.ATTENTION_SOURCE}. Ours: attention probabilities of every query row on the probe set, the "
        "PDE of seed s against the Transformer of seed s+1 (independent initialisations), both at their final "
        "checkpoints, heads paired per layer by the Hungarian method on cosine. Nulls: the PDE's attention against "
        "uniform attention, against the reference on another probe sample, and against the reference at "
        "initialisation. Ceiling: Transformer seed s vs Transformer seed s+1. KL is KL(PDE ‖ Transformer) in nats."
    )
    disjoint = disjoint_seeds(results, CEILING)
    sec.intro += (
        f" The ceiling uses the {len(disjoint)} disjoint Transformer-Transformer units (model seeds "
        f"{', '.join(map(str, disjoint)) or '—'}). The rules read the relative gap: 0 = as close as two Transformers, "
        "1 = no closer than the strongest null."
    )
    cos = per_seed(results, PAIR, "cosine", MNIST_LAYERS)
    kl = per_seed(results, PAIR, "kl", MNIST_LAYERS)
    for pair, suffix, acc in ((PAIR, "", ACC), (DIFFUSION, "_diffusion", DIFFUSION_ACC)):
        sec.claims.extend(_claims(results, pair, suffix, acc, disjoint))
    cos_diffusion = per_seed(results, DIFFUSION, "cosine", MNIST_LAYERS)
    if cos_diffusion:
        sec.notes.append(diffusion_null_note(results))
    cols = {
        "cosine": cos,
        "cosine diffusion-only": cos_diffusion,
        "ceiling": only(per_seed(results, CEILING, "cosine", MNIST_LAYERS), disjoint),
        "shared init": per_seed(results, SHARED, "cosine", MNIST_LAYERS),
        **{f"null {n}": per_seed(results, PAIR, f"null_{n}_cosine", MNIST_LAYERS) for n in NULLS},
        "KL": kl,
        "KL ceiling": only(per_seed(results, CEILING, "kl", MNIST_LAYERS), disjoint),
        "JS": per_seed(results, PAIR, "js", MNIST_LAYERS),
        "entropy PDE": per_seed(results, PAIR, "entropy_model", MNIST_LAYERS),
        "entropy T": per_seed(results, PAIR, "entropy_reference", MNIST_LAYERS),
    }
    rows = [[la] + [cell(est([v[j] for v in d.values()])) for d in cols.values()] for j, la in enumerate(MNIST_LAYERS)]
    caption = (
        f"Paper: cosine {paper.ATTENTION_COSINE}, KL {paper.ATTENTION_KL}, every layer > "
        f"{paper.ATTENTION_LAYER_COSINE_MIN}. Entropies in nats."
    )
    sec.tables.append(Table(["layer", *cols], rows, caption))
    series = [("PDE vs T", *curve_stats(cos))] if cos else []
    series += [("diffusion-only PDE vs T", *curve_stats(cos_diffusion))] if cos_diffusion else []
    dashed = [
        (name, *curve_stats(cols[name]))
        for name in ("ceiling", "shared init", *(f"null {n}" for n in NULLS))
        if cols[name]
    ]
    sec.figures.append(
        FigureSpec(
            "attention_cosine_by_layer",
            "Attention cosine per layer: PDE vs Transformer, the ceiling, the twins and the "
            "nulls (95 % intervals over pair units)",
            figures.layer_curves,
            {
                "labels": list(MNIST_LAYERS),
                "series": series,
                "dashed": dashed,
                "ylabel": "cosine",
                "paper": [("every layer > 0.98", [paper.ATTENTION_LAYER_COSINE_MIN] * len(MNIST_LAYERS))],
            },
        )
    )
    return sec
