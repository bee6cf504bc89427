"""Rules of the v2 stabilizer claims on MNIST: sweeps across the stability boundary without gradient clipping.

A divergence-rate difference is judged twice, and holds only when both agree: on the run counts (Newcombe's interval,
with Fisher's exact one-sided p < 0.025), and per seed (a seed's rate over the cells in one setting minus in the
other, paired t interval over seeds), because a seed's runs share their draws and are not independent.

A run counts as diverged by the verdict of :mod:`pdelightning_reproduce.divergence` on its loss series (training made
the loss non-finite, or above ``LOSS_MULTIPLE`` x its first loss after ``MIN_UPDATES`` updates); runs without that
verdict (undecided, broken at initialisation, or recorded before it) are not counted.
"""

from __future__ import annotations

from pdelightning_reproduce import paper
from pdelightning_reproduce.rules.base import PROBE, AllOf, AtLeast, Criterion, Quantity, Rule

DRIFT_RATIO = 0.5
DRIFT_MIN_DEPTHS = 2
#: A no-residual network counts as trained (its drift is read) when its probe-set accuracy interval lies above this
#: (MNIST chance is 0.1; v2's no-residual nets ended at 0.10-0.17).
DRIFT_MIN_ACC = 0.5

_RATE = (
    "diverged as judged by pdelightning_reproduce.divergence from each run's loss series (runs it cannot judge not "
    "counted); Newcombe interval of the pooled rate difference on the run counts (Fisher's exact one-sided "
    "p < 0.025 needed to hold), enveloped with the paired t interval of the per-seed rate differences"
)

RULES: tuple[Rule, ...] = (
    Rule(
        id="v2.no_residual_drift",
        section="ablations",
        claim="No residual connections -> catastrophic representational drift",
        paper=paper.V2_NO_RESIDUAL.text,
        source=paper.V2_SOURCE,
        quantities=(
            Quantity(
                "cka_ratio",
                "linear CKA (unbiased) of the last layer's pooled representation to the embedding's "
                f"{PROBE} at the final step, `sweep_no_residual` over `sweep_transformer` (Fieller interval of the "
                "ratio of seed means) at the cell of each depth with the lowest learning rate; diverged runs excluded",
                valid=(DRIFT_MIN_ACC, 1.0),
                valid_reason=f"the no-residual nets must have trained (probe-set accuracy above {DRIFT_MIN_ACC}); "
                "the drift of an untrained net says nothing about residual connections",
            ),
            Quantity(
                "erank_ratio",
                "effective rank of the last layer's centred token matrix (mean over the probe set), same ratio, "
                "cells and validity",
                valid=(DRIFT_MIN_ACC, 1.0),
                valid_reason="as for cka_ratio",
            ),
        ),
        test=AtLeast(
            DRIFT_MIN_DEPTHS,
            tuple(
                AllOf(
                    (
                        Criterion("cka_ratio", "<", DRIFT_RATIO, f"L{d}"),
                        Criterion("erank_ratio", "<", DRIFT_RATIO, f"L{d}"),
                    )
                )
                for d in (6, 12, 24)
            ),
        ),
        changes="drift as CKA to the embedding and rank collapse; Fieller intervals; read only on nets that trained",
        previous=("No residual → catastrophic representational drift",),
    ),
    Rule(
        id="v2.no_layernorm_explosive",
        section="ablations",
        claim="No LayerNorm -> unstable, explosive training",
        paper=paper.V2_NO_LAYERNORM.text,
        source=paper.V2_SOURCE,
        quantities=(
            Quantity(
                "divergence_rate_diff",
                "share of diverged runs over the depth x lr cells that ran, `sweep_no_layernorm` minus "
                f"`sweep_transformer` (same cells, same seeds); {_RATE}",
            ),
        ),
        test=Criterion("divergence_rate_diff", ">", 0.0),
        changes="no gradient clipping; depth x learning-rate sweep; exact and seed-paired intervals",
        previous=("No LayerNorm → unstable, explosive training",),
    ),
    Rule(
        id="v2.pde_unstable",
        section="ablations",
        claim="The PDE simulator without stabilizers is unstable (vs the same PDE with them)",
        paper=paper.V2_PDE_UNSTABLE.text,
        source=paper.V2_SOURCE,
        quantities=(
            Quantity(
                "divergence_rate_diff",
                "share of diverged runs over the PDE cells that ran in both (Δt cells, or v2's eq. (21) targets), "
                f"`sweep_pde` minus `sweep_pde_stabilized`; {_RATE}",
            ),
        ),
        test=Criterion("divergence_rate_diff", ">", 0.0),
        changes="Δt chosen so eq. (21) at initialisation spans 0.3-3; no clipping; exact and seed-paired intervals",
        previous=("PDE without stabilizers unstable vs with",),
    ),
    Rule(
        id="v2.eq21_predicts",
        section="ablations",
        claim="Eq. (21) > 1 at initialisation -> unstable training of the PDE simulator",
        paper="Theorem 2: the explicit scheme is stable when 2DΔt/Δx² + αΔt||W^O||₂ <= 1 (eq. 21)",
        source="v1 appendix, eq. (21)",
        quantities=(
            Quantity(
                "divergence_rate_diff",
                "`sweep_pde`: share of diverged runs among the runs whose eq. (21) coefficient measured on their "
                "step-0 weights (maximum over steps) is > 1 minus among those where it is <= 1, every cell that ran; "
                f"{_RATE}",
            ),
        ),
        test=Criterion("divergence_rate_diff", ">", 0.0),
        changes="new in v2; exact and seed-paired intervals in v3",
    ),
)
