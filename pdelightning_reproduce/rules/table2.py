"""Rules of Table 2 (inter-layer correlation of each model)."""

from __future__ import annotations

from pdelightning_reproduce import paper
from pdelightning_reproduce.rules.base import (
    FINAL,
    POOL,
    PROBE,
    TABLE2_LAYERS,
    AllOf,
    AtLeast,
    Criterion,
    Quantity,
    Rule,
)

#: Half-width of the window around each of the paper's values (correlations of 0.7-0.97; a seed's interval at
#: n = 5 is ~0.05-0.08 wide, so the window is on the scale of the seed-to-seed spread).
TABLE2_TOLERANCE = 0.05
TABLE2_MIN_PAIRS = 7


def _table2_rule(rid: str, model: str, setting: str, values: tuple[float, ...], previous: str) -> Rule:
    key = "consecutive_corr"
    windows = tuple(
        Criterion(key, "within", (v - TABLE2_TOLERANCE, v + TABLE2_TOLERANCE), layer)
        for layer, v in zip(TABLE2_LAYERS, values, strict=True)
    )
    return Rule(
        id=rid,
        section="table2",
        claim=f"{model} inter-layer correlation (Table 2)",
        paper=f"{values[0]:.4f} -> {values[-1]:.4f} (pairs 1-2 ... 9-10)",
        source=paper.TABLE2_SOURCE,
        quantities=(
            Quantity(
                key,
                f"`{setting}`: Pearson correlation of the flattened [N, d] representations of blocks.(i-1) and "
                f"blocks.i ({POOL}) {PROBE}, {FINAL}; seed mean and t interval per pair",
            ),
            Quantity(
                f"{key}_change",
                f"`{setting}`: consecutive_corr at blocks.9 minus at blocks.1, per seed; seed mean and t interval",
            ),
        ),
        test=AllOf(
            (
                AtLeast(TABLE2_MIN_PAIRS, windows),
                Criterion(f"{key}_change", ">" if values[-1] > values[0] else "<", 0.0),
            )
        ),
        changes="converged full-MNIST training; intervals instead of seed means",
        previous=(previous,),
    )


RULES: tuple[Rule, ...] = (
    _table2_rule(
        "t2.transformer",
        "Transformer",
        "mnist_transformer",
        paper.TABLE2_TRANSFORMER,
        "Transformer inter-layer correlation (Table 2)",
    ),
    _table2_rule("t2.pde", "PDE", "mnist_pde", paper.TABLE2_PDE, "PDE inter-layer correlation (Table 2)"),
    Rule(
        id="t2.pde_above",
        section="table2",
        claim="PDE inter-layer correlation above the Transformer's",
        paper="at 9 of 9 pairs",
        source=paper.TABLE2_SOURCE,
        quantities=(
            Quantity(
                "consecutive_corr_diff",
                "consecutive_corr of `mnist_pde` minus that of `mnist_transformer` per pair (difference of seed "
                "means, Welch interval)",
            ),
        ),
        test=AtLeast(TABLE2_MIN_PAIRS, tuple(Criterion("consecutive_corr_diff", ">", 0.0, la) for la in TABLE2_LAYERS)),
        changes="converged training; intervals",
        previous=("PDE correlation above the Transformer's",),
    ),
)
