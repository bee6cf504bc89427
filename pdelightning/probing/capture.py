"""Capturing what one probe forward computes, for every callback at once, then letting go.

:class:`Capture` hooks a model through its adapter's targets for the union of what the due callbacks asked for
(:class:`Request`): each layer's output (the residual stream after it), the input embedding ``u_0``, the attention
probabilities, the sublayer contributions and layer inputs (for the PDE fit and the Jacobians). Nothing is kept
between probe batches: :meth:`Capture.pop` hands the tensors over and forgets them. :class:`EmbeddingEdit` rewrites
``u_0`` during a forward (perturbations).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from pdelightning.adapters.base import ModelAdapter, fastpath_off
from pdelightning.adapters.readers import attention_reader, first_tensor
from pdelightning.adapters.windowed import window_rows
from pdelightning.models.protocol import AnalysisTargets, LayerTarget, WindowLayout

_HIDDEN_KWARGS = ("hidden_states", "x", "src", "tgt", "input", "u")


@dataclass(frozen=True)
class Request:
    """What a callback needs from a probe forward of one model.

    Attributes:
        hidden: every layer's output ``[B, T, d]``.
        embedding: the input embedding ``u_0`` ``[B, T, d]``.
        attention: every layer's attention probabilities ``[B, H, Q, K]`` (switches the model to its explicit path).
        sublayers: every layer's input (``resid_pre``) and its attention and MLP contributions.
        block_inputs: every layer's call arguments, to call the layer again as a map (Jacobians).
        samples: for a reference or null model: run it only on the random subset of this many probe samples
            (:meth:`~pdelightning.probing.hub.ProbeSession.subset`); ``None``: on all (the model under training always
            runs on all).
    """

    hidden: bool = False
    embedding: bool = False
    attention: bool = False
    sublayers: bool = False
    block_inputs: bool = False
    samples: int | None = None

    def __or__(self, other: Request) -> Request:
        flags = {f.name: getattr(self, f.name) or getattr(other, f.name) for f in fields(self) if f.name != "samples"}
        a, b = self.samples, other.samples
        return Request(**flags, samples=None if a is None or b is None else max(a, b))

    @property
    def empty(self) -> bool:
        """Whether nothing is requested (the forward still gives logits)."""
        return not any(getattr(self, f.name) for f in fields(self) if f.name != "samples")


@dataclass
class Captured:
    """The tensors one forward produced (detached), by layer name."""

    hidden: dict[str, Tensor] = field(default_factory=dict)
    embedding: Tensor | None = None
    attention: dict[str, Tensor] = field(default_factory=dict)
    resid_pre: dict[str, Tensor] = field(default_factory=dict)
    attn_out: dict[str, Tensor] = field(default_factory=dict)
    mlp_out: dict[str, Tensor] = field(default_factory=dict)
    block_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    valid: Tensor | None = None


def embedding_view(targets: AnalysisTargets) -> Callable[[Tensor], Tensor] | None:
    """The first layer's token view (:attr:`LayerTarget.tokens`) when ``u_0`` is that layer's input, else ``None``."""
    if not targets.layers or not targets.embedding_is_input:
        return None
    first = targets.layers[0]
    return first.tokens if targets.embedding is (first.block or first.module) else None


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The residual-stream input of a layer call: the first positional tensor, else a known keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    for k in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(k), Tensor):
            return kwargs[k]
    return None


def replace_first_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], value: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with the residual-stream input replaced by ``value``."""
    if args and isinstance(args[0], Tensor):
        return (value, *args[1:]), kwargs
    for k in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(k), Tensor):
            return args, {**kwargs, k: value}
    raise TypeError("cannot find the layer's hidden-state input among its arguments")


class Capture:
    """Context manager recording, for the forwards inside it, what ``request`` asks of ``targets``.

    Args:
        adapter: the model's adapter (for its probe mode and padding source), or ``None``.
        targets: the resolved targets.
        request: what to record.
        rows: record only these rows of every tensor (e.g. one slice of a batched perturbation forward).
    """

    def __init__(
        self, adapter: ModelAdapter | None, targets: AnalysisTargets, request: Request, rows: slice | None = None
    ) -> None:
        self.adapter, self.targets, self.request, self.rows = adapter, targets, request, rows
        self.data = Captured()
        self._stack = ExitStack()

    def _keep(self, t: Tensor, view: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        t = t.detach() if view is None else view(t.detach())
        return t[self.rows] if self.rows is not None else t

    def _out_hook(self, bucket: str, layer: LayerTarget) -> Callable[..., None]:
        # the bucket is looked up at call time: after pop() the next forward fills the new Captured, not the popped one
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            getattr(self.data, bucket)[layer.name] = self._keep(first_tensor(output), layer.tokens)

        return hook

    def _attention_sink(self, name: str, windows: WindowLayout | None = None) -> Callable[[Tensor], None]:
        def sink(p: Tensor) -> None:
            self.data.attention[name] = self._keep(p if windows is None else window_rows(p, windows))

        return sink

    def __enter__(self) -> Capture:
        r, t, stack = self.request, self.targets, self._stack
        mode = self.adapter.probe_mode(attention=r.attention) if self.adapter is not None else fastpath_off()
        stack.enter_context(mode)
        for layer in t.layers:
            if r.hidden:
                stack.callback(layer.module.register_forward_hook(self._out_hook("hidden", layer)).remove)
            if r.attention and layer.attention is not None:
                sink = self._attention_sink(layer.name, layer.windows)
                stack.enter_context(attention_reader(layer.attention, sink))
            block = layer.block or layer.module
            if r.sublayers or r.block_inputs:

                def pre(
                    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: LayerTarget = layer
                ) -> None:
                    if r.block_inputs:
                        self.data.block_inputs[layer.name] = (args, kwargs)
                    u = first_input(args, kwargs)
                    if r.sublayers and u is not None:
                        self.data.resid_pre[layer.name] = self._keep(u, layer.tokens)

                stack.callback(block.register_forward_pre_hook(pre, with_kwargs=True).remove)
            if r.sublayers:
                if layer.attn_out is not None:
                    hook = self._out_hook("attn_out", layer)
                    stack.callback(layer.attn_out.register_forward_hook(hook).remove)
                if layer.mlp_out is not None:
                    hook = self._out_hook("mlp_out", layer)
                    stack.callback(layer.mlp_out.register_forward_hook(hook).remove)
        if r.embedding and t.embedding is not None:
            if t.embedding_is_input:
                view = embedding_view(t)

                def embed_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                    u = first_input(args, kwargs)
                    if u is not None:
                        self.data.embedding = self._keep(u, view)

                stack.callback(t.embedding.register_forward_pre_hook(embed_pre, with_kwargs=True).remove)
            else:

                def embed_out(module: nn.Module, args: Any, output: Any) -> None:
                    self.data.embedding = self._keep(first_tensor(output))

                stack.callback(t.embedding.register_forward_hook(embed_out).remove)
        padding = self.adapter.padding() if self.adapter is not None else None
        if padding is not None:
            module, read = padding

            def pad_pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                v = read(args, kwargs)
                if v is not None:
                    self.data.valid = self._keep(v)

            stack.callback(module.register_forward_pre_hook(pad_pre, with_kwargs=True).remove)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def pop(self) -> Captured:
        """What the forwards so far recorded; the capture starts empty again."""
        data, self.data = self.data, Captured()
        return data


class EmbeddingEdit:
    """Rewrites ``u_0`` with ``fn(u_0)`` during the forwards inside it (while ``fn`` is set).

    ``u_0`` is the output of ``targets.embedding``, or its first input when ``targets.embedding_is_input``; ``fn`` sees
    it as the capture hands it over (the first layer's token view, e.g. ``[B, T, d]`` of a channels-last map) and its
    result is reshaped back to the model's own layout.
    """

    def __init__(self, targets: AnalysisTargets) -> None:
        if targets.embedding is None:
            raise ValueError("no input-embedding module to perturb")
        self.targets = targets
        self.fn: Callable[[Tensor], Tensor] | None = None
        self._handle: Any = None

    def __enter__(self) -> EmbeddingEdit:
        module = self.targets.embedding
        assert module is not None
        if self.targets.embedding_is_input:
            view = embedding_view(self.targets)

            def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                u = first_input(args, kwargs)
                if self.fn is None or u is None:
                    return None
                edited = self.fn(u) if view is None else self.fn(view(u)).reshape(u.shape)
                return replace_first_input(args, kwargs, edited)

            self._handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        else:

            def post(m: nn.Module, args: Any, output: Any) -> Any:
                if self.fn is None:
                    return None
                u = self.fn(first_tensor(output))
                return u if isinstance(output, Tensor) else type(output)([u, *output[1:]])

            self._handle = module.register_forward_hook(post)
        return self

    def __exit__(self, *exc: object) -> None:
        self.fn = None
        self._handle.remove()


@torch.no_grad()
def pad_prefix(valid: Tensor | None, length: int) -> Tensor | None:
    """A ``[B, T']`` valid mask extended at the front to ``length`` positions (prefix tokens are always valid)."""
    if valid is None or valid.shape[1] == length:
        return valid
    if valid.shape[1] > length:
        return None
    lead = torch.ones(valid.shape[0], length - valid.shape[1], dtype=torch.bool, device=valid.device)
    return torch.cat([lead, valid.bool()], 1)
