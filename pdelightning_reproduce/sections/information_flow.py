"""Information flow on MNIST: inter-layer correlation (Table 2) and same-layer correlation across models (Table 3)."""

from __future__ import annotations

from pdelightning_reproduce import figures, paper
from pdelightning_reproduce.rules import BY_ID, TABLE2_LAYERS, TABLE3_LAYERS
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
from pdelightning_reproduce.verdicts import Estimate, claim_result, difference_of_means, fmt

MODELS = (("Transformer", "mnist_transformer", paper.TABLE2_TRANSFORMER, "t2.transformer"),
          ("PDE", "mnist_pde", paper.TABLE2_PDE, "t2.pde"))  # fmt: skip
PAIR, CEILING, SHARED = (
    "pair_pde_vs_transformer",
    "pair_transformer_vs_transformer",
    "pair_pde_vs_transformer_shared_init",
)
ACC = (("Transformer", "mnist_transformer"), ("PDE", "mnist_pde"))


def _pair_label(j: int) -> str:
    """The paper's label of the j-th consecutive pair (0-based): "1-2" ... "9-10"."""
    return f"{j + 1}-{j + 2}"


def table2(results: Results) -> Section:
    """Table 2: Pearson correlation of consecutive layers, for each model (seed means with intervals)."""
    sec = Section("table2", "Information flow: inter-layer correlation (Table 2)")
    sec.intro = (
        f"Paper: {paper.TABLE2_SOURCE}. Ours: Pearson correlation of the pooled representations of consecutive "
        'layers on the probe set at the final checkpoint (`consecutive_corr`; the paper\'s pair "i-(i+1)" is our '
        "blocks.(i-1) → blocks.i, keyed by the later layer). Null: the same at initialisation (step 0)."
    )
    curves, at_init = {}, {}
    for label, s, _values, rid in MODELS:
        final = per_seed(results, s, "consecutive_corr", TABLE2_LAYERS)
        init = per_seed(results, s, "consecutive_corr", TABLE2_LAYERS, stage="init")
        curves[label], at_init[label] = final, init
        lookup: dict[tuple[str, str], Estimate] = {}
        for j, layer in enumerate(TABLE2_LAYERS):
            lookup[("consecutive_corr", layer)] = est([v[j] for v in final.values()])
        change = est([v[-1] - v[0] for v in final.values()])
        lookup[("consecutive_corr_change", "")] = change
        first, last = lookup[("consecutive_corr", TABLE2_LAYERS[0])], lookup[("consecutive_corr", TABLE2_LAYERS[-1])]
        mi = curve_stats(init)[0]
        sec.claims.append(claim_result(
            BY_ID[rid], lookup, ours=f"{cell(first)} → {cell(last)}; last − first {cell(change)}",
            null=f"at initialisation: {fmt(mi[0]) if len(mi) else '—'} → {fmt(mi[-1]) if len(mi) else '—'}",
            accuracy=accuracy_text(results, [(label, s)]), estimates={"change": change},
        ))  # fmt: skip
    lookup = {}
    for j, layer in enumerate(TABLE2_LAYERS):
        pde = [v[j] for v in curves["PDE"].values()]
        tr = [v[j] for v in curves["Transformer"].values()]
        lookup[("consecutive_corr_diff", layer)] = difference_of_means(pde, tr)
    n_above = sum(e.lo > 0 for e in lookup.values() if not e.missing)
    sec.claims.append(claim_result(
        BY_ID["t2.pde_above"], lookup, ours=f"PDE − Transformer interval above 0 at {n_above} of 9 pairs",
        accuracy=accuracy_text(results, ACC),
    ))  # fmt: skip
    rows = []
    stats = {k: curve_stats(v) for k, v in curves.items()}
    init_stats = {k: curve_stats(v) for k, v in at_init.items()}
    cka = {label: per_seed(results, s, "cka_consecutive", TABLE2_LAYERS) for label, s, _, _ in MODELS}
    for j, layer in enumerate(TABLE2_LAYERS):
        row = [_pair_label(j), f"blocks.{j}→{layer}"]
        for label, _, values, _ in MODELS:
            row += [f"{values[j]:.4f}", cell(est([v[j] for v in curves[label].values()])),
                    fmt(init_stats[label][0][j]) if len(init_stats[label][0]) else "—",
                    cell(est([v[j] for v in cka[label].values()]))]  # fmt: skip
        rows.append(row)
    sec.tables.append(Table(
        ["pair (paper)", "ours", "paper T", "ours T", "T at init", "CKA T", "paper PDE", "ours PDE", "PDE at init",
         "CKA PDE"], rows,
        "Seed means with 95 % bootstrap intervals. CKA (linear, unbiased HSIC) of the same pairs has no paper value.",
    ))  # fmt: skip
    series = [(f"ours {k}", *stats[k]) for k in stats if len(stats[k][0])]
    dashed = [(f"{k} at init", *init_stats[k]) for k in init_stats if len(init_stats[k][0])]
    sec.figures.append(FigureSpec(
        "table2_interlayer_correlation", "Table 2: consecutive-layer correlation (ours with 95 % intervals, paper "
        "markers, initialisation dashed)", figures.layer_curves,
        {"labels": [_pair_label(j) for j in range(len(TABLE2_LAYERS))], "series": series,
         "ylabel": "Pearson r", "paper": [("Transformer", paper.TABLE2_TRANSFORMER), ("PDE", paper.TABLE2_PDE)],
         "dashed": dashed},
    ))  # fmt: skip
    return sec


def table3(results: Results) -> Section:
    """Table 3: same-layer Pearson/Spearman of PDE seed s vs Transformer seed s+1, with the T-vs-T ceiling."""
    sec = Section("table3", "Information flow: same-layer correlation, Transformer vs PDE (Table 3)")
    sec.intro = (
        f"Paper: {paper.TABLE3_SOURCE}. Ours: the pair `pde_vs_transformer` (PDE of seed s against the independently "
        "initialised Transformer of seed s+1), correlation of the pooled representations of the same layer on the "
        "probe set, both at their final checkpoints; intervals over the pair units. Beside it, without verdict: "
        "the ceiling (Transformer seed s vs Transformer seed s+1), the shared-initialisation pair (PDE and "
        "Transformer of the SAME seed: the twins the old report compared) and linear CKA."
    )
    table = {}
    for method, _values, rid in (("Pearson", paper.TABLE3_PEARSON, "t3.pearson"),
                                ("Spearman", paper.TABLE3_SPEARMAN, "t3.spearman")):  # fmt: skip
        key = f"{method.lower()}_vs_reference"
        ours = per_seed(results, PAIR, key, TABLE3_LAYERS)
        ceil = per_seed(results, CEILING, key, TABLE3_LAYERS)
        shared = per_seed(results, SHARED, key, TABLE3_LAYERS)
        table[method] = (ours, ceil, shared)
        fall = est([v[0] - v[-1] for v in ours.values()])
        last = est([v[-1] for v in ours.values()])
        first = est([v[0] for v in ours.values()])
        c_first, c_last = est([v[0] for v in ceil.values()]), est([v[-1] for v in ceil.values()])
        sec.claims.append(claim_result(
            BY_ID[rid], {(f"{key}_fall", ""): fall, (key, "blocks.9"): last},
            ours=f"{cell(first)} (layer 1) → {cell(last)} (layer 10); fall {cell(fall)}",
            ceiling=f"Transformer vs Transformer: {cell(c_first)} → {cell(c_last)}",
            null=f"shared initialisation (twins): {fmt(curve_stats(shared)[0][0]) if shared else '—'} → "
                 f"{fmt(curve_stats(shared)[0][-1]) if shared else '—'}",
            accuracy=accuracy_text(results, ACC), estimates={"fall": fall, "last": last},
        ))  # fmt: skip
    cka = [per_seed(results, p, "cka_vs_reference", TABLE3_LAYERS) for p in (PAIR, CEILING)]
    rows = []
    for j, layer in enumerate(TABLE3_LAYERS):
        row = [str(j + 1), layer]
        for method, values, _ in (("Pearson", paper.TABLE3_PEARSON, 0), ("Spearman", paper.TABLE3_SPEARMAN, 0)):
            ours, ceil, shared = table[method]
            row += [f"{values[j]:.4f}"] + [cell(est([v[j] for v in d.values()])) for d in (ours, ceil, shared)]
        row += [cell(est([v[j] for v in d.values()])) for d in cka]
        rows.append(row)
    sec.tables.append(Table(
        ["layer (paper)", "ours", "paper Pearson", "Pearson PDE vs T", "ceiling T vs T", "shared init",
         "paper Spearman", "Spearman PDE vs T", "ceiling T vs T", "shared init", "CKA PDE vs T", "CKA T vs T"], rows,
        "Intervals over pair units (one per model seed).",
    ))  # fmt: skip
    ours, ceil, shared = table["Pearson"]
    series = [(label, *curve_stats(d)) for label, d in (("PDE s vs T s+1", ours), ("shared init (twins)", shared))
              if d]  # fmt: skip
    dashed = [("ceiling T s vs T s+1", *curve_stats(ceil))] if ceil else []
    sec.figures.append(FigureSpec(
        "table3_same_layer_correlation", "Table 3: same-layer Pearson correlation (intervals over pair units)",
        figures.layer_curves,
        {"labels": [str(j + 1) for j in range(10)], "series": series, "ylabel": "Pearson r", "dashed": dashed,
         "paper": [("Pearson", paper.TABLE3_PEARSON)]},
    ))  # fmt: skip
    if not ours:
        sec.notes.append("No `pde_vs_transformer` pair units were analysed.")
    return sec
