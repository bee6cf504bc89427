"""Capturing layer outputs and attention probabilities during one probe forward, then letting go."""

from __future__ import annotations

import math
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdelightning.analysis.representation import (  # noqa: F401 (moved there; the old import path keeps working)
    padding_mask_from_inputs,
    pool_tokens,
)
from pdelightning.models.protocol import AnalysisTargets


def first_tensor(output: Any) -> Tensor:
    """The hidden state in a module output: the tensor itself, or the first element of a tuple/list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"expected a module output that is a Tensor or a tuple starting with one, got {type(output).__name__}"
    )


def _additive(mask: Tensor | None, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


def mha_probabilities(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Recompute the attention probabilities of an ``nn.MultiheadAttention`` from its inputs and weights.

    ``nn.TransformerEncoderLayer`` calls its attention with ``need_weights=False`` (and its eval fast path
    skips the module entirely), so the probabilities are never returned; this rebuilds them exactly as
    ``F.multi_head_attention_forward`` does: ``softmax((x W_Q + b_Q)(x W_K + b_K)^T / sqrt(d_head) + masks)``.

    Returns:
        ``[B, H, Tq, Tk]``.

    Raises:
        NotImplementedError: for ``add_bias_kv`` / ``add_zero_attn`` variants.
    """
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    if mha.in_proj_weight is not None:
        w_q, w_k = mha.in_proj_weight[:E], mha.in_proj_weight[E : 2 * E]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b_q = b_k = None
    if mha.in_proj_bias is not None:
        b_q, b_k = mha.in_proj_bias[:E], mha.in_proj_bias[E : 2 * E]
    B, Tq, Tk = query.shape[0], query.shape[1], key.shape[1]
    q = F.linear(query, w_q, b_q).view(B, Tq, H, d).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(B, Tk, H, d).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, H, Tq, Tk)
    am = _additive(attn_mask, scores)
    if am is not None:
        scores = scores + (am.view(B, H, Tq, Tk) if am.dim() == 3 else am)
    kpm = _additive(key_padding_mask, scores)
    if kpm is not None:
        scores = scores + kpm[:, None, None, :]
    return torch.softmax(scores, dim=-1)


class Capture:
    """Context manager that records, for each forward inside it, layer outputs and attention probabilities.

    Outputs are detached and appended per layer; :meth:`pop` hands them over and forgets them, so nothing
    is held between probe steps. While active, PyTorch's fused MHA fast path is switched off so that
    ``nn.TransformerEncoderLayer`` calls its attention module and hooks fire.

    Args:
        targets: resolved analysis targets.
        layers: record each layer's output (``[B, T, d]``).
        attention: record each layer's attention probabilities (``[B, H, T, T]``).
        embedding: record the embedding output ``u_0``.
    """

    def __init__(self, targets: AnalysisTargets, layers: bool = True, attention: bool = False, embedding: bool = False):
        self.targets = targets
        self.want_layers, self.want_attention, self.want_embedding = layers, attention, embedding
        self.hidden: dict[str, list[Tensor]] = {}
        self.patterns: dict[str, list[Tensor]] = {}
        self._stack = ExitStack()

    def _store(self, bucket: dict[str, list[Tensor]], name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            bucket.setdefault(name, []).append(first_tensor(output).detach())

        return hook

    def _attention_hook(self, name: str, attn: nn.Module) -> Any:
        if hasattr(attn, "hook_pattern"):
            return attn.hook_pattern.register_forward_hook(self._store(self.patterns, name))
        if isinstance(attn, nn.MultiheadAttention):

            def pre_hook(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                query = args[0] if args else kwargs["query"]
                key = args[1] if len(args) > 1 else kwargs.get("key", query)
                kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
                am = args[5] if len(args) > 5 else kwargs.get("attn_mask")
                with torch.no_grad():
                    p = mha_probabilities(module, query.detach(), key.detach(), kpm, am)
                self.patterns.setdefault(name, []).append(p)

            return attn.register_forward_pre_hook(pre_hook, with_kwargs=True)
        raise TypeError(
            f"cannot read attention probabilities from {name}'s attention module of type {type(attn).__name__}: "
            "expected a module with a `hook_pattern` hook point (our MultiHeadSelfAttention, TransformerLens) "
            "or an nn.MultiheadAttention"
        )

    def __enter__(self) -> Capture:
        for t in self.targets.layers:
            if self.want_layers:
                self._stack.callback(t.module.register_forward_hook(self._store(self.hidden, t.name)).remove)
            if self.want_attention and t.attention is not None:
                self._stack.callback(self._attention_hook(t.name, t.attention).remove)
        if self.want_embedding and self.targets.embedding is not None:
            self._stack.callback(
                self.targets.embedding.register_forward_hook(self._store(self.hidden, "embedding")).remove
            )
        if self.want_attention and hasattr(torch.backends, "mha"):
            was = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            self._stack.callback(torch.backends.mha.set_fastpath_enabled, was)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def pop(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Return ``(hidden, patterns)`` for the forwards so far, concatenated over batches, and forget them."""
        hidden = {k: torch.cat(v) for k, v in self.hidden.items()}
        patterns = {k: torch.cat(v) for k, v in self.patterns.items()}
        self.hidden.clear()
        self.patterns.clear()
        return hidden, patterns
