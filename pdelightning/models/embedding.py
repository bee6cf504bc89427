"""Input embeddings: images as rows or patches of tokens, or token ids with a padding mask.

The output is the initial condition ``u(x, 0) = u_0(x)`` of the PDE model (eq. 6) and the residual
stream entering block 0 of the Transformer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pdelightning._checks import INPUT_KINDS, TOKENIZATIONS, InputKind, Tokenization, check_choice


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """Fixed sinusoidal positional encoding ``[n_positions, d_model]`` (Vaswani et al., 2017)."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(n_positions, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe


class InputEmbedding(nn.Module):
    """Turns a batch into the token field ``u_0`` of shape ``[B, T, d_model]`` plus a padding mask.

    Args:
        d_model: embedding width.
        input_kind: ``"image"`` for ``[B, H, W]`` or ``[B, 1, H, W]`` float images, ``"tokens"`` for
            ``[B, T]`` integer ids.
        image_size: side of the (square) image, e.g. 28 for MNIST, 8 for digits.
        tokenization: ``"rows"`` (one token per pixel row, as in the paper's MNIST experiments) or
            ``"patches"`` (non-overlapping ``patch_size`` squares, ViT-style).
        patch_size: patch side for ``tokenization="patches"``; must divide ``image_size``.
        vocab_size: number of token ids for ``input_kind="tokens"``.
        max_len: longest token sequence for ``input_kind="tokens"``.
        pad_id: the id that marks padding; positions holding it are masked.

    Raises:
        ValueError: on an unknown ``input_kind`` or ``tokenization``, or sizes that do not fit.
    """

    def __init__(
        self,
        d_model: int,
        input_kind: InputKind = "image",
        image_size: int = 28,
        tokenization: Tokenization = "rows",
        patch_size: int = 4,
        vocab_size: int = 0,
        max_len: int = 256,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        check_choice("input_kind", input_kind, INPUT_KINDS)
        self.input_kind = input_kind
        self.pad_id = pad_id
        if input_kind == "image":
            check_choice("tokenization", tokenization, TOKENIZATIONS)
            if tokenization == "patches" and (patch_size <= 0 or image_size % patch_size):
                raise ValueError(f"patch_size={patch_size} must be positive and divide image_size={image_size}")
            ph, pw = (1, image_size) if tokenization == "rows" else (patch_size, patch_size)
            self.patch = (ph, pw)
            self.image_size = image_size
            n_tokens = (image_size // ph) * (image_size // pw)
            self.proj: nn.Module = nn.Linear(ph * pw, d_model)
        else:
            if vocab_size <= 0:
                raise ValueError(f"vocab_size={vocab_size} must be positive for input_kind='tokens'")
            n_tokens = max_len
            self.proj = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.n_tokens = n_tokens
        self.register_buffer("pos", sinusoidal_positions(n_tokens, d_model), persistent=False)
        self.scale = math.sqrt(d_model) if input_kind == "tokens" else 1.0
        if isinstance(self.proj, nn.Embedding):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the projection: PyTorch's default for images; ``N(0, 1/d)`` with a zero padding row for tokens.

        ``N(0, 1/d)`` times ``sqrt(d)`` in :meth:`forward` gives unit-variance tokens, on the scale of the positional
        code (nn.Embedding's ``N(0, 1)`` times ``sqrt(d)`` would give std ``sqrt(d)`` and drown the positions).
        """
        if isinstance(self.proj, nn.Embedding):
            d_model = self.proj.embedding_dim
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)
            with torch.no_grad():
                self.proj.weight[self.pad_id].zero_()
        else:
            self.proj.reset_parameters()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Embed ``x``.

        Returns:
            ``(u0, padding_mask)`` with ``u0`` of shape ``[B, T, d_model]`` and ``padding_mask`` ``[B, T]``
            (``True`` = padding) or ``None`` for images.
        """
        if self.input_kind == "image":
            if x.dim() == 4:
                x = x[:, 0]  # single channel
            B, H, W = x.shape
            if H != self.image_size or W != self.image_size:
                raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {H}x{W}")
            ph, pw = self.patch
            tokens = x.reshape(B, H // ph, ph, W // pw, pw).permute(0, 1, 3, 2, 4).reshape(B, -1, ph * pw)
            return self.proj(tokens.float()) + self.pos, padding_mask
        T = x.shape[1]
        if T > self.n_tokens:
            raise ValueError(f"sequence length {T} exceeds max_len={self.n_tokens}")
        if padding_mask is None:
            padding_mask = x == self.pad_id
        return self.proj(x) * self.scale + self.pos[:T], padding_mask
