"""Windowed and hierarchical attention (Swin): every stage's blocks, tokens ``[B, T, d]``, attention per window.

A Swin Transformer attends within non-overlapping windows of ``N = wh·ww`` tokens of a 2-D token grid, shifting the
windows cyclically by half a window in every other block (tokens brought together across the wrapped edge are kept
apart by an additive mask), and merges 2x2 patches between stages, so that each stage has its own token count ``T``
and width ``d``. The adapter here tells the callbacks:

* **layers**: the blocks of *every* stage, in depth order (``layers.{i}.blocks.{j}``), each declaring its
  :class:`~pdelightning.models.protocol.WindowLayout` (grid, window, shift, stage);
* **tokens**: every layer's output (and input and sublayer outputs) as ``[B, T, d]``: timm's channels-last
  ``[B, h, w, d]`` maps are flattened in raster order (HuggingFace's are tokens already);
* **attention** as per-window rows ``[B, H, T, N]`` (:func:`window_rows`): row ``t`` is token ``t``'s distribution over
  the ``N`` keys of its window (:func:`window_keys` names them), read from the library's own probabilities
  ``[B·nW, H, N, N]`` (timm's explicit path, HuggingFace's eager weights), with the shifted-window mask applied
  exactly (masked pairs, which the library weighs ``exp(-100)``, are zero). Row-wise quantities (similarity,
  entropy) are computed on these rows as on any attention row; products over layers need the full token-by-token
  operator, :func:`dense_attention`, within one stage.

Quantities that compare consecutive layers across a patch merging (different ``T`` and ``d``), compose the layer
maps through it, or assume a 1-D token axis (the PDE lens's Laplacian) are not defined for such a model; a callback
skips them and says so once (:func:`skip_once`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pdelightning.adapters.base import ModelAdapter, fastpath_off, linear_weight, reset_all, value_weight_of
from pdelightning.adapters.families import HuggingFaceAdapter
from pdelightning.models.protocol import AnalysisTargets, LayerTarget, WindowLayout
from pdelightning.utils import warn_once

_BLOCK = re.compile(r"^(?:.*\.)?layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)$")


# ---- the window geometry (pure functions) ------------------------------------------------------------------------
def flatten_grid(x: Tensor) -> Tensor:
    """``[B, h, w, d]`` channels-last maps as ``[B, h·w, d]`` tokens in raster order (other shapes unchanged).

    Example::

        >>> flatten_grid(torch.zeros(2, 3, 4, 5)).shape
        torch.Size([2, 12, 5])
    """
    return x.flatten(1, 2) if x.dim() == 4 else x


def _partition(grid: Tensor, window: tuple[int, int]) -> Tensor:
    """``[h, w]`` values as ``[nW, N]``: windows row-major over the grid, members row-major in each (as Swin does)."""
    h, w = grid.shape
    wh, ww = window
    return grid.view(h // wh, wh, w // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


@functools.lru_cache(maxsize=64)
def window_tokens(layout: WindowLayout) -> Tensor:
    """``[nW, N]``: the raster index of the token at each member of each window (after the cyclic shift).

    Window ``k`` of the batch-major ``[B·nW, ...]`` tensors of Swin is window ``k % nW`` of sample ``k // nW``.

    Example::

        >>> window_tokens(WindowLayout(grid=(2, 4), window=(2, 2))).tolist()
        [[0, 1, 4, 5], [2, 3, 6, 7]]
    """
    (h, w), (sh, sw) = layout.grid, layout.shift
    rows = (torch.arange(h) + sh) % h  # the shifted grid's position i holds token row (i + sh) mod h
    cols = (torch.arange(w) + sw) % w
    return _partition(rows[:, None] * w + cols[None, :], layout.window)


def _regions(size: int, window: int, shift: int) -> Tensor:
    idx = torch.arange(size)
    if shift == 0:
        return torch.zeros(size, dtype=torch.long)
    return (idx >= size - window).long() + (idx >= size - shift).long()


@functools.lru_cache(maxsize=64)
def window_allowed(layout: WindowLayout) -> Tensor:
    """``[nW, N, N]`` boolean: which query-key pairs of each window the shifted-window mask leaves attending.

    The same regions as Swin's ``attn_mask``: after the shift, tokens wrapped around an edge sit in a window with
    tokens they are not neighbours of, and pairs from different regions are masked. Unshifted: all ``True``.
    """
    (h, w), (wh, ww), (sh, sw) = layout.grid, layout.window, layout.shift
    if sh == 0 and sw == 0:
        n = wh * ww
        return torch.ones((h // wh) * (w // ww), n, n, dtype=torch.bool)
    label = _partition(_regions(h, wh, sh)[:, None] * 3 + _regions(w, ww, sw)[None, :], layout.window)
    return label[:, :, None] == label[:, None, :]


@functools.lru_cache(maxsize=64)
def _row_order(layout: WindowLayout) -> Tensor:
    return torch.argsort(window_tokens(layout).flatten())


def window_keys(layout: WindowLayout) -> Tensor:
    """``[T, N]``: the raster index of each key of token ``t``'s window, in the order of :func:`window_rows`."""
    index = window_tokens(layout)
    return index.repeat_interleave(index.shape[1], 0)[_row_order(layout)]


def window_rows(attention: Tensor, layout: WindowLayout) -> Tensor:
    """Per-window probabilities ``[B·nW, H, N, N]`` as rows ``[B, H, T, N]``: row ``t`` is token ``t``'s window row.

    Pairs the shifted-window mask separates are set to exactly zero (the library gives them ``exp(-100)``).

    Raises:
        ValueError: when the attention does not have the windows of ``layout``.
    """
    index = window_tokens(layout)
    nw, n = index.shape
    if attention.dim() != 4 or attention.shape[0] % nw or attention.shape[-2:] != (n, n):
        raise ValueError(
            f"expected windowed attention [B*{nw}, H, {n}, {n}] for grid {layout.grid} in windows {layout.window}, "
            f"got {tuple(attention.shape)}"
        )
    b, heads = attention.shape[0] // nw, attention.shape[1]
    allowed = window_allowed(layout).to(attention.device)
    p = attention.view(b, nw, heads, n, n).masked_fill(~allowed[None, :, None], 0.0)
    rows = p.permute(0, 2, 1, 3, 4).reshape(b, heads, nw * n, n)
    return rows[:, :, _row_order(layout).to(attention.device)]


def dense_attention(rows: Tensor, layout: WindowLayout) -> Tensor:
    """Per-window rows ``[B, H, T, N]`` as the full token-by-token operator ``[B, H, T, T]`` (zero outside windows).

    Example::

        >>> lay = WindowLayout(grid=(2, 4), window=(2, 2))
        >>> full = dense_attention(torch.full((1, 1, 8, 4), 0.25), lay)
        >>> full[0, 0, 0].tolist()
        [0.25, 0.25, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0]
    """
    b, heads, t, n = rows.shape
    keys = window_keys(layout).to(rows.device).expand(b, heads, t, n)
    return rows.new_zeros(b, heads, t, t).scatter_(-1, keys, rows)


def stages(layers: Sequence[LayerTarget]) -> list[list[LayerTarget]]:
    """The layers grouped by stage (consecutive layers with one :attr:`WindowLayout.stage`; unwindowed: one group)."""
    groups: list[list[LayerTarget]] = []
    for layer in layers:
        stage = layer.windows.stage if layer.windows is not None else None
        last = groups[-1][-1].windows if groups else None
        if groups and (last.stage if last is not None else None) == stage:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def stage_name(group: Sequence[LayerTarget]) -> str:
    """A stage's name in logged keys: its blocks' common module path (``layers.1`` of ``layers.1.blocks.0``)."""
    first = group[0].name
    return first.rsplit(".blocks.", 1)[0] if ".blocks." in first else first


def hierarchical(targets: AnalysisTargets) -> bool:
    """Whether ``targets`` span more than one stage (token count and width change between them)."""
    return len(stages(targets.layers)) > 1


def skip_once(callback: object, what: str, why: str) -> None:
    """Warn once per callback object and ``what`` that ``what`` is skipped, and why."""
    warn_once(callback, what, f"{type(callback).__name__}: {what} skipped: {why}")


# ---- the adapter ---------------------------------------------------------------------------------------------------
_TIMM_SWINS = {
    ("timm.models.swin_transformer", "SwinTransformer"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2"),  # cosine attention, read at its softmax
}


def _is_timm_swin(module: nn.Module) -> bool:
    return (type(module).__module__, type(module).__name__) in _TIMM_SWINS


def _is_hf_swin(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return False
    return getattr(getattr(module, "config", None), "model_type", None) == "swin"


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class SwinAdapter(ModelAdapter):
    """Swin Transformers: timm's ``SwinTransformer`` and ``SwinTransformerV2`` and HuggingFace's Swin models
    (``model_type == "swin"``).

    Layers are the blocks of every stage (``layers.{i}.blocks.{j}``); the attention is the block's ``attn`` (timm
    ``WindowAttention``, read on its explicit path; V2's at its softmax) or ``attention`` (HuggingFace
    ``SwinAttention``, read from its eager weights), each with its :class:`~pdelightning.models.protocol.WindowLayout`;
    the sublayer contributions are the outputs of the stochastic-depth modules (``drop_path1``/``drop_path2`` in timm,
    ``drop_path``/``mlp`` in HuggingFace); ``u_0`` is the first block's input (the patch embedding);
    re-initialisation uses the library's initialiser. A grid that the windows do not tile (the library pads it) gets
    no attention target for that layer.
    """

    family = "swin"
    priority = 85

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        return _is_timm_swin(module) or _is_hf_swin(module)

    def _blocks(self) -> list[tuple[str, int, nn.Module]]:
        found = []
        for name, m in self.model.named_modules():
            hit = _BLOCK.match(name)
            if hit is not None:
                found.append((name, int(hit["stage"]), int(hit["block"]), m))
        found.sort(key=lambda x: (x[1], x[2]))
        return [(n, s, m) for n, s, _, m in found]

    def _layout(self, block: nn.Module, stage: int) -> WindowLayout:
        grid = _pair(block.input_resolution)
        if _is_timm_swin(self.model):
            return WindowLayout(grid, _pair(block.window_size), _pair(block.shift_size), stage)
        window = int(self.model.config.window_size)  # HuggingFace clamps window and shift at call time, like this
        shift = 0 if min(grid) <= window else int(block.shift_size)
        window = min(window, *grid)
        return WindowLayout(grid, (window, window), (shift, shift), stage)

    def targets(self) -> AnalysisTargets:
        timm = _is_timm_swin(self.model)
        layers = []
        for name, stage, block in self._blocks():
            attn = block.attn if timm else block.attention
            layout = self._layout(block, stage)
            tiled = all(g % w == 0 for g, w in zip(layout.grid, layout.window, strict=True))
            proj = attn.proj if timm else attn.o_proj
            layers.append(
                LayerTarget(
                    name=self.name(name),
                    module=block,
                    attention=attn if tiled else None,
                    out_proj=proj,
                    block=block,
                    attn_out=block.drop_path1 if timm else block.drop_path,
                    mlp_out=block.drop_path2 if timm else block.mlp,
                    w_o=(lambda p: lambda: linear_weight(p))(proj),
                    w_v=value_weight_of(attn),
                    tokens=flatten_grid if timm else None,
                    windows=layout if tiled else None,
                )
            )
        first = layers[0].block if layers else None
        return AnalysisTargets(layers=layers, embedding=first, embedding_is_input=True, family=self.family)

    @contextlib.contextmanager
    def probe_mode(self, attention: bool = False) -> Iterator[None]:
        """timm: ``fused_attn`` off on every window attention; HuggingFace: the eager implementation."""
        if _is_hf_swin(self.model):
            with HuggingFaceAdapter.probe_mode(self, attention):  # type: ignore[arg-type]
                yield
            return
        switched = [m for m in self.model.modules() if getattr(m, "fused_attn", False) is True]
        with fastpath_off():
            for m in switched:
                m.fused_attn = False
            try:
                yield
            finally:
                for m in switched:
                    m.fused_attn = True

    def reinitialise(self, model: nn.Module) -> bool:
        if _is_hf_swin(model):
            return HuggingFaceAdapter.reinitialise(self, model)  # type: ignore[arg-type]
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
            return True
        return reset_all(model) > 0


__all__ = [
    "SwinAdapter",
    "dense_attention",
    "flatten_grid",
    "hierarchical",
    "skip_once",
    "stage_name",
    "stages",
    "window_allowed",
    "window_keys",
    "window_rows",
    "window_tokens",
]
