"""The paper's own numbers and claims, each with where it is stated.

These are the only numbers in the reproduction report that are not computed from logged runs. Sources:

* **v1**: Zhang, *A Unified Framework for Interpretable Transformers Using PDEs and Information Theory*,
  arXiv 2408.09523v1 (2024), section 3 (experiments).
* **v2**: Zhang & Zhou, *Understanding Transformer Architecture through Continuous Dynamics: A Partial
  Differential Equation Perspective*, arXiv 2408.09523v2 (2025), abstract.

Layer naming: the paper counts layers from 1; our layers are ``blocks.0`` … ``blocks.9``. The paper's Table 2
pair "i-(i+1)" is the consecutive correlation ``blocks.{i-1}`` → ``blocks.{i}`` (logged under the later layer,
``blocks.{i}``), and the paper's Table 3 "layer i" is ``blocks.{i-1}``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperClaim:
    """A qualitative claim of the paper, in its words or close to them, with its source."""

    text: str
    source: str


# ---- §3.1 information flow (MNIST, 10 layers) --------------------------------------------------------------------
TABLE2_SOURCE = "v1 §3.1.3, Table 2 (inter-layer correlations, MNIST)"
#: Table 2 row labels: consecutive layer pairs, paper numbering.
TABLE2_PAIRS: tuple[str, ...] = ("1-2", "2-3", "3-4", "4-5", "5-6", "6-7", "7-8", "8-9", "9-10")
#: Table 2, "Transformer Correlation" column.
TABLE2_TRANSFORMER: tuple[float, ...] = (0.9211, 0.9463, 0.9503, 0.9567, 0.9630, 0.9694, 0.9748, 0.9778, 0.9800)
#: Table 2, "PDE Correlation" column.
TABLE2_PDE: tuple[float, ...] = (0.9840, 0.9862, 0.9898, 0.9931, 0.9955, 0.9971, 0.9980, 0.9986, 0.9990)

TABLE3_SOURCE = "v1 §3.1.3, Table 3 (same-layer correlation, Transformer vs PDE, MNIST)"
#: Table 3 row labels: layers, paper numbering (layer i = our ``blocks.{i-1}``).
TABLE3_LAYERS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
#: Table 3, "Pearson Correlation" column.
TABLE3_PEARSON: tuple[float, ...] = (1.0000, 0.9265, 0.7753, 0.5645, 0.3815, 0.2064, 0.0288, -0.0747, -0.1230, -0.1361)
#: Table 3, "Spearman Correlation" column.
TABLE3_SPEARMAN: tuple[float, ...] = (1.0000, 0.9210, 0.7516, 0.5569, 0.4160, 0.2357, 0.1182, 0.0485, -0.0140, -0.0614)

# ---- §3.2 attention (MNIST) ----------------------------------------------------------------------------------------
ATTENTION_SOURCE = "v1 §3.2.3 (attention mechanism comparison, MNIST)"
#: Cosine similarity of the PDE model's attention to the Transformer's.
ATTENTION_COSINE = 0.9870
#: KL divergence between the two attention distributions.
ATTENTION_KL = 0.0144
#: "consistently high similarities across all layers (>0.98)".
ATTENTION_LAYER_COSINE_MIN = 0.98

# ---- §3.3 information bottleneck (20 Newsgroups, 4 layers, 128 hidden) --------------------------------------------
IB_SOURCE = "v1 §3.3.3 (information bottleneck, 20 Newsgroups, Figure 4)"
IB_DECLINE = PaperClaim(
    "Both models show a general decline in mutual information (layer output vs labels) over training.", IB_SOURCE
)
IB_PDE_LOWER = PaperClaim(
    "PDE mutual information values across layers are generally lower than the Transformer's.", IB_SOURCE
)
IB_PDE_LAYER1_SHARPEST = PaperClaim(
    "PDE layer 1 shows the most significant drop, from its peak to the lowest point.", IB_SOURCE
)

# ---- §3.4 gradient flow (20 Newsgroups) ----------------------------------------------------------------------------
GRADIENT_SOURCE = "v1 §3.4.3 (gradient flow, 20 Newsgroups, Figure 5)"
#: "The gradients in the PDE model are primarily between 1e-3 and 1e-2".
GRADIENT_RANGE_PDE: tuple[float, float] = (1e-3, 1e-2)
#: "while in the Transformer model, they mostly fall within the 1e-4 to 1e-3 range".
GRADIENT_RANGE_TRANSFORMER: tuple[float, float] = (1e-4, 1e-3)
GRADIENT_PDE_HIGHER = PaperClaim(
    "The PDE model exhibits higher gradient magnitudes than the Transformer.", GRADIENT_SOURCE
)
GRADIENT_PDE_FIRST_LAYER = PaperClaim(
    "The PDE model shows significant gradient disparities between layers, the first layer markedly higher; "
    "the Transformer's gradient distribution is more uniform across layers.",
    GRADIENT_SOURCE,
)

# ---- §3.5 perturbation sensitivity (20 Newsgroups) -----------------------------------------------------------------
PERTURBATION_SOURCE = "v1 §3.5.3 (perturbation sensitivity, 20 Newsgroups, Figure 6)"
#: "At low perturbation levels (eps < 1e-3), both models perform similarly."
PERTURBATION_SIMILAR_BELOW_EPS = 1e-3
#: "A significant divergence in sensitivity between the two models occurs at approximately eps = 1e-2."
PERTURBATION_DIVERGENCE_EPS = 1e-2
PERTURBATION_SIMILAR = PaperClaim(
    "At low perturbation levels (eps < 1e-3), both models perform similarly.", PERTURBATION_SOURCE
)
PERTURBATION_PDE_FASTER = PaperClaim(
    "Beyond eps = 1e-3 the PDE model's average loss increases more rapidly than the Transformer's.", PERTURBATION_SOURCE
)
PERTURBATION_DIVERGENCE = PaperClaim(
    "A significant divergence in sensitivity between the two models occurs at approximately eps = 1e-2.",
    PERTURBATION_SOURCE,
)

# ---- v2 abstract: stabilizers ---------------------------------------------------------------------------------------
V2_SOURCE = "v2 abstract (arXiv 2408.09523v2)"
V2_NO_RESIDUAL = PaperClaim(
    "Without residual connections, the system suffers from catastrophic representational drift.", V2_SOURCE
)
V2_NO_LAYERNORM = PaperClaim(
    "The absence of layer normalization leads to unstable, explosive training dynamics.", V2_SOURCE
)
V2_PDE_UNSTABLE = PaperClaim(
    "A PDE simulator that lacks explicit stabilizers is an inherently unstable continuous system "
    "(compared with a standard, stabilized Transformer).",
    V2_SOURCE,
)
