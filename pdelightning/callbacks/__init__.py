"""Analysis callbacks that attach to any Lightning run, and their base :class:`ProbeCallback` to write your own
(see ``README.md`` in this folder).
"""

from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.attention_rollout import AttentionRollout
from pdelightning.callbacks.attention_similarity import AttentionSimilarity
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.callbacks.gradient_flow import GradientFlow
from pdelightning.callbacks.information_flow import InformationFlow
from pdelightning.callbacks.jacobian_stability import JacobianStability
from pdelightning.callbacks.layer_mutual_information import LayerMutualInformation
from pdelightning.callbacks.pde_fit import PDEFit
from pdelightning.callbacks.perturbation_eval import PerturbationEval
from pdelightning.callbacks.stability_monitor import StabilityMonitor

__all__ = [
    "AttentionRollout",
    "AttentionSimilarity",
    "GradientFlow",
    "InformationFlow",
    "JacobianStability",
    "LayerMutualInformation",
    "PDEFit",
    "PerturbationEval",
    "ProbeCallback",
    "StabilityMonitor",
    "TargetNotFoundError",
]
