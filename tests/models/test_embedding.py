"""Input embedding: token counts for rows/patches, channel handling, padding masks from the pad id."""

from __future__ import annotations

import math

import pytest
import torch

from pdelightning.models import InputEmbedding
from pdelightning.models.embedding import sinusoidal_positions


@pytest.mark.parametrize(
    ("tokenization", "patch_size", "n_tokens"), [("rows", 4, 8), ("patches", 2, 16), ("patches", 4, 4)]
)
def test_image_token_counts_and_channel_dim(tokenization: str, patch_size: int, n_tokens: int) -> None:
    torch.manual_seed(0)
    emb = InputEmbedding(6, "image", image_size=8, tokenization=tokenization, patch_size=patch_size)
    x = torch.rand(3, 8, 8)
    u, mask = emb(x)
    assert u.shape == (3, n_tokens, 6)
    assert mask is None
    u4, _ = emb(x[:, None])  # [B, 1, H, W] is the same image
    torch.testing.assert_close(u4, u)


def test_rows_and_patches_hold_the_right_pixels() -> None:
    """Token ``k`` is the projection of row ``k`` / patch ``(k // n, k % n)`` (row-major), plus position ``k``."""
    torch.manual_seed(0)
    x = torch.rand(2, 8, 8)
    rows = InputEmbedding(5, "image", image_size=8, tokenization="rows")
    u, _ = rows(x)
    for k in range(8):
        torch.testing.assert_close(u[:, k], rows.proj(x[:, k]) + sinusoidal_positions(8, 5)[k])

    p = 2
    patches = InputEmbedding(5, "image", image_size=8, tokenization="patches", patch_size=p)
    u, _ = patches(x)
    pos = sinusoidal_positions(16, 5)
    for k in range(16):
        i, j = divmod(k, 8 // p)
        patch = x[:, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(2, p * p)
        torch.testing.assert_close(u[:, k], patches.proj(patch) + pos[k])


def test_sinusoidal_positions_known_values() -> None:
    # d = 4: frequencies 1 and 10000^(-2/4) = 0.01; pe[p] = [sin p, cos p, sin 0.01p, cos 0.01p]
    expected = torch.tensor([[math.sin(p), math.cos(p), math.sin(0.01 * p), math.cos(0.01 * p)] for p in range(3)])
    torch.testing.assert_close(sinusoidal_positions(3, 4), expected)


def test_token_padding_mask_from_pad_id() -> None:
    torch.manual_seed(0)
    emb = InputEmbedding(4, "tokens", vocab_size=20, max_len=12, pad_id=0)
    x = torch.tensor([[5, 3, 7, 0, 0, 0], [2, 9, 4, 8, 1, 6]])
    u, mask = emb(x)
    assert u.shape == (2, 6, 4)
    assert mask is not None
    assert mask.tolist() == [[False, False, False, True, True, True], [False] * 6]
    # token t at position k: E[t] * sqrt(d) + pe[k]; the pad row of E is zero
    pe = sinusoidal_positions(12, 4)
    torch.testing.assert_close(u[0, 1], emb.proj.weight[3] * 2.0 + pe[1])
    torch.testing.assert_close(u[0, 4], pe[4])


def test_token_padding_mask_other_pad_id_and_explicit_mask() -> None:
    emb = InputEmbedding(4, "tokens", vocab_size=10, max_len=8, pad_id=9)
    x = torch.tensor([[1, 0, 9, 9]])
    _, mask = emb(x)
    assert mask.tolist() == [[False, False, True, True]]
    given = torch.tensor([[False, True, True, True]])
    _, mask = emb(x, given)
    assert mask is given


def test_too_long_sequence_and_wrong_image_size_raise() -> None:
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_len=8"):
        InputEmbedding(4, "tokens", vocab_size=10, max_len=8)(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected 8x8 images, got 7x7"):
        InputEmbedding(4, "image", image_size=8)(torch.rand(1, 7, 7))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"input_kind='audio' is not one of \('image', 'tokens'\)"):
        InputEmbedding(4, "audio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tokenization='pixels' is not one of \('rows', 'patches'\)"):
        InputEmbedding(4, "image", tokenization="pixels")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"patch_size=3 must be positive and divide image_size=8"):
        InputEmbedding(4, "image", image_size=8, tokenization="patches", patch_size=3)
    with pytest.raises(ValueError, match=r"vocab_size=0 must be positive"):
        InputEmbedding(4, "tokens", vocab_size=0)


def test_token_embeddings_have_unit_scale_like_the_positions() -> None:
    # N(0, 1/d) init times sqrt(d): token vectors have per-entry std ~1, the scale of the sinusoidal code,
    # and the padding row is zero.
    torch.manual_seed(0)
    emb = InputEmbedding(128, input_kind="tokens", vocab_size=5000, max_len=64)
    x = torch.randint(1, 5000, (32, 64))
    u, _ = emb(x)
    tokens = u - emb.pos[:64]
    assert tokens.std().item() == pytest.approx(1.0, abs=0.05)
    assert emb.proj.weight[0].abs().max().item() == 0.0
