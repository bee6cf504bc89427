"""Self-attention: eqs. (9)-(11) by hand, fused == explicit, and the explicit path only while a hook listens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pdelightning.models import MultiHeadSelfAttention, TransformerClassifier


def reference_attention(attn: MultiHeadSelfAttention, u: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Eqs. (9)-(11) written out: per-head softmax(Q K^T / sqrt(d_k)) V, concatenated, times W^O."""
    d, H = attn.d_model, attn.n_heads
    dk = d // H
    W, b = attn.in_proj.weight, attn.in_proj.bias
    q = u @ W[:d].T + b[:d]
    k = u @ W[d : 2 * d].T + b[d : 2 * d]
    v = u @ W[2 * d :].T + b[2 * d :]
    heads = []
    for h in range(H):
        cols = slice(h * dk, (h + 1) * dk)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(dk)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask[:, None, :], float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        heads.append((e / e.sum(-1, keepdim=True)) @ v[..., cols])
    return torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.fixture
def attn_and_input() -> tuple[MultiHeadSelfAttention, Tensor, Tensor]:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(8, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True], [False, True, True, True, True]])
    return attn, x, mask


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
def test_matches_hand_computed_attention(attn_and_input, use_mask: bool, explicit: bool) -> None:
    attn, x, mask = attn_and_input
    mask = mask if use_mask else None
    attn.force_explicit = explicit
    torch.testing.assert_close(attn(x, mask), reference_attention(attn, x, mask))


def test_value_weight_is_third_block_of_in_proj(attn_and_input) -> None:
    attn, _, _ = attn_and_input
    assert attn.value_weight.shape == (8, 8)
    assert torch.equal(attn.value_weight, attn.in_proj.weight[16:])


def test_fused_equals_explicit_and_hook_captures_pattern(attn_and_input) -> None:
    attn, x, mask = attn_and_input
    assert not attn.explicit
    fused = attn(x, mask)
    seen: list[Tensor] = []
    handle = attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o))
    assert attn.explicit  # a listener switches to the explicit path
    hooked = attn(x, mask)
    handle.remove()
    assert not attn.explicit
    torch.testing.assert_close(hooked, fused)

    (pattern,) = seen
    assert pattern.shape == (3, 2, 5, 5)  # [B, H, Tq, Tk]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, 2, 5, dtype=torch.float64))
    assert (pattern >= 0).all()
    on_padded_keys = pattern.masked_select(mask[:, None, None, :].expand_as(pattern))
    assert on_padded_keys.numel() == 2 * 5 * (0 + 2 + 4) and (on_padded_keys == 0).all()
    # the last sequence has one valid key: every query puts all its weight there
    torch.testing.assert_close(pattern[2, :, :, 0], torch.ones(2, 5, dtype=torch.float64))


def test_without_hooks_the_explicit_path_is_not_taken(attn_and_input, monkeypatch: pytest.MonkeyPatch) -> None:
    attn, x, mask = attn_and_input
    calls = {"softmax": 0, "sdpa": 0}
    softmax, sdpa = torch.softmax, F.scaled_dot_product_attention

    def counting_softmax(*a, **kw):
        calls["softmax"] += 1
        return softmax(*a, **kw)

    def counting_sdpa(*a, **kw):
        calls["sdpa"] += 1
        return sdpa(*a, **kw)

    monkeypatch.setattr(torch, "softmax", counting_softmax)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    attn(x, mask)
    assert calls == {"softmax": 0, "sdpa": 1}
    handle = attn.hook_pattern.register_forward_hook(lambda m, i, o: None)
    attn(x, mask)
    assert calls == {"softmax": 1, "sdpa": 1}
    handle.remove()
    attn.force_explicit = True
    attn(x, mask)
    assert calls == {"softmax": 2, "sdpa": 1}


def test_model_level_hook_pattern_gives_same_logits() -> None:
    torch.manual_seed(0)
    model = TransformerClassifier(num_classes=3, d_model=8, n_layers=2, n_heads=2, d_ff=16, image_size=6).eval()
    x = torch.rand(4, 6, 6)
    fused = model(x)
    modules = dict(model.named_modules())
    seen: list[Tensor] = []
    handle = modules["blocks.1.attn.hook_pattern"].register_forward_hook(lambda m, i, o: seen.append(o))
    torch.testing.assert_close(model(x), fused)
    handle.remove()
    assert seen[0].shape == (4, 2, 6, 6)
    assert not model.blocks[0].attn.explicit  # only the hooked layer switched


def test_d_model_not_divisible_by_n_heads_raises() -> None:
    with pytest.raises(ValueError, match=r"d_model=6 must be divisible by n_heads=4.*\[1, 2, 3, 6\]"):
        MultiHeadSelfAttention(6, 4)
    with pytest.raises(ValueError, match=r"d_model=6 must be divisible by n_heads=4"):
        TransformerClassifier(d_model=6, n_heads=4, image_size=8)
