"""What both classifiers share: input embedding, a stack of blocks, masked pooling, bottleneck and head."""

from __future__ import annotations

from typing import Literal, overload

from torch import Tensor, nn

from pdelightning._checks import InputKind, Tokenization
from pdelightning.models.bottleneck import GaussianBottleneck
from pdelightning.models.embedding import InputEmbedding
from pdelightning.models.hooks import HookPoint
from pdelightning.models.protocol import AnalysisTargets, LayerTarget

NormPlacement = Literal["pre", "post", "none"]
NORM_PLACEMENTS = ("pre", "post", "none")


def masked_mean(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean over the token axis of ``[B, T, d]``, ignoring positions where ``padding_mask`` is ``True``."""
    if padding_mask is None:
        return x.mean(1)
    keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class SequenceClassifier(nn.Module):
    """Base class: ``u_0 = embed(x)``; ``u_{l+1} = block_l(u_l)``; pool; optional Gaussian bottleneck; head.

    Subclasses fill ``self.blocks`` (an ``nn.ModuleList`` of modules taking ``(u, padding_mask, u_prev, u0)``)
    and may set ``self.ln_final``.

    Hook points:
        ``hook_embed``: ``u_0``, ``[B, T, d]``. ``hook_pooled``: pooled sequence ``[B, d]``.
    """

    def __init__(
        self,
        num_classes: int,
        d_model: int,
        input_kind: InputKind,
        image_size: int,
        tokenization: Tokenization,
        patch_size: int,
        vocab_size: int,
        max_len: int,
        pad_id: int,
        bottleneck_dim: int | None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be at least 2")
        if d_model <= 0:
            raise ValueError(f"d_model={d_model} must be positive")
        self.num_classes = num_classes
        self.d_model = d_model
        self.embed = InputEmbedding(
            d_model, input_kind, image_size, tokenization, patch_size, vocab_size, max_len, pad_id
        )
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList()
        self.ln_final: nn.Module = nn.Identity()
        self.hook_pooled = HookPoint()
        self.bottleneck = GaussianBottleneck(d_model, bottleneck_dim) if bottleneck_dim else None
        self.head = nn.Linear(bottleneck_dim or d_model, num_classes)

    def set_bottleneck_sampling(self, sample: bool) -> None:
        """Turn sampling of the Gaussian bottleneck on (``beta > 0``) or off (deterministic model)."""
        if self.bottleneck is not None:
            self.bottleneck.sample = sample

    @overload
    def forward(self, x: Tensor, padding_mask: Tensor | None = ..., return_kl: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(
        self, x: Tensor, padding_mask: Tensor | None = ..., *, return_kl: Literal[True]
    ) -> tuple[Tensor, Tensor]: ...

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, return_kl: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Classify ``x``.

        Args:
            x: images ``[B, H, W]`` / ``[B, 1, H, W]`` or token ids ``[B, T]``.
            padding_mask: ``[B, T]``, ``True`` at padding; derived from ``pad_id`` for tokens when omitted.
            return_kl: also return the bottleneck's KL term (zero without a bottleneck).

        Returns:
            logits ``[B, num_classes]``, or ``(logits, kl)`` when ``return_kl``.
        """
        u, padding_mask = self.embed(x, padding_mask)
        u = u0 = self.hook_embed(u)
        u_prev = u0
        for block in self.blocks:
            u, u_prev = block(u, padding_mask, u_prev, u0), u
        h = self.hook_pooled(masked_mean(self.ln_final(u), padding_mask))
        kl = h.new_zeros(())
        if self.bottleneck is not None:
            h, kl = self.bottleneck(h)
        logits = self.head(h)
        return (logits, kl) if return_kl else logits

    def analysis_targets(self) -> AnalysisTargets:
        """The analysis protocol (see :mod:`pdelightning.models.protocol`)."""
        return AnalysisTargets(
            embedding=self.hook_embed,
            layers=[
                LayerTarget(
                    name=f"blocks.{i}",
                    module=blk.hook_resid_post,
                    attention=blk.attn,
                    out_proj=blk.attn.out_proj,
                    value_weight=blk.attn.value_weight,
                    pde=blk.step_params() if hasattr(blk, "step_params") else None,
                    block=blk,
                    attn_out=blk.attn,
                    mlp_out=blk.mlp,
                )
                for i, blk in enumerate(self.blocks)
            ],
            family="ours",
        )

    def reset_parameters(self) -> None:
        """Draw every parameter afresh as at construction (the model's own initialiser, seeded by the global RNG).

        Used for the re-initialised null of the attention analysis: PyTorch's default initialisers for the
        linear layers, the embedding's own ``N(0, 1/d)`` (:meth:`InputEmbedding.reset_parameters`) and each PDE
        step's initial ``D`` and ``α``.
        """
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
