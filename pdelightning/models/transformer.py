"""Transformer classifier with the v2 ablation switches (residual connections, LayerNorm placement)."""

from __future__ import annotations

from torch import Tensor, nn

from pdelightning._checks import InputKind, Tokenization, check_choice
from pdelightning.models.attention import MultiHeadSelfAttention
from pdelightning.models.base import NORM_PLACEMENTS, NormPlacement, SequenceClassifier
from pdelightning.models.hooks import HookPoint


class FeedForward(nn.Sequential):
    """``FFN(u) = max(0, u W_1 + b_1) W_2 + b_2``, eq. (13)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))


def _norm(d_model: int, norm: NormPlacement) -> nn.Module:
    return nn.LayerNorm(d_model) if norm != "none" else nn.Identity()


class TransformerBlock(nn.Module):
    """One encoder block: self-attention then FFN, each optionally wrapped in a residual and a LayerNorm.

    With ``residual=True, norm="pre"``: ``u <- u + Attn(LN(u)); u <- u + FFN(LN(u))`` (GPT-2 style).
    With ``norm="post"``: ``u <- LN(u + Attn(u)); u <- LN(u + FFN(u))`` (Vaswani et al.).
    With ``residual=False`` the sums drop their ``u +`` term: each sublayer *replaces* the stream, the
    "no residual" ablation of v2. With ``norm="none"`` no LayerNorm is applied anywhere.

    Hook points (TransformerLens names):
        ``hook_resid_pre``, ``hook_attn_out``, ``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post``
        (all ``[B, T, d]``) and ``attn.hook_pattern`` ``[B, H, T, T]``.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float, residual: bool, norm: NormPlacement
    ) -> None:
        super().__init__()
        self.residual = residual
        self.norm = norm
        self.ln1 = _norm(d_model, norm)
        self.ln2 = _norm(d_model, norm)
        self.attn = MultiHeadSelfAttention(d_model, n_heads, dropout)
        self.mlp = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def _sublayer(self, u: Tensor, f: nn.Module, ln: nn.Module, hook: HookPoint, **kw: Tensor | None) -> Tensor:
        out = hook(self.drop(f(ln(u) if self.norm == "pre" else u, **kw)))
        u = u + out if self.residual else out
        return ln(u) if self.norm == "post" else u

    def forward(
        self, u: Tensor, padding_mask: Tensor | None = None, u_prev: Tensor | None = None, u0: Tensor | None = None
    ) -> Tensor:
        """Apply the block; ``u_prev`` and ``u0`` are accepted for interface parity with the PDE step and unused."""
        u = self.hook_resid_pre(u)
        u = self.hook_resid_mid(self._sublayer(u, self.attn, self.ln1, self.hook_attn_out, padding_mask=padding_mask))
        return self.hook_resid_post(self._sublayer(u, self.mlp, self.ln2, self.hook_mlp_out))


class TransformerClassifier(SequenceClassifier):
    """Transformer encoder classifier for images (rows/patches as tokens) or token sequences.

    Args:
        num_classes: number of classes.
        d_model: width of the residual stream.
        n_layers: number of blocks ``L``.
        n_heads: attention heads; must divide ``d_model``.
        d_ff: FFN hidden width.
        dropout: dropout on attention probabilities and sublayer outputs.
        residual: keep residual connections (``False`` is the v2 "no residual" ablation).
        norm: LayerNorm placement, ``"pre"``, ``"post"`` or ``"none"`` (the v2 "no LayerNorm" ablation).
        input_kind: ``"image"`` or ``"tokens"``.
        image_size: image side in pixels (28 for MNIST, 8 for digits).
        tokenization: ``"rows"`` or ``"patches"`` for images.
        patch_size: patch side for ``"patches"``.
        vocab_size: vocabulary size for tokens.
        max_len: longest token sequence.
        pad_id: padding id for tokens.
        bottleneck_dim: width of the Gaussian bottleneck ``T`` before the head; ``None`` for none.

    Raises:
        ValueError: on an unknown ``norm``, ``d_model`` not divisible by ``n_heads`` and other bad sizes.

    Example::

        >>> import torch
        >>> model = TransformerClassifier(num_classes=10, d_model=32, n_layers=2, n_heads=4, image_size=8)
        >>> model(torch.rand(5, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        d_model: int = 64,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 128,
        dropout: float = 0.0,
        residual: bool = True,
        norm: NormPlacement = "pre",
        input_kind: InputKind = "image",
        image_size: int = 28,
        tokenization: Tokenization = "rows",
        patch_size: int = 4,
        vocab_size: int = 0,
        max_len: int = 256,
        pad_id: int = 0,
        bottleneck_dim: int | None = 32,
    ) -> None:
        check_choice("norm", norm, NORM_PLACEMENTS)
        if n_layers <= 0:
            raise ValueError(f"n_layers={n_layers} must be positive")
        if d_ff <= 0:
            raise ValueError(f"d_ff={d_ff} must be positive (the FFN hidden width)")
        super().__init__(
            num_classes,
            d_model,
            input_kind,
            image_size,
            tokenization,
            patch_size,
            vocab_size,
            max_len,
            pad_id,
            bottleneck_dim,
        )
        self.blocks.extend(TransformerBlock(d_model, n_heads, d_ff, dropout, residual, norm) for _ in range(n_layers))
        if norm == "pre":
            self.ln_final = nn.LayerNorm(d_model)
