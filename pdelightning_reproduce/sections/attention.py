"""Attention on MNIST (§3.2): PDE seed s vs Transformer seed s+1, per layer, beside the nulls and the ceiling."""

from __future__ import annotations

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
    est,
    per_seed,
)
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import claim_result

PAIR, CEILING, SHARED = (
    "pair_pde_vs_transformer",
    "pair_transformer_vs_transformer",
    "pair_pde_vs_transformer_shared_init",
)
NULLS = ("uniform", "shuffled", "random_init")
ACC = (("Transformer", "mnist_transformer"), ("PDE", "mnist_pde"))


def _layer_means(values: dict[int, np.ndarray]) -> dict[int, float]:
    return {s: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for s, v in values.items()}


def _vs_null(results: Results, metric: str, pick: str) -> dict[int, float]:
    """Per pair unit: layer-mean metric minus the layer-mean of the strongest null (``max`` or ``min``)."""
    ours = _layer_means(per_seed(results, PAIR, metric, MNIST_LAYERS))
    nulls = [_layer_means(per_seed(results, PAIR, f"null_{n}_{metric}", MNIST_LAYERS)) for n in NULLS]
    out = {}
    for s, v in ours.items():
        cand = [d[s] for d in nulls if s in d and np.isfinite(d[s])]
        if cand:
            out[s] = v - (max(cand) if pick == "max" else min(cand))
    return out


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
    cos = per_seed(results, PAIR, "cosine", MNIST_LAYERS)
    lookup = {("cosine", la): est([v[j] for v in cos.values()]) for j, la in enumerate(MNIST_LAYERS)}
    d_null = est(list(_vs_null(results, "cosine", "max").values()))
    lookup[("cosine_minus_null", "")] = d_null
    mean_cos = est(list(_layer_means(cos).values()))
    ceil = est(list(_layer_means(per_seed(results, CEILING, "cosine", MNIST_LAYERS)).values()))
    shared = est(list(_layer_means(per_seed(results, SHARED, "cosine", MNIST_LAYERS)).values()))
    null_means = {n: est(list(_layer_means(per_seed(results, PAIR, f"null_{n}_cosine", MNIST_LAYERS)).values()))
                  for n in NULLS}  # fmt: skip
    sec.claims.append(claim_result(
        BY_ID["att.cosine"], lookup,
        ours=f"layer mean {cell(mean_cos)}; minus the strongest null {cell(d_null)}",
        null="; ".join(f"{n} {cell(e)}" for n, e in null_means.items()),
        ceiling=f"Transformer vs Transformer {cell(ceil)}; shared initialisation (twins) {cell(shared)}",
        accuracy=accuracy_text(results, ACC), estimates={"mean": mean_cos, "ceiling": ceil},
    ))  # fmt: skip
    kl = per_seed(results, PAIR, "kl", MNIST_LAYERS)
    kl_mean = est(list(_layer_means(kl).values()))
    kl_null = est(list(_vs_null(results, "kl", "min").values()))
    kl_ceil = est(list(_layer_means(per_seed(results, CEILING, "kl", MNIST_LAYERS)).values()))
    kl_nulls = {n: est(list(_layer_means(per_seed(results, PAIR, f"null_{n}_kl", MNIST_LAYERS)).values()))
                for n in NULLS}  # fmt: skip
    sec.claims.append(claim_result(
        BY_ID["att.kl"], {("kl", ""): kl_mean, ("kl_minus_null", ""): kl_null},
        ours=f"layer mean {cell(kl_mean)}; minus the closest null {cell(kl_null)}",
        null="; ".join(f"{n} {cell(e)}" for n, e in kl_nulls.items()),
        ceiling=f"Transformer vs Transformer {cell(kl_ceil)}", accuracy=accuracy_text(results, ACC),
        estimates={"mean": kl_mean},
    ))  # fmt: skip
    cols = {
        "cosine": cos, "ceiling": per_seed(results, CEILING, "cosine", MNIST_LAYERS),
        "shared init": per_seed(results, SHARED, "cosine", MNIST_LAYERS),
        **{f"null {n}": per_seed(results, PAIR, f"null_{n}_cosine", MNIST_LAYERS) for n in NULLS},
        "KL": kl, "KL ceiling": per_seed(results, CEILING, "kl", MNIST_LAYERS),
        "JS": per_seed(results, PAIR, "js", MNIST_LAYERS),
        "entropy PDE": per_seed(results, PAIR, "entropy_model", MNIST_LAYERS),
        "entropy T": per_seed(results, PAIR, "entropy_reference", MNIST_LAYERS),
    }  # fmt: skip
    rows = [[la] + [cell(est([v[j] for v in d.values()])) for d in cols.values()] for j, la in enumerate(MNIST_LAYERS)]
    caption = (f"Paper: cosine {paper.ATTENTION_COSINE}, KL {paper.ATTENTION_KL}, every layer > "
               f"{paper.ATTENTION_LAYER_COSINE_MIN}. Entropies in nats.")  # fmt: skip
    sec.tables.append(Table(["layer", *cols], rows, caption))
    series = [("PDE vs T", *curve_stats(cos))] if cos else []
    dashed = [(name, *curve_stats(cols[name])) for name in ("ceiling", "shared init", *(f"null {n}" for n in NULLS))
              if cols[name]]  # fmt: skip
    sec.figures.append(FigureSpec(
        "attention_cosine_by_layer", "Attention cosine per layer: PDE vs Transformer, the ceiling, the twins and the "
        "nulls (95 % intervals over pair units)", figures.layer_curves,
        {"labels": list(MNIST_LAYERS), "series": series, "dashed": dashed, "ylabel": "cosine",
         "paper": [("every layer > 0.98", [paper.ATTENTION_LAYER_COSINE_MIN] * len(MNIST_LAYERS))]},
    ))  # fmt: skip
    return sec
