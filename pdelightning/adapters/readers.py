"""Reading exact attention probabilities ``[B, H, Q, K]`` out of any attention module during a probe forward.

Each family computes attention its own way, and the fused kernels most use by default never form the
probabilities. A reader switches the module to its library's explicit path for the probe forward only and
takes the probabilities from where that library itself produces them:

* a ``hook_pattern`` hook point (our models, TransformerLens): hooked directly;
* ``nn.MultiheadAttention`` (stock PyTorch layers call it with ``need_weights=False``): the call is rewritten to
  ``need_weights=True, average_attn_weights=False`` and the second output is read;
* HuggingFace attention modules (``config._attn_implementation``): the model is switched to ``"eager"`` for the
  probe (see :class:`~pdelightning.adapters.families.HuggingFaceAdapter`) and the weights its eager path returns
  are read: the module's last output (T5's ``(output, position_bias, weights)`` included), checked to be
  ``[B, H, Q, K]`` for the module's batch and queries (:func:`hf_attention_weights`);
* timm ``Attention`` (``fused_attn``): the fused path is switched off for the probe and the probabilities are read
  at ``attn_drop``, through which timm's explicit path passes them;
* anything else: :class:`SoftmaxInterceptor` watches the module's own forward for a 4-D ``softmax`` or a
  ``scaled_dot_product_attention`` call (with ``TorchFunctionMode``) and records the probabilities of that call:
  the softmax output itself, or ``softmax(q kᵀ · scale + mask)`` rebuilt from the SDPA arguments (causal flag,
  boolean or additive masks and grouped key/value heads respected).

Every reader is a context manager whose ``__enter__`` installs its hooks and whose ``__exit__`` removes them and
restores any switched flag, so the training step after a probe runs exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

Sink = Callable[[Tensor], None]


def first_tensor(output: Any) -> Tensor:
    """The hidden state in a module output: the tensor, a tuple/list's first element, or ``.last_hidden_state``.

    Example::

        >>> first_tensor((torch.ones(1), None)).shape
        torch.Size([1])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    for attr in ("last_hidden_state", "hidden_states"):
        value = getattr(output, attr, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(
        f"expected a module output that is a Tensor or a tuple starting with one, got {type(output).__name__}"
    )


def sdpa_probabilities(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The attention probabilities that ``F.scaled_dot_product_attention(q, k, v, ...)`` applies to ``v``.

    ``softmax(q kᵀ · scale + mask)`` with ``scale = 1/sqrt(d_head)`` by default, a boolean ``attn_mask`` (``True`` =
    may attend) or an additive one, the causal lower triangle (aligned to the bottom right, as SDPA does when
    ``Q != K``) and grouped-query heads (``enable_gqa``: key heads repeated). A query row with no key it may attend
    gets zeros, not NaN.

    Returns:
        ``[..., H, Q, K]`` float32 probabilities.

    Example::

        >>> q = k = torch.zeros(1, 1, 3, 2)
        >>> sdpa_probabilities(q, k, is_causal=True)[0, 0]
        tensor([[1.0000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000],
                [0.3333, 0.3333, 0.3333]])
    """
    q, k = query.float(), key.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    n_q, n_k = scores.shape[-2], scores.shape[-1]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device)
    if is_causal:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(diagonal=n_k - n_q)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


class _Interceptor(TorchFunctionMode):
    """Records the 4-D attention probabilities of ``softmax`` and ``scaled_dot_product_attention`` calls."""

    _SOFTMAX: ClassVar[frozenset[Any]] = frozenset({F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax})

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self.sink = sink
        self.seen = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.seen:
            return out
        if func in self._SOFTMAX and isinstance(out, Tensor) and out.dim() == 4:
            self.seen += 1
            self.sink(out.detach().float())
        elif getattr(func, "__name__", "") == "scaled_dot_product_attention":
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = dict(zip(names, args, strict=False)) | kwargs
            q, k = bound["query"], bound["key"]
            if isinstance(q, Tensor) and q.dim() == 4:
                self.seen += 1
                with torch.no_grad():
                    self.sink(
                        sdpa_probabilities(
                            q.detach(),
                            k.detach(),
                            bound.get("attn_mask"),
                            bool(bound.get("is_causal", False)),
                            bound.get("scale"),
                            bool(bound.get("enable_gqa", False)),
                        )
                    )
        return out


class SoftmaxInterceptor:
    """Reader for any attention module: the first 4-D softmax (or SDPA call) inside its forward is the pattern.

    Installs a forward pre-hook that enters a ``TorchFunctionMode`` for the duration of the module's forward and a
    forward hook that leaves it; only calls made while the module runs are seen, and only the first attention-shaped
    one per forward is recorded (a module computing two softmaxes over ``[B, H, Q, K]`` is not supported: give the
    probabilities through a ``hook_pattern`` instead).
    """

    def __init__(self, module: nn.Module, sink: Sink) -> None:
        self.module, self.sink = module, sink
        self._stack = ExitStack()
        self._modes: list[_Interceptor] = []

    def __enter__(self) -> SoftmaxInterceptor:
        def pre(module: nn.Module, args: Any) -> None:
            mode = _Interceptor(self.sink)
            mode.__enter__()
            self._modes.append(mode)

        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self._modes:
                self._modes.pop().__exit__(None, None, None)

        self._stack.callback(self.module.register_forward_pre_hook(pre).remove)
        self._stack.callback(self.module.register_forward_hook(post, always_call=True).remove)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._modes:
            self._modes.pop().__exit__(None, None, None)
        self._stack.close()


class _HookPatternReader:
    def __init__(self, module: nn.Module, sink: Sink) -> None:
        self.point, self.sink = module.hook_pattern, sink
        self._handle: Any = None

    def __enter__(self) -> _HookPatternReader:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.sink(first_tensor(output).detach().float())

        self._handle = self.point.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class _MultiheadAttentionReader:
    """``nn.MultiheadAttention``: force ``need_weights=True, average_attn_weights=False`` and read output[1]."""

    def __init__(self, module: nn.MultiheadAttention, sink: Sink) -> None:
        self.module, self.sink = module, sink
        self._stack = ExitStack()

    def __enter__(self) -> _MultiheadAttentionReader:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights")
            bound = dict(zip(names, args, strict=False)) | kwargs
            bound["need_weights"], bound["average_attn_weights"] = True, False
            return (), bound

        def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if isinstance(weights, Tensor):
                w = weights.detach().float()
                self.sink(torch.nan_to_num(w.unsqueeze(1) if w.dim() == 3 else w, nan=0.0))

        self._stack.callback(self.module.register_forward_pre_hook(pre, with_kwargs=True).remove)
        self._stack.callback(self.module.register_forward_hook(post, with_kwargs=True).remove)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def hf_attention_weights(output: Any) -> Tensor | None:
    """The attention probabilities ``[B, H, Q, K]`` in a HuggingFace attention module's output, else ``None``.

    HuggingFace attention modules return ``(attn_output, attn_weights)``, and T5-style ones ``(attn_output,
    position_bias, attn_weights)``: the weights are the *last* element (the library's own ``output_attentions``
    recorder reads T5 at index -1). The position bias ``[1, H, Q, K]`` is never taken: a candidate must have the
    batch size and the query length of ``attn_output`` ``[B, Q, d]``.

    Example::

        >>> out, bias, p = torch.zeros(2, 3, 4), torch.zeros(1, 1, 3, 3), torch.ones(2, 1, 3, 3) / 3
        >>> hf_attention_weights((out, bias, p)) is p, hf_attention_weights((out, bias, None)) is None
        (True, True)
    """
    if not isinstance(output, (tuple, list)) or len(output) < 2 or not isinstance(output[0], Tensor):
        return None
    hidden, weights = output[0], output[-1]
    if not isinstance(weights, Tensor) or weights.dim() != 4 or hidden.dim() != 3:
        return None
    if weights.shape[0] != hidden.shape[0] or weights.shape[2] != hidden.shape[1]:
        return None
    return weights


class _SecondOutputReader:
    """HuggingFace attention modules return the weights last (:func:`hf_attention_weights`) on their eager path."""

    def __init__(self, module: nn.Module, sink: Sink) -> None:
        self.module, self.sink = module, sink
        self._handle: Any = None

    def __enter__(self) -> _SecondOutputReader:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            weights = hf_attention_weights(output)
            if weights is None:
                got = (
                    [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in output]
                    if isinstance(output, (tuple, list))
                    else type(output).__name__
                )
                raise RuntimeError(
                    f"{type(module).__name__} returned no attention weights [B, H, Q, K] as its last output on its "
                    f"eager path (got {got}); set the model's attn_implementation to 'eager' or give the "
                    "probabilities through a hook_pattern"
                )
            self.sink(weights.detach().float())

        self._handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


class _TimmReader:
    """timm ``Attention``: ``fused_attn = False`` for the probe; the probabilities pass through ``attn_drop``."""

    def __init__(self, module: nn.Module, sink: Sink) -> None:
        self.module, self.sink = module, sink
        self._stack = ExitStack()

    def __enter__(self) -> _TimmReader:
        was = self.module.fused_attn
        self.module.fused_attn = False
        self._stack.callback(setattr, self.module, "fused_attn", was)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.sink(first_tensor(output).detach().float())

        self._stack.callback(self.module.attn_drop.register_forward_hook(hook).remove)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def is_hf_attention(module: nn.Module) -> bool:
    """A HuggingFace attention module: it reads ``config._attn_implementation`` at call time."""
    config = getattr(module, "config", None)
    return (
        config is not None and hasattr(config, "_attn_implementation") and "attention" in type(module).__name__.lower()
    )


def attention_reader(module: nn.Module, sink: Sink) -> Any:
    """The reader (a context manager) that records ``module``'s attention probabilities ``[B, H, Q, K]`` into ``sink``.

    See the module docstring for how each kind of attention module is read.
    """
    if isinstance(getattr(module, "hook_pattern", None), nn.Module):
        return _HookPatternReader(module, sink)
    if isinstance(module, nn.MultiheadAttention):
        return _MultiheadAttentionReader(module, sink)
    if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
        return _TimmReader(module, sink)
    if is_hf_attention(module):
        return _SecondOutputReader(module, sink)
    return SoftmaxInterceptor(module, sink)


def reader_kind(module: nn.Module) -> str:
    """How :func:`attention_reader` reads ``module``: hook_pattern, need_weights, timm, eager or softmax."""
    reader = attention_reader(module, lambda t: None)
    return {
        _HookPatternReader: "hook_pattern",
        _MultiheadAttentionReader: "need_weights",
        _TimmReader: "timm",
        _SecondOutputReader: "eager",
        SoftmaxInterceptor: "softmax",
    }[type(reader)]


def close_all(readers: list[Any]) -> None:
    """Exit every reader (used on errors)."""
    for r in readers:
        r.__exit__(None, None, None)
