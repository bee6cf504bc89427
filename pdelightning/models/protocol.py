"""The analysis protocol: how a model tells the analysis callbacks what to look at.

A model (ours or a user's) implements one method, ``analysis_targets() -> AnalysisTargets``. The
callbacks try it first; failing that they walk ``named_modules()`` for TransformerLens-style hook
names, and failing that they use glob patterns from YAML. Implementing the protocol on your own model::

    class MyModel(nn.Module):
        def analysis_targets(self) -> AnalysisTargets:
            return AnalysisTargets(
                embedding=self.embed,
                layers=[
                    LayerTarget(name=f"layers.{i}", module=blk, attention=blk.attn, out_proj=blk.attn.out_proj)
                    for i, blk in enumerate(self.layers)
                ],
            )

``module`` is hooked for its output: the hidden state after that layer, ``[B, T, d]`` (or a tuple
whose first element is). ``attention`` is either one of our :class:`MultiHeadSelfAttention` (its
``hook_pattern`` gives the probabilities) or an ``nn.MultiheadAttention`` (probabilities are
recomputed from its captured inputs and ``in_proj_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@dataclass
class PDEStepParams:
    """Per-layer coefficients of one explicit Euler step (eq. 20), read at call time (detached).

    Attributes:
        diffusion: ``D_l`` as a per-feature vector ``[d]`` (a scalar ``D`` is broadcast; zeros when off).
        alpha: attention strength ``alpha_l``.
        dt: time step ``Δt``.
        dx: grid spacing ``Δx`` along token positions.
    """

    diffusion: Tensor
    alpha: float
    dt: float
    dx: float


@dataclass
class LayerTarget:
    """One layer the callbacks analyse.

    Attributes:
        name: stable name used in logged keys, e.g. ``"blocks.3"``.
        module: the module whose output is this layer's hidden state.
        attention: the layer's self-attention module, or ``None``.
        out_proj: the attention output projection ``W^O`` (a ``nn.Linear``), or ``None``.
        value_weight: ``W_V`` as ``[d, d]``, or ``None``.
        pde: Euler-step coefficients for PDE models, else ``None``.
    """

    name: str
    module: nn.Module
    attention: nn.Module | None = None
    out_proj: nn.Module | None = None
    value_weight: Tensor | None = None
    pde: PDEStepParams | None = None


@dataclass
class AnalysisTargets:
    """What a model exposes for analysis: its input embedding and its layers in depth order."""

    layers: list[LayerTarget]
    embedding: nn.Module | None = None
    extras: dict[str, nn.Module] = field(default_factory=dict)


@runtime_checkable
class SupportsAnalysis(Protocol):
    """A model that implements the analysis protocol."""

    def analysis_targets(self) -> AnalysisTargets:
        """Return the modules the analysis callbacks should hook."""
        ...
