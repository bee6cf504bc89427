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

from collections.abc import Callable
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


@dataclass(frozen=True)
class WindowLayout:
    """How a windowed-attention layer (Swin) splits its token grid into attention windows.

    The attention of such a layer is ``[B·nW, H, N, N]`` per window; the capture hands it over as per-window rows
    ``[B, H, T, N]`` (see :func:`pdelightning.adapters.windowed.window_rows`): row ``t`` is token ``t`` of the
    ``grid`` (raster order) and its ``N`` entries are the keys of its window.

    Attributes:
        grid: the token grid ``(h, w)`` of the layer (``T = h·w``).
        window: the window ``(wh, ww)`` (``N = wh·ww``).
        shift: the cyclic shift ``(sh, sw)`` of the windows (shifted-window attention; pairs across the wrapped
            edge are masked).
        stage: the stage (resolution level) of the layer, ``0`` first; stages are separated by patch merging.
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int] = (0, 0)
    stage: int = 0


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
        block: the whole layer, callable as the layer map ``u_l -> u_{l+1}`` (its first input is the residual
            stream; its output, or the output's first element, is ``module``'s output). ``None``: ``module``.
        attn_out: the module whose output is the attention sublayer's contribution to the residual stream
            (without any PDE strength ``α``), or ``None``.
        mlp_out: likewise for the feed-forward sublayer, or ``None``.
        w_o: ``W^O`` read at call time, nn.Linear convention ``[d_model, H d_head]``; default from ``out_proj``.
        w_v: ``W_V`` read at call time, ``[H d_head, d_model]``; default ``value_weight``.
        tokens: a reshape of this layer's captured tensors (output, input, sublayer outputs) to ``[B, T, d]`` tokens,
            e.g. flattening a channels-last ``[B, h, w, d]`` map; undone by reshaping back. ``None``: already tokens.
        windows: the attention windows of a windowed-attention layer (its attention is captured per window), or
            ``None`` (attention over all tokens).
    """

    name: str
    module: nn.Module
    attention: nn.Module | None = None
    out_proj: nn.Module | None = None
    value_weight: Tensor | None = None
    pde: PDEStepParams | None = None
    block: nn.Module | None = None
    attn_out: nn.Module | None = None
    mlp_out: nn.Module | None = None
    w_o: Callable[[], Tensor] | None = None
    w_v: Callable[[], Tensor] | None = None
    tokens: Callable[[Tensor], Tensor] | None = None
    windows: WindowLayout | None = None

    def out_proj_weight(self) -> Tensor | None:
        """``W^O`` as ``[d_model, H d_head]`` (from ``w_o``, else ``out_proj.weight``), or ``None``."""
        if self.w_o is not None:
            return self.w_o()
        w = getattr(self.out_proj, "weight", None)
        return w if isinstance(w, Tensor) and w.dim() == 2 else None

    def value_proj_weight(self) -> Tensor | None:
        """``W_V`` as ``[H d_head, d_model]`` (from ``w_v``, else ``value_weight``), or ``None``."""
        if self.w_v is not None:
            return self.w_v()
        return self.value_weight


@dataclass
class AnalysisTargets:
    """What a model exposes for analysis: its input embedding and its layers in depth order.

    Attributes:
        layers: the layers, in depth order.
        embedding: the module whose output (or, with ``embedding_is_input``, whose first input) is the input
            embedding ``u_0`` entering the first layer.
        extras: anything else a model wants to name.
        embedding_is_input: ``u_0`` is the first input of ``embedding`` (e.g. the first block) rather than its output.
        n_prefix_tokens: class/register tokens in front of the sequence (timm, ViT), which have no padding.
        family: the model family that resolved these targets (``"ours"``, ``"huggingface"``, ...).
    """

    layers: list[LayerTarget]
    embedding: nn.Module | None = None
    extras: dict[str, nn.Module] = field(default_factory=dict)
    embedding_is_input: bool = False
    n_prefix_tokens: int = 0
    family: str = ""


@runtime_checkable
class SupportsAnalysis(Protocol):
    """A model that implements the analysis protocol."""

    def analysis_targets(self) -> AnalysisTargets:
        """Return the modules the analysis callbacks should hook."""
        ...
