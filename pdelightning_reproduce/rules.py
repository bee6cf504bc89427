"""The verdict rules of the reproduction, fixed BEFORE any run of v2 (their sha256 was recorded first).

Each :class:`Rule` names a claim of the paper, the paper's value, the quantities we compute (each defined in
words precisely enough to recompute it), and a test: a tree of :class:`Criterion` leaves (a quantity, an
operator, a threshold) joined by :class:`AllOf` / :class:`AtLeast`. Every leaf is judged on the 95 % interval of
its quantity (see :data:`INTERVAL`):

* the leaf is **met** when the whole interval lies on the claim's side of the threshold, **failed** when the
  whole interval lies on the other side, and **unsure** when the interval straddles the threshold;
* ``AllOf``: met if every child is met, failed if any child failed, else unsure;
  ``AtLeast(k)``: met if at least ``k`` children are met, failed if more than ``n - k`` failed, else unsure;
* the rule's verdict: met -> **holds**, failed -> **does not hold**, unsure -> **inconclusive**; a rule without a
  test, or whose every quantity is missing, -> **not comparable** (with the reason).

Nothing here may change after the runs without a line in :data:`CHANGES_AFTER_FIXING`, which the report prints.
Measurement constants that decide what a quantity is (probe sizes, the ε grid, the divergence bound, the bootstrap)
live here too, so they are fixed with the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

from pdelightning_reproduce import paper
from pdelightning_reproduce.rule_changes import CHANGES_AFTER_FIXING

__all__ = ["CHANGES_AFTER_FIXING"]  # kept in .rule_changes (this file stays under 500 lines); read it as rules.*

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
#: The old report widened its grid after seeing results; this one is not changed.
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
#: Confidence level and bootstrap.
CONFIDENCE = 0.95
BOOTSTRAP_B = 10_000
BOOTSTRAP_SEED = 20240818
#: Linear CKA uses the unbiased HSIC estimator; the effective rank is exp(entropy of the normalised singular values
#: of each sample's token matrix centred over tokens), averaged over the probe set (Roy & Vetterli 2007).
CKA_UNBIASED = True
#: I(X;T) (context, no verdict): Gaussian-KDE upper bound, noise variance and subsample, beside its ceiling, the
#: entropy of the distinct probe inputs.
IXT_NOISE_VARIANCE = 0.1
IXT_MAX_SAMPLES = 1000

INTERVAL = (
    f"{CONFIDENCE:.0%} percentile bootstrap over seeds, B = {BOOTSTRAP_B}, numpy default_rng({BOOTSTRAP_SEED}): "
    "a setting's seed mean resamples its seeds; a difference of two settings resamples each setting's seeds "
    "independently; a pair quantity resamples the pair units (one per model seed); a divergence rate pooled over "
    "grid cells resamples seeds as clusters (a seed brings all its cells, for both settings compared)"
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
    """

    key: str
    op: Op
    threshold: float | tuple[float, float]
    item: str = ""


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
    """A quantity a rule tests: its key and an exact definition in words."""

    key: str
    definition: str


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
        changes: how the measurement differs from the old (v1 reproduction) report.
        previous: the old report's claim texts this rule continues (for the "changed verdicts" section).
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


def _layers(first: int, last: int) -> tuple[str, ...]:
    return tuple(f"blocks.{i}" for i in range(first, last + 1))


TABLE2_LAYERS = _layers(1, 9)  # the paper's pair "i-(i+1)" is our blocks.(i-1) -> blocks.i, keyed by the later
TABLE3_LAYERS = _layers(0, 9)  # the paper's layer i is our blocks.(i-1)
MNIST_LAYERS = _layers(0, 9)
NEWSGROUPS_LAYERS = _layers(0, 3)
TABLE2_TOLERANCE = 0.05
TABLE2_MIN_PAIRS = 7
TABLE3_MIN_FALL = 0.5
TABLE3_MAX_END = 0.2
ATTENTION_KL_FACTOR = 2.0
IB_MIN_LAYERS = 3  # "general decline": more than half of the 4 layers
GRADIENT_FIRST_LAYER_FACTOR = 2.0
PERTURBATION_SIMILAR_REL = 0.10
PERTURBATION_FROM_EPS = 1e-3
PERTURBATION_GAP = 0.10  # the models "diverge" where their relative loss increases differ by more than this
PERTURBATION_NEAR_DECADES = 0.5
DRIFT_RATIO = 0.5
DRIFT_MIN_DEPTHS = 2
REFINEMENT_MAX_DISTANCE = 0.10
REFINEMENT_MAX_ACC_CHANGE = 0.01
MIN_VAL_ACC_MNIST_TRANSFORMER = 0.97

_FINAL = "at the final checkpoint (the step training stopped at)"
_PROBE = "on the probe set (PROBE_N test-split samples)"
_POOL = "mean over tokens (masked for padding), giving one d-vector per sample"
_TWINS = "the reference is now another seed's model (the old report compared twins of the same seed)"


def _table2_rule(rid: str, model: str, setting: str, values: tuple[float, ...], previous: str) -> Rule:
    key = "consecutive_corr"
    return Rule(
        id=rid, section="table2", claim=f"{model} inter-layer correlation (Table 2)",
        paper=f"{values[0]:.4f} -> {values[-1]:.4f} (pairs 1-2 ... 9-10)", source=paper.TABLE2_SOURCE,
        quantities=(
            Quantity(key, f"`{setting}`: Pearson correlation of the flattened [N, d] representations of blocks.(i-1) "
                          f"and blocks.i ({_POOL}) {_PROBE}, {_FINAL}; seed mean and interval per pair"),
            Quantity(f"{key}_change", f"`{setting}`: consecutive_corr at blocks.9 minus at blocks.1, per seed; "
                                      "seed mean and interval"),
        ),
        test=AllOf((
            AtLeast(TABLE2_MIN_PAIRS, tuple(
                Criterion(key, "within", (v - TABLE2_TOLERANCE, v + TABLE2_TOLERANCE), layer)
                for layer, v in zip(TABLE2_LAYERS, values, strict=True)
            )),
            Criterion(f"{key}_change", ">" if values[-1] > values[0] else "<", 0.0),
        )),
        changes="converged full-MNIST training; intervals instead of seed means", previous=(previous,),
    )  # fmt: skip


def _table3_rule(rid: str, method: str, values: tuple[float, ...], previous: str) -> Rule:
    key = f"{method.lower()}_vs_reference"
    return Rule(
        id=rid, section="table3", claim=f"{method} correlation, Transformer vs PDE, falls with depth to near zero "
                                        "(Table 3)",
        paper=f"{values[0]:.4f} (layer 1) -> {values[-1]:.4f} (layer 10)", source=paper.TABLE3_SOURCE,
        quantities=(
            Quantity(key, f"pair `pde_vs_transformer` (PDE seed s vs Transformer seed s+1): {method} correlation of "
                          f"the flattened [N, d] representations of the same layer ({_POOL}) {_PROBE}, both "
                          f"{_FINAL}; interval over pair units. Beside it (no verdict): the ceiling pair "
                          "`transformer_vs_transformer` and linear CKA"),
            Quantity(f"{key}_fall", f"{key} at blocks.0 minus at blocks.9, per pair unit"),
        ),
        test=AllOf((
            Criterion(f"{key}_fall", ">", TABLE3_MIN_FALL),
            Criterion(key, "<", TABLE3_MAX_END, "blocks.9"),
        )),
        changes=_TWINS + "; converged training", previous=(previous,),
    )  # fmt: skip


_ATT_DEF = (
    f"pair `pde_vs_transformer`: attention probabilities of every query row {_PROBE}, both {_FINAL}; heads matched per "
    "layer by the Hungarian method on cosine (analysis.attention); mean over rows and matched heads; interval over "
    "pair units. Nulls per layer: the PDE's attention vs uniform attention over the keys, vs the reference's attention "
    "on another probe sample (a seeded derangement), vs the reference's step-0 checkpoint (a re-initialised "
    "Transformer); ceiling: pair `transformer_vs_transformer`"
)

RULES: tuple[Rule, ...] = (
    # ---- preconditions ------------------------------------------------------------------------------------------
    Rule(
        id="pre.mnist_transformer_converged", section="runs",
        claim="The MNIST Transformer is trained to convergence (design requirement of this reproduction)",
        paper="(not a claim of the paper)", source="issue 9",
        quantities=(Quantity("val_acc_min", "`mnist_transformer`: final val/acc of every seed; the interval is "
                                            "[min, max] over seeds (every seed must pass)"),),
        test=Criterion("val_acc_min", ">=", MIN_VAL_ACC_MNIST_TRANSFORMER),
    ),
    # ---- Table 2 ------------------------------------------------------------------------------------------------
    _table2_rule("t2.transformer", "Transformer", "mnist_transformer", paper.TABLE2_TRANSFORMER,
                 "Transformer inter-layer correlation (Table 2)"),
    _table2_rule("t2.pde", "PDE", "mnist_pde", paper.TABLE2_PDE, "PDE inter-layer correlation (Table 2)"),
    Rule(
        id="t2.pde_above", section="table2", claim="PDE inter-layer correlation above the Transformer's",
        paper="at 9 of 9 pairs", source=paper.TABLE2_SOURCE,
        quantities=(Quantity("consecutive_corr_diff", "consecutive_corr of `mnist_pde` minus that of "
                                                      "`mnist_transformer` per pair (difference of seed means)"),),
        test=AtLeast(TABLE2_MIN_PAIRS, tuple(Criterion("consecutive_corr_diff", ">", 0.0, la)
                                             for la in TABLE2_LAYERS)),
        changes="converged training; intervals", previous=("PDE correlation above the Transformer's",),
    ),
    # ---- Table 3 ------------------------------------------------------------------------------------------------
    _table3_rule("t3.pearson", "Pearson", paper.TABLE3_PEARSON,
                 "Pearson correlation falls with depth to near zero (Table 3)"),
    _table3_rule("t3.spearman", "Spearman", paper.TABLE3_SPEARMAN,
                 "Spearman correlation falls with depth to near zero (Table 3)"),
    # ---- attention ----------------------------------------------------------------------------------------------
    Rule(
        id="att.cosine", section="attention",
        claim=f"PDE attention matches the Transformer's (cosine > {paper.ATTENTION_LAYER_COSINE_MIN} at every layer)",
        paper=f"cosine {paper.ATTENTION_COSINE}, every layer > {paper.ATTENTION_LAYER_COSINE_MIN}",
        source=paper.ATTENTION_SOURCE,
        quantities=(
            Quantity("cosine", "cosine similarity of attention rows; " + _ATT_DEF),
            Quantity("cosine_minus_null", "layer-mean cosine minus the layer-mean cosine of the strongest null "
                                          "(the null with the highest layer-mean cosine in that pair unit)"),
        ),
        test=AllOf((
            AtLeast(len(MNIST_LAYERS), tuple(Criterion("cosine", ">", paper.ATTENTION_LAYER_COSINE_MIN, la)
                                             for la in MNIST_LAYERS)),
            Criterion("cosine_minus_null", ">", 0.0),
        )),
        changes=_TWINS + "; converged training; intervals",
        previous=("PDE attention matches the Transformer's (cosine, every layer > 0.9800)",),
    ),
    Rule(
        id="att.kl", section="attention", claim="Low KL divergence between the attention distributions",
        paper=f"KL {paper.ATTENTION_KL}", source=paper.ATTENTION_SOURCE,
        quantities=(
            Quantity("kl", "layer-mean KL(PDE || Transformer) of attention rows in nats; " + _ATT_DEF),
            Quantity("kl_minus_null", "layer-mean KL minus the layer-mean KL of the closest null (the null with the "
                                      "lowest layer-mean KL in that pair unit)"),
        ),
        test=AllOf((
            Criterion("kl", "<=", ATTENTION_KL_FACTOR * paper.ATTENTION_KL),
            Criterion("kl_minus_null", "<", 0.0),
        )),
        changes=_TWINS + "; converged training; intervals",
        previous=("Low KL divergence of the attention distributions",),
    ),
    # ---- information bottleneck ---------------------------------------------------------------------------------
    *(
        Rule(
            id=f"ib.decline_{m.lower()}", section="bottleneck", claim=f"{m}: I(T;Y) declines over training",
            paper=paper.IB_DECLINE.text, source=paper.IB_SOURCE,
            quantities=(Quantity("ity_change", f"`newsgroups_{m.lower()}`: I(T;Y) of each layer at the final "
                                               "checkpoint minus at step 0, in bits. I(T;Y) = H(Y) - CE of a linear "
                                               "softmax probe (shrinkage LDA, analysis.linear_probe.probe_information) "
                                               "fitted on FIT_N training-split "
                                               f"samples and scored {_PROBE}, {_POOL}; UNCLIPPED"),),
            test=AtLeast(IB_MIN_LAYERS, tuple(Criterion("ity_change", "<", 0.0, la) for la in NEWSGROUPS_LAYERS)),
            changes="I(T;Y) no longer clipped at 0 (the old rule could not hold); probe fitted on training-split "
                    "features; full training set",
            previous=(f"{m}: I(T;Y) declines over training",),
        )
        for m in ("Transformer", "PDE")
    ),
    Rule(
        id="ib.pde_lower", section="bottleneck", claim="PDE I(T;Y) lower than the Transformer's",
        paper=paper.IB_PDE_LOWER.text, source=paper.IB_SOURCE,
        quantities=(Quantity("ity_end_diff", "layer-mean I(T;Y) at the final checkpoint, `newsgroups_pde` minus "
                                             "`newsgroups_transformer` (difference of seed means). Beside it: each "
                                             "model's own head bound H(Y) - CE/ln 2"),),
        test=Criterion("ity_end_diff", "<", 0.0),
        changes="unclipped estimator fitted on training-split features; symmetric final LayerNorm",
        previous=("PDE I(T;Y) lower than the Transformer's",),
    ),
    Rule(
        id="ib.pde_layer1_sharpest", section="bottleneck", claim="PDE layer 1 has the sharpest drop",
        paper=paper.IB_PDE_LAYER1_SHARPEST.text, source=paper.IB_SOURCE,
        quantities=(Quantity("drop_first_minus_other", "`newsgroups_pde`: per layer, the largest fall of I(T;Y) "
                                                       "from a checkpoint to any later one (peak to lowest point "
                                                       "after it); blocks.0's minus the largest of the other "
                                                       "layers', per seed"),),
        test=Criterion("drop_first_minus_other", ">", 0.0),
        changes="peak to lowest point after it (the paper's words) instead of peak to end; unclipped estimator",
        previous=("PDE layer 1 has the sharpest drop",),
    ),
    # ---- gradient flow ------------------------------------------------------------------------------------------
    Rule(
        id="grad.range_transformer", section="gradients", claim="Transformer gradients mostly in [1e-4, 1e-3]",
        paper="[1e-4, 1e-3]", source=paper.GRADIENT_SOURCE, quantities=(), test=None,
        not_comparable="an absolute gradient magnitude depends on width, learning rate, loss scale and the IB weight, "
                       "none of which the paper states; our value is shown as context",
        previous=("Transformer gradients mostly in [0.0001, 0.001]",),
    ),
    Rule(
        id="grad.range_pde", section="gradients", claim="PDE gradients mostly in [1e-3, 1e-2]",
        paper="[1e-3, 1e-2]", source=paper.GRADIENT_SOURCE, quantities=(), test=None,
        not_comparable="as for the Transformer's range: absolute magnitudes are not comparable across set-ups",
        previous=("PDE gradients mostly in [0.001, 0.01]",),
    ),
    Rule(
        id="grad.pde_higher", section="gradients", claim="PDE gradients higher than the Transformer's",
        paper=paper.GRADIENT_PDE_HIGHER.text, source=paper.GRADIENT_SOURCE,
        quantities=(Quantity("log10_relgrad_ratio", "relative gradient of a layer = ||dCE/dθ_l|| / ||θ_l|| (all "
                                                    "parameters of block l; CE on GRAD_N training-split samples, "
                                                    "eval mode), median over the checkpoints after step 0, mean over "
                                                    "layers; log10 of `newsgroups_pde`'s seed mean over "
                                                    "`newsgroups_transformer`'s"),),
        test=Criterion("log10_relgrad_ratio", ">", 0.0),
        changes="gradient normalised by the weight norm; symmetric final LayerNorm; no clipping",
        previous=("PDE gradients higher than the Transformer's",),
    ),
    Rule(
        id="grad.pde_first_layer", section="gradients",
        claim="PDE first layer markedly higher; Transformer more uniform across layers",
        paper=paper.GRADIENT_PDE_FIRST_LAYER.text, source=paper.GRADIENT_SOURCE,
        quantities=(
            Quantity("log10_first_over_other", "`newsgroups_pde`: log10 of blocks.0's relative gradient over the "
                                               "largest of the other blocks', per seed"),
            Quantity("spread_diff", "log10(max/min over layers of the relative gradient), `newsgroups_pde` minus "
                                    "`newsgroups_transformer` (difference of seed means)"),
        ),
        test=AllOf((
            Criterion("log10_first_over_other", ">", math.log10(GRADIENT_FIRST_LAYER_FACTOR)),
            Criterion("spread_diff", ">", 0.0),
        )),
        changes="within-model relative gradients (scale-free); no clipping",
        previous=("PDE first layer markedly higher; Transformer more uniform",),
    ),
    # ---- perturbation -------------------------------------------------------------------------------------------
    Rule(
        id="pert.similar_low", section="perturbation", claim="Both models similar below ε = 1e-3",
        paper=paper.PERTURBATION_SIMILAR.text, source=paper.PERTURBATION_SOURCE,
        quantities=tuple(
            Quantity(f"max_rel_increase_low_{m}", f"`newsgroups_{m}`: largest relative loss increase "
                                                  "(loss(ε) - loss_clean) / loss_clean over the grid ε < 1e-3; noise "
                                                  "ε x (each sample's embedding RMS) x N(0, 1) added to the embedding "
                                                  f"{_PROBE}, {_FINAL}")
            for m in ("transformer", "pde")
        ),
        test=AllOf(tuple(Criterion(f"max_rel_increase_low_{m}", "<", PERTURBATION_SIMILAR_REL)
                         for m in ("transformer", "pde"))),
        changes="symmetric final LayerNorm; ε grid fixed before the runs",
        previous=("Both models similar below ε = 0.001",),
    ),
    Rule(
        id="pert.pde_faster_loss", section="perturbation", claim="PDE loss degrades faster than the Transformer's",
        paper=paper.PERTURBATION_PDE_FASTER.text, source=paper.PERTURBATION_SOURCE,
        quantities=(Quantity("rel_increase_diff", "mean over grid ε >= 1e-3 of the relative loss increase, "
                                                  "`newsgroups_pde` minus `newsgroups_transformer` (difference of "
                                                  "seed means)"),),
        test=Criterion("rel_increase_diff", ">", 0.0),
        changes="both models end in a LayerNorm (the old asymmetry decided the verdict); area over the grid instead "
                "of the critical ε",
        previous=("PDE degrades faster than the Transformer",),
    ),
    Rule(
        id="pert.pde_faster_acc", section="perturbation", claim="PDE accuracy degrades faster than the Transformer's",
        paper=paper.PERTURBATION_PDE_FASTER.text + " (measured on accuracy)", source=paper.PERTURBATION_SOURCE,
        quantities=(Quantity("acc_drop_diff", "mean over grid ε >= 1e-3 of the accuracy drop acc_clean - acc(ε), "
                                              "`newsgroups_pde` minus `newsgroups_transformer`"),),
        test=Criterion("acc_drop_diff", ">", 0.0),
        changes="new: the same claim on accuracy, which no architecture bounds",
    ),
    Rule(
        id="pert.divergence_near", section="perturbation", claim="The models' sensitivities diverge near ε = 1e-2",
        paper=paper.PERTURBATION_DIVERGENCE.text, source=paper.PERTURBATION_SOURCE,
        quantities=(Quantity("log10_divergence_eps", "log10 of the smallest grid ε at which the seed-mean relative "
                                                     "loss increase of `newsgroups_pde` exceeds the Transformer's by "
                                                     f"more than {PERTURBATION_GAP} (+inf: nowhere on the grid); the "
                                                     "interval bootstraps both settings' seeds"),),
        test=Criterion("log10_divergence_eps", "within", (-2 - PERTURBATION_NEAR_DECADES,
                                                          -2 + PERTURBATION_NEAR_DECADES)),
        changes="symmetric final LayerNorm; divergence between the models rather than the PDE's departure from clean",
        previous=("Divergence near ε = 0.01",),
    ),
    # ---- v2 stabilizers -----------------------------------------------------------------------------------------
    Rule(
        id="v2.no_residual_drift", section="ablations",
        claim="No residual connections -> catastrophic representational drift", paper=paper.V2_NO_RESIDUAL.text,
        source=paper.V2_SOURCE,
        quantities=(
            Quantity("cka_ratio", "linear CKA (unbiased) of the last layer's pooled representation to the embedding's "
                                  f"{_PROBE} at the final step, `sweep_no_residual` over `sweep_transformer` (ratio of "
                                  "seed means) at the cell of each depth with the lowest learning rate; diverged runs "
                                  "excluded"),
            Quantity("erank_ratio", "effective rank of the last layer's centred token matrix (mean over the probe "
                                    "set), same ratio and cells"),
        ),
        test=AtLeast(DRIFT_MIN_DEPTHS, tuple(
            AllOf((Criterion("cka_ratio", "<", DRIFT_RATIO, f"L{d}"),
                   Criterion("erank_ratio", "<", DRIFT_RATIO, f"L{d}")))
            for d in (6, 12, 24)
        )),
        changes="drift as CKA to the embedding and rank collapse instead of ||h - u0|| / ||u0|| (norm growth); "
                "depth sweep without clipping",
        previous=("No residual → catastrophic representational drift",),
    ),
    Rule(
        id="v2.no_layernorm_explosive", section="ablations",
        claim="No LayerNorm -> unstable, explosive training", paper=paper.V2_NO_LAYERNORM.text, source=paper.V2_SOURCE,
        quantities=(Quantity("divergence_rate_diff", "share of diverged runs over the depth x lr grid, "
                                                     "`sweep_no_layernorm` minus `sweep_transformer` (same cells, same "
                                                     "seeds; seed-cluster bootstrap)"),),
        test=Criterion("divergence_rate_diff", ">", 0.0),
        changes="no gradient clipping; depth x learning-rate sweep; divergence rate instead of a gradient-norm ratio",
        previous=("No LayerNorm → unstable, explosive training",),
    ),
    Rule(
        id="v2.pde_unstable", section="ablations",
        claim="The PDE simulator without stabilizers is unstable (vs the same PDE with them)",
        paper=paper.V2_PDE_UNSTABLE.text, source=paper.V2_SOURCE,
        quantities=(Quantity("divergence_rate_diff", "share of diverged runs over the eq. (21) grid, `sweep_pde` "
                                                     "minus `sweep_pde_stabilized` (same cells and seeds)"),),
        test=Criterion("divergence_rate_diff", ">", 0.0),
        changes="Δt chosen so eq. (21) at initialisation spans 0.3-3 (the old Δt = 0.1 was stable by construction); "
                "no clipping",
        previous=("PDE without stabilizers unstable vs with",),
    ),
    Rule(
        id="v2.eq21_predicts", section="ablations",
        claim="Eq. (21) > 1 at initialisation -> unstable training of the PDE simulator",
        paper="Theorem 2: the explicit scheme is stable when 2DΔt/Δx² + αΔt||W^O||₂ <= 1 (eq. 21)",
        source="v1 appendix, eq. (21)",
        quantities=(Quantity("divergence_rate_diff", "`sweep_pde`: share of diverged runs in the cells with eq. (21) "
                                                     "target > 1 minus in the cells with target <= 1 (seed-cluster "
                                                     "bootstrap)"),),
        test=Criterion("divergence_rate_diff", ">", 0.0),
        changes="new",
    ),
    # ---- continuum check ----------------------------------------------------------------------------------------
    Rule(
        id="cont.refinement", section="refinement",
        claim="The trained PDE model is a discretised continuum: halving Δt (2L steps) barely changes it",
        paper="u(x, t) evolves by a PDE discretised by explicit Euler steps (eq. 20) with error O(Δt^p) (eq. 24)",
        source="v1 §2, eqs. (20), (24)",
        quantities=(
            Quantity("refine_logit_distance", "`mnist_pde`, final checkpoint: ||z_2L - z_L||_F / ||z_L||_F of the "
                                              "logits over the full test split, z_2L from the same weights run as 2L "
                                              "steps of Δt/2 (each step's weights used twice)"),
            Quantity("refine_acc_change", "test accuracy of the 2L-step model minus the L-step model's"),
        ),
        test=AllOf((
            Criterion("refine_logit_distance", "<", REFINEMENT_MAX_DISTANCE),
            Criterion("refine_acc_change", "within", (-REFINEMENT_MAX_ACC_CHANGE, REFINEMENT_MAX_ACC_CHANGE)),
        )),
        changes="new (Sander et al. 2022 ask the same of ResNets)",
    ),
)  # fmt: skip
RULE_IDS: tuple[str, ...] = tuple(r.id for r in RULES)
BY_ID: dict[str, Rule] = {r.id: r for r in RULES}
