"""The rules' building blocks and the measurement constants they are fixed with (shared by every section module).

Each :class:`Rule` names a claim of the paper, the paper's value, the quantities we compute (each defined in words
precisely enough to recompute it), and a test: a tree of :class:`Criterion` leaves (a quantity, an operator, a
threshold) joined by :class:`AllOf` / :class:`AtLeast`. Every leaf is judged on the 95 % interval of its quantity,
computed by the small-sample method named with it (:mod:`pdelightning_reproduce.stats`, see :data:`INTERVAL`):

* the leaf is **met** when the whole interval lies on the claim's side of the threshold; **failed** when the whole
  interval lies on the other side, or (with a ``margin``) when the interval excludes every effect as large as the
  margin; **unsure** when the interval straddles the threshold;
* a leaf whose quantity lies outside its estimator's valid range (:attr:`Quantity.valid`) is **invalid**;
* ``AllOf``: met if every child is met, failed if any child failed, else unsure;
  ``AtLeast(k)``: met if at least ``k`` children are met, failed if more than ``n - k`` failed, else unsure;
* the rule's verdict: met -> **holds**, failed -> **does not hold**, unsure -> **inconclusive**; a rule without a
  test, whose quantities are missing, or that reads an estimate outside its valid range -> **not comparable** (with
  the reason).

Thresholds are on the scale of the data: equivalence margins are fractions of a null-to-ceiling spread or of a
seed-to-seed standard deviation, and the quantities that need them are standardised by that scale in their
definition. Nothing here may change after the runs without a line in :mod:`pdelightning_reproduce.rule_changes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

# ---- measurement constants, fixed with the rules ---------------------------------------------------------------
#: Probe set: this many samples of the TEST split (same for every run of a data set), drawn without replacement
#: by ``numpy.random.default_rng(PROBE_SEED)``, sorted.
PROBE_N: dict[str, int] = {"mnist": 1000, "newsgroups": 1000}
PROBE_SEED = 2408
#: Fitting set of the I(T;Y) probe classifier and batch of the post-hoc gradients: this many samples of the
#: TRAINING split (after the validation hold-out), drawn by ``numpy.random.default_rng(FIT_SEED)``, sorted.
FIT_N: dict[str, int] = {"mnist": 2000, "newsgroups": 4000}
GRAD_N: dict[str, int] = {"mnist": 512, "newsgroups": 128}
FIT_SEED = 9523
#: Saved checkpoints NOT analysed (the 20 Newsgroups trajectories use step 0, every other saved step and the final).
SKIP_STEPS: tuple[int, ...] = (10, 20)
#: Perturbation grid (noise on the embedding, in units of each sample's embedding RMS), fixed before the runs.
EPS_GRID: tuple[float, ...] = tuple(round(10 ** (k / 2), 10) for k in range(-8, 5))  # 1e-4 ... 1e2, half decades
#: The perturbation scan (every ε of the grid, and the amplification) runs on the first PERTURBATION_N probe samples.
PERTURBATION_N: dict[str, int] = {"mnist": 1000, "newsgroups": 250}
#: ε of the per-layer amplification ||Δh_l|| / ||Δh_0|| (context, no verdict).
AMPLIFICATION_EPS = 1e-2
#: Noise draws per probe sample and ε (seeded by sample index, as ``analysis.perturbation.gaussian_noise``).
NOISE_SEED = 5
#: A run has diverged at the first training batch whose loss is non-finite or above this many times ln(C)
#: (C = number of classes; chance level is ln C).
DIVERGENCE_LOSS_FACTOR = 10.0
#: Confidence level of every interval.
CONFIDENCE = 0.95
#: Linear CKA uses the unbiased HSIC estimator; the effective rank is exp(entropy of the normalised singular values
#: of each sample's token matrix centred over tokens), averaged over the probe set (Roy & Vetterli 2007).
CKA_UNBIASED = True
#: I(X;T) (context, no verdict): Gaussian-KDE upper bound, noise variance and subsample, beside its ceiling, the
#: entropy of the distinct probe inputs.
IXT_NOISE_VARIANCE = 0.1
IXT_MAX_SAMPLES = 1000

INTERVAL = (
    f"{CONFIDENCE:.0%} intervals valid at 3-10 units (pdelightning_reproduce.stats), the method named with every "
    "number a rule reads: a setting's seed mean by the one-sample t interval; a difference of two settings' seed "
    "means by Welch's interval (Welch-Satterthwaite df); a per-unit difference (a pair unit, a seed's two layers) "
    "by the paired t interval; a ratio of two settings' means by Fieller's interval; a divergence rate by the "
    "Wilson interval and a difference of two rates by Newcombe's hybrid-score interval together with the seed-"
    "paired t interval (a seed's runs are not independent), holding only if Fisher's exact one-sided p < 0.025 too; "
    "'every seed' tests read [min, max] over seeds. No percentile bootstrap: it covers 76-83 % at n = 3-5"
)

Op = Literal[">", ">=", "<", "<=", "within"]


@dataclass(frozen=True)
class Criterion:
    """One test of one quantity: ``quantity[item] op threshold``, judged on its interval.

    Attributes:
        key: the quantity's key (see the rule's ``quantities``).
        op: ``">"``, ``">="``, ``"<"``, ``"<="`` or ``"within"`` (closed interval ``[lo, hi]``).
        threshold: a number, or ``(lo, hi)`` for ``"within"``.
        item: the layer / depth / cell the quantity is read at (``""`` for a scalar).
        margin: for ``>``/``>=`` (``<``/``<=``): the leaf also fails when the interval lies below
            ``threshold + margin`` (above ``threshold - margin``), i.e. it excludes every effect as large as the
            margin; 0 keeps the plain reading.
    """

    key: str
    op: Op
    threshold: float | tuple[float, float]
    item: str = ""
    margin: float = 0.0


@dataclass(frozen=True)
class AllOf:
    """Every child must be met."""

    children: tuple[Node, ...]


@dataclass(frozen=True)
class AtLeast:
    """At least ``k`` children must be met."""

    k: int
    children: tuple[Node, ...]


Node = Union[Criterion, AllOf, AtLeast]  # noqa: UP007 (a runtime alias used in dataclass fields)


@dataclass(frozen=True)
class Quantity:
    """A quantity a rule tests: its key, an exact definition in words, and its estimator's valid range.

    Attributes:
        key: the key the criteria read.
        definition: what it is, in words.
        valid: ``(lo, hi)`` the estimates the quantity is built from must lie in (e.g. a lower bound on I(T;Y) may
            not read below minus its stated bias); outside it the rule is not comparable. ``None``: no limit.
        valid_reason: why estimates outside ``valid`` mean nothing (printed with the verdict).
    """

    key: str
    definition: str
    valid: tuple[float, float] | None = None
    valid_reason: str = ""


@dataclass(frozen=True)
class Rule:
    """A claim of the paper and how we decide it.

    Attributes:
        id: stable identifier, e.g. ``"t2.transformer"``.
        section: report section key.
        claim: the claim, in the paper's words or close to them.
        paper: the paper's value or statement.
        source: where the paper says it.
        quantities: what is computed.
        test: the decision tree; ``None`` when the claim is not comparable by design.
        not_comparable: the reason, when ``test`` is ``None``.
        changes: how the measurement differs from the v1 reproduction report.
        previous: the v1 report's claim texts this rule continues (for the "changed verdicts" section).
    """

    id: str
    section: str
    claim: str
    paper: str
    source: str
    quantities: tuple[Quantity, ...]
    test: Node | None
    not_comparable: str = ""
    changes: str = ""
    previous: tuple[str, ...] = ()


def layers(first: int, last: int) -> tuple[str, ...]:
    """``blocks.first`` ... ``blocks.last``."""
    return tuple(f"blocks.{i}" for i in range(first, last + 1))


TABLE2_LAYERS = layers(1, 9)  # the paper's pair "i-(i+1)" is our blocks.(i-1) -> blocks.i, keyed by the later
TABLE3_LAYERS = layers(0, 9)  # the paper's layer i is our blocks.(i-1)
MNIST_LAYERS = layers(0, 9)
NEWSGROUPS_LAYERS = layers(0, 3)

FINAL = "at the final checkpoint (the step training stopped at)"
PROBE = "on the probe set (PROBE_N test-split samples)"
POOL = "mean over tokens (masked for padding), giving one d-vector per sample"
TWINS = "the reference is now another seed's model (the old report compared twins of the same seed)"
