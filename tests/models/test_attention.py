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


# ---- all-padding sequences (issue 12, defect 3) ----------------------------------------------------------------
# Before the fix the explicit path returned NaN for a sequence with no valid key (softmax over an empty set) while
# the fused path returned finite values: a probe (explicit) disagreed with training (fused). Defined now: zero
# attention weights, so zero attention output before W^O, on both paths.
def _all_padding_batch() -> tuple[MultiHeadSelfAttention, Tensor, Tensor]:
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(8, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [True] * 5, [False, False, True, True, True]])  # sequence 1: all padding
    return attn, x, mask


@pytest.mark.parametrize("explicit", [False, True])
def test_all_padding_sequence_gives_zero_attention_output(explicit: bool) -> None:
    attn, x, mask = _all_padding_batch()
    attn.force_explicit = explicit
    out = attn(x, mask)
    assert torch.isfinite(out).all()
    # zero weights -> zero heads -> out_proj adds only its bias
    torch.testing.assert_close(out[1], attn.out_proj.bias.expand(5, 8))
    # the other sequences are untouched by the rule: eqs. (9)-(11) by hand
    torch.testing.assert_close(out[[0, 2]], reference_attention(attn, x[[0, 2]], mask[[0, 2]]))


def test_all_padding_fused_equals_explicit_and_pattern_rows_are_zero() -> None:
    attn, x, mask = _all_padding_batch()
    fused = attn(x, mask)
    seen: list[Tensor] = []
    handle = attn.hook_pattern.register_forward_hook(lambda m, i, o: seen.append(o))
    explicit = attn(x, mask)
    handle.remove()
    assert (fused - explicit).abs().max() <= 1e-6
    (pattern,) = seen
    assert not pattern.isnan().any()
    assert torch.equal(pattern[1], torch.zeros(2, 5, 5, dtype=torch.float64))  # all zeros, not NaN
    torch.testing.assert_close(pattern[[0, 2]].sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))


def test_all_padding_gradients_are_finite_on_both_paths() -> None:
    for explicit in (False, True):
        attn, x, mask = _all_padding_batch()
        attn.force_explicit = explicit
        x.requires_grad_(True)
        attn(x, mask).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)
        assert torch.equal(x.grad[1], torch.zeros(5, 8, dtype=torch.float64))  # nothing flows into no-key rows


@pytest.mark.parametrize("model_name", ["transformer", "pde"])
def test_model_with_an_all_padding_sequence_agrees_fused_and_explicit(model_name: str) -> None:
    from pdelightning.models import PDEClassifier

    torch.manual_seed(0)
    cls = TransformerClassifier if model_name == "transformer" else PDEClassifier
    kw = {"num_classes": 3, "d_model": 8, "n_layers": 2, "n_heads": 2, "d_ff": 16}
    model = cls(**kw, input_kind="tokens", vocab_size=10, max_len=6).eval()
    x = torch.tensor([[1, 2, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 9]])  # pad_id 0: row 1 all padding
    fused = model(x)
    for block in model.blocks:
        block.attn.force_explicit = True
    explicit = model(x)
    assert torch.isfinite(fused).all() and torch.isfinite(explicit).all()
    assert (fused - explicit).abs().max() <= 1e-6
    # an all-padding sequence pools to zeros: its logits are the head applied to the zero vector (no bottleneck
    # sampling in eval: the bottleneck's mean path)
    torch.testing.assert_close(explicit[1], model.head(model.bottleneck(torch.zeros(1, 8))[0])[0])
