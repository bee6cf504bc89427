"""Rules of the gradient-flow claims (§3.4): scale-free relative gradients; absolute decades not comparable."""

from __future__ import annotations

import math

from pdelightning_reproduce import paper
from pdelightning_reproduce.rules.base import AllOf, Criterion, Quantity, Rule

GRADIENT_FIRST_LAYER_FACTOR = 2.0

_RULES: tuple[Rule, ...] = (
    Rule(
        id="grad.range_transformer",
        section="gradients",
        claim="Transformer gradients mostly in [1e-4, 1e-3]",
        paper="[1e-4, 1e-3]",
        source=paper.GRADIENT_SOURCE,
        quantities=(),
        test=None,
        not_comparable="an absolute gradient magnitude depends on width, learning rate, loss scale and the IB weight, "
        "none of which the paper states; our value is shown as context",
        previous=("Transformer gradients mostly in [0.0001, 0.001]",),
    ),
    Rule(
        id="grad.range_pde",
        section="gradients",
        claim="PDE gradients mostly in [1e-3, 1e-2]",
        paper="[1e-3, 1e-2]",
        source=paper.GRADIENT_SOURCE,
        quantities=(),
        test=None,
        not_comparable="as for the Transformer's range: absolute magnitudes are not comparable across set-ups",
        previous=("PDE gradients mostly in [0.001, 0.01]",),
    ),
    Rule(
        id="grad.pde_higher",
        section="gradients",
        claim="PDE gradients higher than the Transformer's",
        paper=paper.GRADIENT_PDE_HIGHER.text,
        source=paper.GRADIENT_SOURCE,
        quantities=(
            Quantity(
                "log10_relgrad_ratio",
                "relative gradient of a layer = ||dCE/dθ_l|| / ||θ_l|| (all parameters of block l; CE on GRAD_N "
                "training-split samples, eval mode), median over the checkpoints after step 0, mean over layers; "
                "per seed its log10; `newsgroups_pde` minus `newsgroups_transformer` (Welch interval: the log10 "
                "ratio of the geometric means over seeds)",
            ),
        ),
        test=Criterion("log10_relgrad_ratio", ">", 0.0),
        changes="gradient normalised by the weight norm; symmetric final LayerNorm; no clipping; geometric means",
        previous=("PDE gradients higher than the Transformer's",),
    ),
    Rule(
        id="grad.pde_first_layer",
        section="gradients",
        claim="PDE first layer markedly higher; Transformer more uniform across layers",
        paper=paper.GRADIENT_PDE_FIRST_LAYER.text,
        source=paper.GRADIENT_SOURCE,
        quantities=(
            Quantity(
                "log10_first_over_other",
                "`newsgroups_pde`: log10 of blocks.0's relative gradient over the largest of the other blocks', per "
                "seed (t interval)",
            ),
            Quantity(
                "spread_diff",
                "log10(max/min over layers of the relative gradient), `newsgroups_pde` minus "
                "`newsgroups_transformer` (Welch interval)",
            ),
        ),
        test=AllOf(
            (
                Criterion("log10_first_over_other", ">", math.log10(GRADIENT_FIRST_LAYER_FACTOR)),
                Criterion("spread_diff", ">", 0.0),
            )
        ),
        changes="within-model relative gradients (scale-free); no clipping",
        previous=("PDE first layer markedly higher; Transformer more uniform",),
    ),
)

#: The paper's §3.4 model ("embedding and multiple linear layers"), read by the PDE's model-vs-model rules.
VARIANT_SETTING = "newsgroups_pde_linear"
_VARIANT_IDS = {
    "grad.pde_higher": ("grad.linear_higher", "gradients higher than the Transformer's"),
    "grad.pde_first_layer": (
        "grad.linear_first_layer",
        "first layer markedly higher; Transformer more uniform across layers",
    ),
}


def _variant(rule: Rule) -> Rule:
    """``rule`` (a claim on our PDE) on the paper's own §3.4 model, ``newsgroups_pde_linear``."""
    rid, claim = _VARIANT_IDS[rule.id]
    return Rule(
        id=rid,
        section=rule.section,
        claim=f"The paper's §3.4 PDE (embedding + linear layers): {claim}",
        paper=rule.paper,
        source=rule.source,
        quantities=tuple(
            Quantity(q.key, q.definition.replace("`newsgroups_pde`", f"`{VARIANT_SETTING}`")) for q in rule.quantities
        ),
        test=rule.test,
        changes=f"new: {rule.id}'s rule on the paper's §3.4 model (embedding + linear layers, no attention)",
        previous=(),
    )


RULES: tuple[Rule, ...] = (*_RULES, *(_variant(r) for r in _RULES if r.id in _VARIANT_IDS))
