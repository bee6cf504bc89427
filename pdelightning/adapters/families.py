"""The built-in adapters: our models and the protocol, TransformerLens, PyTorch, HuggingFace, timm, and a fallback.

(HuggingFace's lives in :mod:`pdelightning.adapters.huggingface`.)

Each class documents how it recognises its family and where it finds the layers, the attention and the
embedding; see :mod:`pdelightning.adapters.base` for the interface.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from pdelightning.adapters.base import (
    ModelAdapter,
    attention_like,
    child,
    fastpath_off,
    find_attention,
    linear_weight,
    out_proj_of,
    reset_all,
    value_weight_of,
)
from pdelightning.adapters.huggingface import HuggingFaceAdapter, sublayers
from pdelightning.models.attention import MultiHeadSelfAttention
from pdelightning.models.protocol import AnalysisTargets, LayerTarget


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, *names: str) -> Any:
    if len(args) > index:
        return args[index]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return None


def valid_from_padding_mask(mask: Any) -> Tensor | None:
    """``[B, T]`` valid-token mask from a PyTorch key padding mask (bool ``True`` or additive ``-inf`` = padding).

    Example::

        >>> import torch
        >>> valid_from_padding_mask(torch.tensor([[False, True]])).tolist()
        [[True, False]]
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    if mask.dtype.is_floating_point:
        return mask == 0
    return ~mask.bool()


# ---- our models and the analysis protocol -------------------------------------------------------------------
class ProtocolAdapter(ModelAdapter):
    """Any module implementing ``analysis_targets()`` (our models; a user's model implementing the protocol)."""

    family = "ours"
    priority = 100

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        return callable(getattr(module, "analysis_targets", None))

    @contextlib.contextmanager
    def probe_mode(self, attention: bool = False) -> Iterator[None]:
        """Fast paths off, and our attention modules on their explicit path for every probe forward."""
        switched = [m for m in self.model.modules() if isinstance(m, MultiHeadSelfAttention) and not m.force_explicit]
        with fastpath_off():
            for m in switched:
                m.force_explicit = True
            try:
                yield
            finally:
                for m in switched:
                    m.force_explicit = False

    def targets(self) -> AnalysisTargets:
        t = self.model.analysis_targets()
        if not t.family:
            t.family = "protocol"
        return t

    def reinitialise(self, model: nn.Module) -> bool:
        reset = getattr(model, "reset_parameters", None)
        if callable(reset):
            reset()
            return True
        return reset_all(model) > 0

    def padding(self) -> tuple[nn.Module, Callable[[tuple[Any, ...], dict[str, Any]], Tensor | None]] | None:
        targets = self.targets()
        if not targets.layers or targets.family != "ours":
            return None
        block = targets.layers[0].block or targets.layers[0].module
        return block, lambda args, kwargs: valid_from_padding_mask(_first_arg(args, kwargs, 1, "padding_mask"))


# ---- TransformerLens ---------------------------------------------------------------------------------------------
_RESID_POST = re.compile(r"^(?P<prefix>(?:.*\.)?)blocks\.(?P<i>\d+)\.hook_resid_post$")


class TransformerLensAdapter(ModelAdapter):
    """TransformerLens ``HookedTransformer`` (3.x), or any model with its hook names (``blocks.{i}.hook_resid_post``
    under a ``blocks`` list).

    Layers are the ``hook_resid_post`` points, attention ``blocks.{i}.attn`` (read at ``hook_pattern``), ``u_0`` is
    ``blocks.0.hook_resid_pre`` (token plus positional embedding) when present, else ``hook_embed``; ``W^O``/``W_V``
    come from the ``W_O [H, d_head, d]``/``W_V [H, d, d_head]`` parameters; re-initialisation uses the model's
    ``init_weights()``.
    """

    family = "transformer_lens"
    priority = 90

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        blocks = getattr(module, "blocks", None)
        return (
            isinstance(blocks, (nn.ModuleList, nn.Sequential))
            and len(blocks) > 0
            and isinstance(getattr(blocks[0], "hook_resid_post", None), nn.Module)
        )

    def targets(self) -> AnalysisTargets:
        modules = dict(self.model.named_modules())
        posts = sorted((n for n in modules if _RESID_POST.match(n)), key=_natural_key)
        layers = []
        for n in posts:
            block_name = n[: -len(".hook_resid_post")]
            block = modules.get(block_name)
            attn = modules.get(f"{block_name}.attn")
            w_o = w_v = None
            if attn is not None and isinstance(getattr(attn, "W_O", None), Tensor):
                w_o = (lambda a: lambda: a.W_O.reshape(-1, a.W_O.shape[-1]).T)(attn)
                w_v = (lambda a: lambda: a.W_V.permute(0, 2, 1).reshape(-1, a.W_V.shape[1]))(attn)
            layers.append(
                LayerTarget(
                    name=self.name(block_name),
                    module=modules[n],
                    attention=attn,
                    out_proj=child(attn, "out_proj") if attn is not None else None,
                    value_weight=getattr(attn, "value_weight", None) if attn is not None else None,
                    block=block,
                    attn_out=modules.get(f"{block_name}.hook_attn_out"),
                    mlp_out=modules.get(f"{block_name}.hook_mlp_out"),
                    w_o=w_o,
                    w_v=w_v,
                )
            )
        prefix = _RESID_POST.match(posts[0]).group("prefix") if posts else ""  # type: ignore[union-attr]
        embed = modules.get(f"{prefix}blocks.0.hook_resid_pre") or modules.get(f"{prefix}hook_embed")
        return AnalysisTargets(layers=layers, embedding=embed, family=self.family)

    def reinitialise(self, model: nn.Module) -> bool:
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
            return True
        return reset_all(model) > 0


# ---- stock PyTorch -------------------------------------------------------------------------------------------------
class TorchTransformerAdapter(ModelAdapter):
    """``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` (and a bare ``nn.Transformer``'s encoder).

    Layers are ``layers.{i}``; attention their ``self_attn`` (read with ``need_weights=True``); the sublayer
    contributions are the outputs of ``dropout1`` (attention) and ``dropout2`` (feed-forward), which is where
    ``_sa_block``/``_ff_block`` end; ``u_0`` is the first layer's input; the padding mask is the
    ``src_key_padding_mask`` (``tgt_key_padding_mask``) the layers receive. Probes switch the fast path and nested
    tensors off, so the layers' hooks see plain tensors also in eval mode with a padding mask.
    """

    family = "torch"
    priority = 60

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder))

    def targets(self) -> AnalysisTargets:
        layers = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            layers.append(
                LayerTarget(
                    name=self.name(f"layers.{i}"),
                    module=layer,
                    attention=attn,
                    out_proj=attn.out_proj,
                    block=layer,
                    attn_out=getattr(layer, "dropout1", None),
                    mlp_out=getattr(layer, "dropout2", None),
                    w_o=(lambda a: lambda: a.out_proj.weight)(attn),
                    w_v=value_weight_of(attn),
                )
            )
        first = self.model.layers[0] if len(self.model.layers) else None
        return AnalysisTargets(layers=layers, embedding=first, embedding_is_input=True, family=self.family)

    @contextlib.contextmanager
    def probe_mode(self, attention: bool = False) -> Iterator[None]:
        """Fast path and nested tensors off; every attention call on its explicit (``need_weights``) path."""

        def explicit(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")
            bound = dict(zip(names, args, strict=False)) | kwargs
            bound["need_weights"] = True
            bound.setdefault("average_attn_weights", False)
            return (), bound

        handles = [layer.self_attn.register_forward_pre_hook(explicit, with_kwargs=True) for layer in self.model.layers]
        with fastpath_off():
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

    def padding(self) -> tuple[nn.Module, Callable[[tuple[Any, ...], dict[str, Any]], Tensor | None]] | None:
        if not len(self.model.layers):
            return None
        decoder = isinstance(self.model, nn.TransformerDecoder)
        index, name = (4, "tgt_key_padding_mask") if decoder else (2, "src_key_padding_mask")
        return self.model.layers[0], lambda a, k: valid_from_padding_mask(_first_arg(a, k, index, name))


# ---- timm ----------------------------------------------------------------------------------------------------------
class TimmAdapter(ModelAdapter):
    """timm Vision Transformers (``blocks.{i}`` of ``Block``, ``attn.qkv``/``attn.proj``, ``num_prefix_tokens``).

    Attention is read with ``fused_attn`` off for the probe (at ``attn.attn_drop``); ``u_0`` is the first block's
    input, class and register tokens included (``num_prefix_tokens`` of them, never padding), so every per-position
    quantity lines up with the blocks' outputs. Sublayer contributions are the outputs of ``ls1``/``ls2`` (layer
    scale, identity when off). Re-initialisation uses the model's ``init_weights()``.
    """

    family = "timm"
    priority = 70

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        blocks = getattr(module, "blocks", None)
        return (
            type(module).__module__.startswith("timm.")
            and isinstance(blocks, (nn.Sequential, nn.ModuleList))
            and len(blocks) > 0
            and hasattr(blocks[0], "attn")
        )

    def targets(self) -> AnalysisTargets:
        layers = []
        for i, block in enumerate(self.model.blocks):
            attn = block.attn
            proj = child(attn, "proj")
            layers.append(
                LayerTarget(
                    name=self.name(f"blocks.{i}"),
                    module=block,
                    attention=attn,
                    out_proj=proj,
                    block=block,
                    attn_out=child(block, "ls1") or attn,
                    mlp_out=child(block, "ls2") or child(block, "mlp"),
                    w_o=(lambda p: lambda: linear_weight(p))(proj) if proj is not None else None,
                    w_v=value_weight_of(attn),
                )
            )
        return AnalysisTargets(
            layers=layers,
            embedding=self.model.blocks[0],
            embedding_is_input=True,
            n_prefix_tokens=int(getattr(self.model, "num_prefix_tokens", 0) or 0),
            family=self.family,
        )

    @contextlib.contextmanager
    def probe_mode(self, attention: bool = False) -> Iterator[None]:
        """Fast paths off, and timm's explicit attention path for every probe forward (one numerical path)."""
        switched = [b.attn for b in self.model.blocks if getattr(b.attn, "fused_attn", False)]
        with fastpath_off():
            for a in switched:
                a.fused_attn = False
            try:
                yield
            finally:
                for a in switched:
                    a.fused_attn = True

    def reinitialise(self, model: nn.Module) -> bool:
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()
            return True
        return reset_all(model) > 0


# ---- the fallback ---------------------------------------------------------------------------------------------------
class GenericAdapter(ModelAdapter):
    """A user's own Transformer with no names at all: the repeated block list.

    The longest ``ModuleList``/``Sequential`` of at least two children of one class that own parameters (preferring
    one whose blocks contain an attention-like module) is taken as the layers; attention is found inside each block
    by type or class name and read by the generic softmax/SDPA interceptor when nothing better applies; ``u_0`` is the
    first block's input. Whether the blocks' outputs are ``[B, T, d]`` is checked at the first probe.
    """

    family = "generic"
    priority = 10

    @staticmethod
    def _blocks(module: nn.Module) -> tuple[str, nn.Module] | None:
        best: tuple[tuple[int, int], str, nn.Module] | None = None
        for name, m in module.named_modules():
            if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
                continue
            kids = list(m.children())
            if len({type(k) for k in kids}) != 1 or next(kids[0].parameters(), None) is None:
                continue
            if isinstance(kids[0], (nn.Linear, nn.LayerNorm, nn.Embedding)):  # a list of plain layers is no block list
                continue
            has_attn = any(attention_like(x) for x in kids[0].modules())
            score = (int(has_attn), len(kids))
            if best is None or score > best[0]:
                best = (score, name, m)
        return (best[1], best[2]) if best is not None else None

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        return cls._blocks(module) is not None

    def targets(self) -> AnalysisTargets:
        found = self._blocks(self.model)
        assert found is not None
        list_name, blocks = found
        layers = []
        for key, block in blocks.named_children():  # the real path (torchvision: encoder.layers.encoder_layer_0)
            attn = find_attention(block)
            proj = out_proj_of(attn, block) if attn is not None else None
            attn_out, mlp_out = sublayers(block, attn)
            layers.append(
                LayerTarget(
                    name=self.name(f"{list_name}.{key}" if list_name else key),
                    module=block,
                    attention=attn,
                    out_proj=proj,
                    block=block,
                    attn_out=attn_out,
                    mlp_out=mlp_out,
                    w_o=(lambda p: lambda: linear_weight(p))(proj) if proj is not None else None,
                    w_v=value_weight_of(attn) if attn is not None else None,
                )
            )
        return AnalysisTargets(layers=layers, embedding=blocks[0], embedding_is_input=True, family=self.family)


BUILTIN_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    ProtocolAdapter,
    TransformerLensAdapter,
    HuggingFaceAdapter,
    TimmAdapter,
    TorchTransformerAdapter,
    GenericAdapter,
)
