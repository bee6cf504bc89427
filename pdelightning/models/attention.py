"""Multi-head self-attention with a fused and an explicit path (paper eqs. 2, 9-11)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdelightning.models.hooks import HookPoint


class MultiHeadSelfAttention(nn.Module):
    r"""Multi-head self-attention, eqs. (9)-(11): ``A(u) = Concat(head_1..head_h) W^O`` with
    ``head_i = softmax(Q_i K_i^T / sqrt(d_k)) V_i``.

    The parameter layout follows ``nn.MultiheadAttention`` (one ``in_proj`` holding ``W_Q; W_K; W_V``
    stacked along the output dimension, and ``out_proj`` holding ``W^O``), so analysis code that
    reads weights works on both.

    Two computation paths give the same output, including for a sequence that is all padding (no valid key:
    softmax over an empty set is undefined, 0/0): its attention weights are all zero, so its attention output
    is zero before ``W^O`` (``out_proj`` adds only its bias) on both paths, and ``hook_pattern`` shows all-zero
    rows for it. The model then pools such a sequence to zeros (:func:`~pdelightning.models.base.masked_mean`).

    * **fused** (default): ``F.scaled_dot_product_attention``; the probabilities are never formed.
    * **explicit**: softmax of the scaled scores, passed through ``hook_pattern`` with shape
      ``[batch, head, query, key]``. It is taken only while something listens on ``hook_pattern``
      (a forward hook) or ``force_explicit`` is set, as timm does.

    Args:
        d_model: width of the token field ``u``.
        n_heads: number of heads; must divide ``d_model``.
        dropout: dropout on the attention probabilities (training only).
        bias: whether the projections have biases.

    Raises:
        ValueError: if ``d_model`` is not divisible by ``n_heads``.

    Hook points:
        ``hook_pattern``: attention probabilities ``[B, H, Tq, Tk]`` (explicit path only); each row sums to 1 over
            the valid keys, or is all zero for a sequence with no valid key.
        ``hook_z``: per-head outputs before ``W^O``, ``[B, T, H, d_head]``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(
                f"d_model={d_model} must be divisible by n_heads={n_heads}; "
                f"valid n_heads for this d_model: {[h for h in range(1, d_model + 1) if d_model % h == 0]}"
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.hook_pattern = HookPoint()  # [B, H, Tq, Tk]
        self.hook_z = HookPoint()  # [B, T, H, d_head]
        self.force_explicit = False

    @property
    def value_weight(self) -> Tensor:
        """``W_V`` as ``[d_model, d_model]`` (rows are output features), the third block of ``in_proj``."""
        return self.in_proj.weight[2 * self.d_model :]

    @property
    def explicit(self) -> bool:
        """Whether the next call takes the explicit softmax path."""
        return self.force_explicit or self.hook_pattern.has_hooks

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Attend over the token axis.

        Args:
            x: token field ``[B, T, d_model]``.
            padding_mask: ``[B, T]`` boolean, ``True`` at padded positions (ignored as keys).

        Returns:
            ``[B, T, d_model]``.
        """
        B, T, _ = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)  # (B, H, T, dh)
        attn_mask = empty = None
        if padding_mask is not None:
            attn_mask = ~padding_mask[:, None, None, :]  # True = may attend; (B, 1, 1, T)
            empty = padding_mask.all(-1)[:, None, None, None]  # (B, 1, 1, 1): no key to attend to at all
        p_drop = self.dropout if self.training else 0.0
        if self.explicit:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)  # (B, H, T, T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            pattern = torch.softmax(scores, dim=-1)
            if empty is not None:
                pattern = pattern.masked_fill(empty, 0.0)  # softmax over no key is 0/0: all-zero rows instead
            z = F.dropout(self.hook_pattern(pattern), p_drop, self.training) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p_drop)
            if empty is not None:
                z = z.masked_fill(empty, 0.0)  # the same on every SDPA backend, whatever it does with such rows
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, dh)
        return self.out_proj(z.reshape(B, T, self.d_model))
