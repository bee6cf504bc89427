"""Rules of the "runs" section: the preconditions the other verdicts rest on."""

from __future__ import annotations

from pdelightning_reproduce.rules.base import Criterion, Quantity, Rule

MIN_VAL_ACC_MNIST_TRANSFORMER = 0.97

RULES: tuple[Rule, ...] = (
    Rule(
        id="pre.mnist_transformer_converged",
        section="runs",
        claim="The MNIST Transformer is trained to convergence (design requirement of this reproduction)",
        paper="(not a claim of the paper)",
        source="issue 9",
        quantities=(
            Quantity(
                "val_acc_min",
                "`mnist_transformer`: final val/acc of every seed; the interval is [min, max] over seeds (every seed "
                "must pass)",
            ),
        ),
        test=Criterion("val_acc_min", ">=", MIN_VAL_ACC_MNIST_TRANSFORMER),
    ),
)
