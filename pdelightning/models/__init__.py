"""Models: plain ``nn.Module`` classifiers (no Lightning inside)."""

from pdelightning.models.attention import MultiHeadSelfAttention
from pdelightning.models.base import SequenceClassifier, masked_mean
from pdelightning.models.bottleneck import GaussianBottleneck, gaussian_kl_to_standard_normal
from pdelightning.models.embedding import InputEmbedding
from pdelightning.models.hooks import HookPoint
from pdelightning.models.pde import PDEClassifier, PDEStep
from pdelightning.models.pde_variants import DiffusionPDEClassifier, DiffusionStep, LinearPDEClassifier, LinearStep
from pdelightning.models.protocol import AnalysisTargets, LayerTarget, PDEStepParams, SupportsAnalysis
from pdelightning.models.transformer import TransformerBlock, TransformerClassifier

__all__ = [
    "AnalysisTargets",
    "DiffusionPDEClassifier",
    "DiffusionStep",
    "GaussianBottleneck",
    "HookPoint",
    "InputEmbedding",
    "LayerTarget",
    "LinearPDEClassifier",
    "LinearStep",
    "MultiHeadSelfAttention",
    "PDEClassifier",
    "PDEStep",
    "PDEStepParams",
    "SequenceClassifier",
    "SupportsAnalysis",
    "TransformerBlock",
    "TransformerClassifier",
    "gaussian_kl_to_standard_normal",
    "masked_mean",
]
