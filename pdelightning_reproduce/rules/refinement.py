"""Rules of the continuum check: halving Δt of the trained PDE model."""

from __future__ import annotations

from pdelightning_reproduce.rules.base import AllOf, Criterion, Quantity, Rule

#: Relative logit distance: the logits of L and 2L steps differ by less than a tenth of their norm.
REFINEMENT_MAX_DISTANCE = 0.10
REFINEMENT_MAX_ACC_CHANGE = 0.01

RULES: tuple[Rule, ...] = (
    Rule(
        id="cont.refinement",
        section="refinement",
        claim="The trained PDE model is a discretised continuum: halving Δt (2L steps) barely changes it",
        paper="u(x, t) evolves by a PDE discretised by explicit Euler steps (eq. 20) with error O(Δt^p) (eq. 24)",
        source="v1 §2, eqs. (20), (24)",
        quantities=(
            Quantity(
                "refine_logit_distance",
                "`mnist_pde`, final checkpoint: ||z_2L - z_L||_F / ||z_L||_F of the logits over the full test split, "
                "z_2L from the same weights run as 2L steps of Δt/2 (each step's weights used twice); t interval",
            ),
            Quantity("refine_acc_change", "test accuracy of the 2L-step model minus the L-step model's; t interval"),
        ),
        test=AllOf(
            (
                Criterion("refine_logit_distance", "<", REFINEMENT_MAX_DISTANCE),
                Criterion("refine_acc_change", "within", (-REFINEMENT_MAX_ACC_CHANGE, REFINEMENT_MAX_ACC_CHANGE)),
            )
        ),
        changes="new in v2 (Sander et al. 2022 ask the same of ResNets); t intervals in v3",
    ),
)
