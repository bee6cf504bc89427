"""The adapter interface: what the analysis callbacks need to know about a model family.

An adapter recognises one family of models by module types or structure and tells the callbacks, for the
model it recognised:

* :meth:`ModelAdapter.targets`: the layers in depth order (the module whose output is the residual stream
  after the layer, the whole block as the layer map, the attention module, the sublayer outputs, ``W^O`` and
  ``W_V`` as callables read at probe time), where the input embedding ``u_0`` is, and how many class/register
  tokens lead the sequence;
* :meth:`ModelAdapter.probe_mode`: what to switch for a probe forward (fast paths off, eager attention), undone
  after it;
* :meth:`ModelAdapter.padding`: where the padding mask the model itself uses can be read during a forward;
* :meth:`ModelAdapter.reinitialise`: the family's own initialiser, for a re-initialised null model.

Adapters are found by :func:`pdelightning.adapters.find_adapter`; users register their own with
:func:`pdelightning.adapters.register_adapter`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pdelightning.models.protocol import AnalysisTargets

#: Names (last path segment) of attention output projections, in order of preference.
OUT_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "proj", "dense", "out_lin", "wo", "Wo", "o", "out", "W_O")
#: Names of value projections.
VALUE_NAMES = ("value", "v_proj", "v", "v_lin", "wv")
#: Names of fused query-key-value projections (the value block is the last third).
QKV_NAMES = ("qkv", "c_attn", "query_key_value", "Wqkv", "in_proj")
#: Names of feed-forward sublayers.
MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff", "feedforward")
#: Names of the last linear map of a feed-forward sublayer written inline in the block (BART, Whisper, OPT).
FFN_OUT_NAMES = ("fc2",)
_ATTN_CLASS = re.compile(r"attention|attn", re.IGNORECASE)


def linear_weight(module: nn.Module | None) -> Tensor | None:
    """A projection's weight in ``nn.Linear`` convention ``[out, in]``.

    HuggingFace's ``Conv1D`` (GPT-2) stores ``[in, out]`` and is transposed; anything without a 2-D ``weight``
    gives ``None``.

    Example::

        >>> linear_weight(nn.Linear(3, 5)).shape
        torch.Size([5, 3])
    """
    if module is None:
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        return None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return w.T
    return w


def child(module: nn.Module, *names: str) -> nn.Module | None:
    """The first direct child of ``module`` with one of ``names``, else ``None``."""
    for n in names:
        c = getattr(module, n, None)
        if isinstance(c, nn.Module):
            return c
    return None


def attention_like(module: nn.Module) -> bool:
    """Whether ``module`` looks like attention: an MHA, a ``hook_pattern``, or 'attention'/'attn' in its class."""
    if isinstance(module, nn.MultiheadAttention) or isinstance(getattr(module, "hook_pattern", None), nn.Module):
        return True
    return bool(_ATTN_CLASS.search(type(module).__name__)) and not type(module).__name__.lower().endswith("output")


def find_attention(block: nn.Module) -> nn.Module | None:
    """The self-attention module inside ``block``: the innermost attention-like module holding the projections.

    An ``nn.MultiheadAttention`` or a module with a ``hook_pattern`` wins at once (the first in module order: the
    self-attention of a decoder layer comes before its cross-attention). Otherwise, among attention-like modules
    (by class name), the first that has projection layers (``Linear``/``Conv1D``) as direct children, so that in
    BERT ``attention.self`` is chosen over its wrapper ``attention``.
    """
    candidates = []
    for _, m in block.named_modules():
        if m is block:
            continue
        if isinstance(m, nn.MultiheadAttention) or isinstance(getattr(m, "hook_pattern", None), nn.Module):
            return m
        if attention_like(m):
            candidates.append(m)
    for m in candidates:
        if any(linear_weight(c) is not None for c in m.children()):
            return m
    return candidates[0] if candidates else None


def parent_of(root: nn.Module, target: nn.Module) -> nn.Module | None:
    """The module of ``root``'s tree that has ``target`` as a direct child."""
    for m in root.modules():
        if any(c is target for c in m.children()):
            return m
    return None


def out_proj_of(attn: nn.Module, block: nn.Module | None = None) -> nn.Module | None:
    """The attention output projection ``W^O``: a known child of ``attn``, else ``output.dense`` beside it (BERT)."""
    proj = child(attn, *OUT_PROJ_NAMES)
    if proj is not None and linear_weight(proj) is not None:
        return proj
    parent = parent_of(block, attn) if block is not None else None
    if parent is not None:
        out = child(parent, "output")
        dense = child(out, "dense") if out is not None else None
        if linear_weight(dense) is not None:
            return dense
    return None


def value_weight_of(attn: nn.Module) -> Callable[[], Tensor] | None:
    """``W_V`` of ``attn`` as ``[H d_head, d]`` read at call time, from a value or a fused qkv projection.

    Grouped key/value heads (Llama-style ``num_key_value_groups``) are repeated to one block per query head so that
    ``W^O W_V`` composes. ``None`` when no value weight can be found.
    """
    if isinstance(attn, nn.MultiheadAttention):
        if attn.in_proj_weight is not None:
            return lambda: attn.in_proj_weight[2 * attn.embed_dim :]
        return lambda: attn.v_proj_weight
    v = child(attn, *VALUE_NAMES)
    if v is not None and linear_weight(v) is not None:
        groups = int(getattr(attn, "num_key_value_groups", 1) or 1)
        head_dim = getattr(attn, "head_dim", None)

        def w_v() -> Tensor:
            w = linear_weight(v)
            assert w is not None
            if groups > 1 and head_dim:
                n_kv = w.shape[0] // head_dim
                w = w.reshape(n_kv, head_dim, w.shape[1]).repeat_interleave(groups, 0).reshape(-1, w.shape[1])
            return w

        return w_v
    qkv = child(attn, *QKV_NAMES)
    if qkv is not None and linear_weight(qkv) is not None:

        def w_v_fused() -> Tensor:
            w = linear_weight(qkv)
            assert w is not None
            third = w.shape[0] // 3
            return w[2 * third :]

        return w_v_fused
    if hasattr(attn, "value_weight"):
        return lambda: attn.value_weight
    return None


def reset_all(model: nn.Module) -> int:
    """Call ``reset_parameters()`` (or ``_reset_parameters()``) on every submodule that has one; return how many."""
    n = 0
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if callable(reset) and m is not model:
            reset()
            n += 1
    return n


@contextlib.contextmanager
def fastpath_off() -> Iterator[None]:
    """Switch PyTorch's fused MHA/Transformer fast path (and its nested tensors) off, restoring it afterwards.

    In eval mode under ``no_grad`` ``nn.TransformerEncoderLayer`` otherwise skips its submodules (hooks see nothing)
    and ``nn.TransformerEncoder`` turns padded batches into NestedTensors.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


class ModelAdapter:
    """Base class of the family adapters (see the module docstring).

    Args:
        root: the module the callbacks were given (usually the LightningModule).
        model: the module of ``root``'s tree this adapter recognised.
        prefix: ``model``'s dotted name in ``root`` (``""`` when ``model is root``), prepended to layer names.

    Subclasses set ``family`` and implement :meth:`detect` and :meth:`targets`.
    """

    family: ClassVar[str] = "base"
    #: Adapters are tried in descending priority; the first whose :meth:`detect` accepts a module wins.
    priority: ClassVar[int] = 0

    def __init__(self, root: nn.Module, model: nn.Module, prefix: str = "") -> None:
        self.root, self.model, self.prefix = root, model, prefix

    @classmethod
    def detect(cls, module: nn.Module) -> bool:
        """Whether this adapter recognises ``module``."""
        raise NotImplementedError

    def targets(self) -> AnalysisTargets:
        """The layers, embedding and prefix tokens (resolved at call time: PDE coefficients are read live)."""
        raise NotImplementedError

    def name(self, sub: str) -> str:
        """``sub``'s name in the root module's namespace."""
        return f"{self.prefix}.{sub}" if self.prefix and sub else (self.prefix or sub)

    @contextlib.contextmanager
    def probe_mode(self, attention: bool = False) -> Iterator[None]:
        """Context of a probe forward: fast paths off (with ``attention``, whatever makes the probabilities exist)."""
        with fastpath_off():
            yield

    def padding(self) -> tuple[nn.Module, Callable[[tuple[Any, ...], dict[str, Any]], Tensor | None]] | None:
        """Where the model's own padding mask is: ``(module, read)``, or ``None`` (default: from the batch).

        ``read(args, kwargs)`` of a forward pre-hook on ``module`` gives the ``[B, T]`` valid-token mask (``True`` =
        real token) the model itself uses, or ``None``.
        """
        return None

    def reinitialise(self, model: nn.Module) -> bool:
        """Re-draw every parameter of ``model`` (a copy of this adapter's model) with the family's initialiser.

        Seeding is the caller's. Returns ``False`` when the family has no initialiser (the null is then dropped).
        """
        return reset_all(model) > 0
