"""Information flow on MNIST: inter-layer correlation (Table 2) and same-layer correlation across models (Table 3)."""

from __future__ import annotations

from pdelightning_reproduce import figures, paper
from pdelightning_reproduce.rules import BY_ID, TABLE2_LAYERS, TABLE3_LAYERS, TABLE3_METHODS, TABLE3_PAIRS
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
    ClaimResult,
    Estimate,
    claim_result,
    difference_of_means,
    fmt,
    invalid_unless,
    paired_difference,
    ratio_of_means,
)

MODELS = (
    ("Transformer", "mnist_transformer", paper.TABLE2_TRANSFORMER, "t2.transformer"),
    ("PDE", "mnist_pde", paper.TABLE2_PDE, "t2.pde"),
)
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
        sec.claims.append(
            claim_result(
                BY_ID[rid],
                lookup,
                ours=f"{cell(first)} → {cell(last)}; last − first {cell(change)}",
                null=f"at initialisation: {fmt(mi[0]) if len(mi) else '—'} → {fmt(mi[-1]) if len(mi) else '—'}",
                accuracy=accuracy_text(results, [(label, s)]),
                estimates={"change": change},
            )
        )
    lookup = {}
    for j, layer in enumerate(TABLE2_LAYERS):
        pde = [v[j] for v in curves["PDE"].values()]
        tr = [v[j] for v in curves["Transformer"].values()]
        lookup[("consecutive_corr_diff", layer)] = difference_of_means(pde, tr)
    n_above = sum(e.lo > 0 for e in lookup.values() if not e.missing)
    sec.claims.append(
        claim_result(
            BY_ID["t2.pde_above"],
            lookup,
            ours=f"PDE − Transformer interval above 0 at {n_above} of 9 pairs",
            accuracy=accuracy_text(results, ACC),
        )
    )
    rows = []
    stats = {k: curve_stats(v) for k, v in curves.items()}
    init_stats = {k: curve_stats(v) for k, v in at_init.items()}
    cka = {label: per_seed(results, s, "cka_consecutive", TABLE2_LAYERS) for label, s, _, _ in MODELS}
    for j, layer in enumerate(TABLE2_LAYERS):
        row = [_pair_label(j), f"blocks.{j}→{layer}"]
        for label, _, values, _ in MODELS:
            row += [
                f"{values[j]:.4f}",
                cell(est([v[j] for v in curves[label].values()])),
                fmt(init_stats[label][0][j]) if len(init_stats[label][0]) else "—",
                cell(est([v[j] for v in cka[label].values()])),
            ]
        rows.append(row)
    sec.tables.append(
        Table(
            [
                "pair (paper)",
                "ours",
                "paper T",
                "ours T",
                "T at init",
                "CKA T",
                "paper PDE",
                "ours PDE",
                "PDE at init",
                "CKA PDE",
            ],
            rows,
            "Seed means with 95 % t intervals. CKA (linear, unbiased HSIC) of the same pairs has no paper value.",
        )
    )
    series = [(f"ours {k}", *stats[k]) for k in stats if len(stats[k][0])]
    dashed = [(f"{k} at init", *init_stats[k]) for k in init_stats if len(init_stats[k][0])]
    sec.figures.append(
        FigureSpec(
            "table2_interlayer_correlation",
            "Table 2: consecutive-layer correlation (ours with 95 % intervals, paper markers, initialisation dashed)",
            figures.layer_curves,
            {
                "labels": [_pair_label(j) for j in range(len(TABLE2_LAYERS))],
                "series": series,
                "ylabel": "Pearson r",
                "paper": [("Transformer", paper.TABLE2_TRANSFORMER), ("PDE", paper.TABLE2_PDE)],
                "dashed": dashed,
            },
        )
    )
    return sec


def table3_claim(
    results: Results, method: str, ceiling_seeds: list[int], suffix: str = "", pair: str = PAIR
) -> tuple[ClaimResult, tuple]:
    """One Table 3 rule (Pearson, Spearman or CKA) on ``pair`` (rule ``t3.<method><suffix>``): the fall over depth
    and the last layer against the ceiling of disjoint Transformer-Transformer units; also returns ``(ours,
    ceiling, shared)`` per seed for the table.
    """
    key = f"{method.lower()}_vs_reference"
    ours = per_seed(results, pair, key, TABLE3_LAYERS)
    ceil = only(per_seed(results, CEILING, key, TABLE3_LAYERS), ceiling_seeds)
    shared = per_seed(results, SHARED, key, TABLE3_LAYERS)
    fall = paired_difference([v[0] for v in ours.values()], [v[-1] for v in ours.values()])
    first, last = est([v[0] for v in ours.values()]), est([v[-1] for v in ours.values()])
    c_first, c_last = est([v[0] for v in ceil.values()]), est([v[-1] for v in ceil.values()])
    rel = ratio_of_means([v[-1] for v in ours.values()], [v[-1] for v in ceil.values()])
    rel = invalid_unless(
        rel,
        c_last.missing or c_last.lo > 0,
        (
            f"the ceiling at blocks.9 is {cell(c_last)}, from one disjoint pair unit: no interval, so it is not known "
            "to be above 0"
            if c_last.n < 2
            else f"the ceiling at blocks.9 is {cell(c_last)} (n={c_last.n}), not known to be above 0: two Transformers "
            f"of different seeds are not shown similar by {method} either, so it cannot show a PDE-Transformer gap"
        ),
    )
    claim = claim_result(
        BY_ID[f"t3.{method.lower()}{suffix}"],
        {(f"{key}_fall", ""): fall, (f"{key}_end_rel", ""): rel},
        ours=f"{cell(first)} (layer 1) → {cell(last)} (layer 10); fall {cell(fall)}; layer 10 over the ceiling "
        f"{cell(rel)}",
        ceiling=f"Transformer vs Transformer, {len(ceiling_seeds)} disjoint units: {cell(c_first)} → {cell(c_last)}",
        null=f"shared initialisation (twins): {fmt(curve_stats(shared)[0][0]) if shared else '—'} → "
        f"{fmt(curve_stats(shared)[0][-1]) if shared else '—'}",
        accuracy=accuracy_text(results, ACC),
        estimates={"fall": fall, "last": last, "end_rel": rel},
        missing_reason="" if ours else f"not measured yet: no `{pair}` pair units were analysed",
    )
    return claim, (ours, ceil, shared)


def table3(results: Results) -> Section:
    """Table 3: same-layer Pearson / Spearman / CKA of PDE seed s vs Transformer seed s+1, against the ceiling of
    disjoint Transformer-Transformer units.
    """
    sec = Section("table3", "Information flow: same-layer similarity, Transformer vs PDE (Table 3)")
    ceiling_seeds = disjoint_seeds(results, CEILING)
    sec.intro = (
        f"Paper: {paper.TABLE3_SOURCE}. Ours: the pair `pde_vs_transformer` (PDE of seed s against the independently "
        "initialised Transformer of seed s+1), Pearson, Spearman and linear CKA of the pooled representations of the "
        "same layer on the probe set, both at their final checkpoints; intervals over the pair units. Ceiling: "
        f"Transformer seed s vs Transformer seed s+1 on the {len(ceiling_seeds)} DISJOINT units (model seeds "
        f"{', '.join(map(str, ceiling_seeds)) or '—'}; no model in two units). Beside it, without verdict: the "
        "shared-initialisation pair (PDE and Transformer of the SAME seed: the twins the old report compared). The "
        "same rules are applied to the paper's own §3.1 model, a diffusion-only PDE (pair "
        "`pde_diffusion_vs_transformer`, rules `t3.*_diffusion`); ours is the 'full PDE' row."
    )
    table = {}
    for method, _values in TABLE3_METHODS:
        claim, table[method] = table3_claim(results, method, ceiling_seeds)
        sec.claims.append(claim)
    for method, _values in TABLE3_METHODS:  # the paper's own §3.1 model (pdelightning.models.pde_variants)
        suffix, pair, _ = TABLE3_PAIRS[1]
        sec.claims.append(table3_claim(results, method, ceiling_seeds, suffix, f"pair_{pair}")[0])
    rows = []
    for j, layer in enumerate(TABLE3_LAYERS):
        row = [str(j + 1), layer]
        for method, values in TABLE3_METHODS:
            row += [f"{values[j]:.4f}" if values else "—"]
            row += [cell(est([v[j] for v in d.values()])) for d in table[method]]
        rows.append(row)
    headers = ["layer (paper)", "ours"]
    for method, _ in TABLE3_METHODS:
        headers += [f"paper {method}", f"{method} PDE vs T", "ceiling T vs T (disjoint)", "shared init"]
    sec.tables.append(Table(headers, rows, "Intervals over pair units (one per model seed); t intervals."))
    ours, ceil, shared = table["Pearson"]
    series = [(label, *curve_stats(d)) for label, d in (("PDE s vs T s+1", ours), ("shared init (twins)", shared)) if d]
    dashed = [("ceiling T s vs T s+1 (disjoint)", *curve_stats(ceil))] if ceil else []
    sec.figures.append(
        FigureSpec(
            "table3_same_layer_correlation",
            "Table 3: same-layer Pearson correlation (intervals over pair units)",
            figures.layer_curves,
            {
                "labels": [str(j + 1) for j in range(10)],
                "series": series,
                "ylabel": "Pearson r",
                "dashed": dashed,
                "paper": [("Pearson", paper.TABLE3_PEARSON)],
            },
        )
    )
    if not ours:
        sec.notes.append("No `pde_vs_transformer` pair units were analysed.")
    return sec
