"""The verdict rules of the reproduction, one module per report section, fixed before the runs they judge.

* :mod:`.base`: the rule tree (:class:`Rule`, :class:`Criterion`, :class:`AllOf`, :class:`AtLeast`,
  :class:`Quantity`), how a tree is read, and the measurement constants fixed with the rules.
* one module per section: :mod:`.runs`, :mod:`.table2`, :mod:`.table3`, :mod:`.attention`, :mod:`.bottleneck`,
  :mod:`.gradients`, :mod:`.perturbation`, :mod:`.ablations`, :mod:`.refinement`; each defines ``RULES`` and the
  thresholds of its section.

:data:`RULES` joins them in report order. :func:`rules_sha256` hashes every module of this package (sorted by
name); :func:`pre_run_rules_sha` reads the hash recorded BEFORE the runs of a version
(:data:`pdelightning_reproduce.rule_changes.PRE_RUN_SHA`, outside the hashed package), which the report prints beside
today's. Changes after fixing, and every rule changed since v2 with why, are in
:mod:`pdelightning_reproduce.rule_changes`.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from pdelightning_reproduce.rule_changes import CHANGES_AFTER_FIXING, PRE_RUN_SHA, RULE_CHANGES_V3, RuleChange
from pdelightning_reproduce.rules import (
    ablations,
    attention,
    bottleneck,
    gradients,
    perturbation,
    refinement,
    runs,
    table2,
    table3,
)
from pdelightning_reproduce.rules.ablations import DRIFT_MIN_ACC, DRIFT_MIN_DEPTHS, DRIFT_RATIO
from pdelightning_reproduce.rules.attention import ATTENTION_EQUIV_FRACTION
from pdelightning_reproduce.rules.base import (
    AMPLIFICATION_EPS,
    CKA_UNBIASED,
    CONFIDENCE,
    DIVERGENCE_LOSS_FACTOR,
    EPS_GRID,
    FIT_N,
    FIT_SEED,
    GRAD_N,
    INTERVAL,
    IXT_MAX_SAMPLES,
    IXT_NOISE_VARIANCE,
    MNIST_LAYERS,
    NEWSGROUPS_LAYERS,
    NOISE_SEED,
    PERTURBATION_N,
    PROBE_N,
    PROBE_SEED,
    SKIP_STEPS,
    TABLE2_LAYERS,
    TABLE3_LAYERS,
    AllOf,
    AtLeast,
    Criterion,
    Node,
    Op,
    Quantity,
    Rule,
)
from pdelightning_reproduce.rules.bottleneck import IB_LOWER_LCB, IB_LOWER_QUANTITY, IB_LOWER_UCB, IB_MIN_LAYERS
from pdelightning_reproduce.rules.gradients import GRADIENT_FIRST_LAYER_FACTOR
from pdelightning_reproduce.rules.perturbation import (
    PAPER_EPS_RANGE,
    PERTURBATION_EQUIV_SD,
    PERTURBATION_FROM_EPS,
    PERTURBATION_GAP,
    PERTURBATION_NEAR_DECADES,
)
from pdelightning_reproduce.rules.refinement import REFINEMENT_MAX_ACC_CHANGE, REFINEMENT_MAX_DISTANCE
from pdelightning_reproduce.rules.runs import MIN_VAL_ACC_MNIST_TRANSFORMER
from pdelightning_reproduce.rules.table2 import TABLE2_MIN_PAIRS, TABLE2_TOLERANCE
from pdelightning_reproduce.rules.table3 import TABLE3_METHODS, TABLE3_NEAR_ZERO_REL, TABLE3_PAIRS

SECTION_MODULES = (runs, table2, table3, attention, bottleneck, gradients, perturbation, ablations, refinement)
RULES: tuple[Rule, ...] = tuple(r for m in SECTION_MODULES for r in m.RULES)
RULE_IDS: tuple[str, ...] = tuple(r.id for r in RULES)
BY_ID: dict[str, Rule] = {r.id: r for r in RULES}

__all__ = [
    "AMPLIFICATION_EPS",
    "ATTENTION_EQUIV_FRACTION",
    "BY_ID",
    "CHANGES_AFTER_FIXING",
    "CKA_UNBIASED",
    "CONFIDENCE",
    "DIVERGENCE_LOSS_FACTOR",
    "DRIFT_MIN_ACC",
    "DRIFT_MIN_DEPTHS",
    "DRIFT_RATIO",
    "EPS_GRID",
    "FIT_N",
    "FIT_SEED",
    "GRADIENT_FIRST_LAYER_FACTOR",
    "GRAD_N",
    "IB_LOWER_LCB",
    "IB_LOWER_QUANTITY",
    "IB_LOWER_UCB",
    "IB_MIN_LAYERS",
    "INTERVAL",
    "IXT_MAX_SAMPLES",
    "IXT_NOISE_VARIANCE",
    "MIN_VAL_ACC_MNIST_TRANSFORMER",
    "MNIST_LAYERS",
    "NEWSGROUPS_LAYERS",
    "NOISE_SEED",
    "PAPER_EPS_RANGE",
    "PERTURBATION_EQUIV_SD",
    "PERTURBATION_FROM_EPS",
    "PERTURBATION_GAP",
    "PERTURBATION_N",
    "PERTURBATION_NEAR_DECADES",
    "PRE_RUN_SHA",
    "PROBE_N",
    "PROBE_SEED",
    "REFINEMENT_MAX_ACC_CHANGE",
    "REFINEMENT_MAX_DISTANCE",
    "RULES",
    "RULE_CHANGES_V3",
    "RULE_IDS",
    "SKIP_STEPS",
    "TABLE2_LAYERS",
    "TABLE2_MIN_PAIRS",
    "TABLE2_TOLERANCE",
    "TABLE3_LAYERS",
    "TABLE3_METHODS",
    "TABLE3_NEAR_ZERO_REL",
    "TABLE3_PAIRS",
    "AllOf",
    "AtLeast",
    "Criterion",
    "Node",
    "Op",
    "Quantity",
    "Rule",
    "RuleChange",
    "pre_run_rules_sha",
    "rules_sha256",
    "sha_text",
]


def rules_sha256() -> str:
    """sha256 over every ``*.py`` module of this package, sorted by name (each as its name, a NUL byte, its bytes)."""
    h = hashlib.sha256()
    files = sorted((f for f in resources.files(__name__).iterdir() if f.name.endswith(".py")), key=lambda f: f.name)
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def pre_run_rules_sha(version: str = "v3") -> dict[str, str]:
    """The record made for ``version`` before its runs: ``{"sha256", "recorded", "what"}``.

    Raises:
        KeyError: for a version with no record (the message lists the recorded ones).
    """
    if version not in PRE_RUN_SHA:
        raise KeyError(f"no pre-run rules sha recorded for {version!r}; recorded: {', '.join(sorted(PRE_RUN_SHA))}")
    return dict(PRE_RUN_SHA[version])


def sha_text(version: str = "v3") -> str:
    """Where the rules live and their sha256 now, beside the one recorded before ``version``'s runs (for the report)."""
    now = f"`pdelightning_reproduce/rules/`, sha256 `{rules_sha256()[:16]}…` now"
    if version not in PRE_RUN_SHA:
        return f"{now}; no sha256 was recorded before the {version} runs"
    pre = PRE_RUN_SHA[version]
    return f"{now}, `{pre['sha256'][:16]}…` recorded before the {version} runs ({pre['recorded']})"
