"""Transformer block: the residual / LayerNorm switches compute what the docstring says."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from pdelightning.models import TransformerClassifier
from pdelightning.models.transformer import FeedForward, TransformerBlock


def _block(residual: bool, norm: str) -> TransformerBlock:
    torch.manual_seed(0)
    blk = TransformerBlock(8, 2, 16, 0.0, residual, norm).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so a misplaced LN would show
        for ln in (blk.ln1, blk.ln2):
            if isinstance(ln, nn.LayerNorm):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_()
    return blk


def _manual(blk: TransformerBlock, x: Tensor, mask: Tensor | None, residual: bool, norm: str) -> Tensor:
    attn = lambda u: blk.attn(u, mask)  # noqa: E731
    if residual and norm == "pre":
        h = x + attn(blk.ln1(x))
        return h + blk.mlp(blk.ln2(h))
    if residual and norm == "post":
        h = blk.ln1(x + attn(x))
        return blk.ln2(h + blk.mlp(h))
    if residual and norm == "none":
        h = x + attn(x)
        return h + blk.mlp(h)
    # residual=False: each sublayer replaces the stream, FFN-sublayer(attn-sublayer(x)) without the sums
    if norm == "pre":
        return blk.mlp(blk.ln2(attn(blk.ln1(x))))
    if norm == "post":
        return blk.ln2(blk.mlp(blk.ln1(attn(x))))
    return blk.mlp(attn(x))


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
@pytest.mark.parametrize("residual", [True, False])
def test_block_matches_manual_composition(residual: bool, norm: str) -> None:
    blk = _block(residual, norm)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    torch.testing.assert_close(blk(x, mask), _manual(blk, x, mask, residual, norm))


def test_feedforward_is_eq_13() -> None:
    torch.manual_seed(0)
    ffn = FeedForward(3, 5)
    u = torch.randn(4, 3)
    W1, b1, W2, b2 = ffn[0].weight, ffn[0].bias, ffn[3].weight, ffn[3].bias
    torch.testing.assert_close(ffn(u), torch.clamp(u @ W1.T + b1, min=0) @ W2.T + b2)


def test_post_norm_rows_are_standardised() -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(16, 2, 32, 0.0, True, "post").eval()  # LayerNorm at init: weight 1, bias 0
    out = blk(3 * torch.randn(3, 7, 16) + 5)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3, 7), atol=1e-3, rtol=0)


def test_norm_none_has_no_layernorm_and_pre_differs_from_post() -> None:
    none = TransformerClassifier(num_classes=3, d_model=8, n_layers=2, n_heads=2, d_ff=16, image_size=6, norm="none")
    assert not any(isinstance(m, nn.LayerNorm) for m in none.modules())
    pre = TransformerClassifier(num_classes=3, d_model=8, n_layers=2, n_heads=2, d_ff=16, image_size=6, norm="pre")
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in pre.modules())
    assert n_ln == 2 * 2 + 1  # two per block plus the final one
    post = TransformerClassifier(num_classes=3, d_model=8, n_layers=2, n_heads=2, d_ff=16, image_size=6, norm="post")
    post.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("ln_final")})
    pre.eval(), post.eval()
    x = torch.rand(4, 6, 6)
    assert not torch.allclose(pre(x), post(x), atol=1e-4)


def test_residual_switch_changes_the_output() -> None:
    torch.manual_seed(0)
    with_res = TransformerBlock(8, 2, 16, 0.0, True, "pre").eval()
    without = TransformerBlock(8, 2, 16, 0.0, False, "pre").eval()
    without.load_state_dict(with_res.state_dict())
    x = torch.randn(2, 5, 8)
    assert not torch.allclose(with_res(x), without(x), atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "rms"}, r"norm='rms' is not one of \('pre', 'post', 'none'\)"),
        ({"n_layers": 0}, r"n_layers=0 must be positive"),
        ({"d_model": 6, "n_heads": 4}, r"d_model=6 must be divisible by n_heads=4; valid n_heads .*\[1, 2, 3, 6\]"),
        ({"input_kind": "audio"}, r"input_kind='audio' is not one of \('image', 'tokens'\)"),
        ({"tokenization": "pixels"}, r"tokenization='pixels' is not one of \('rows', 'patches'\)"),
        ({"tokenization": "patches", "patch_size": 3}, r"patch_size=3 must be positive and divide image_size=8"),
        ({"d_model": 0}, r"d_model=0 must be positive"),
    ],
)
def test_transformer_classifier_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = dict(num_classes=3, d_model=8, n_layers=1, n_heads=2, d_ff=8, image_size=8)
    with pytest.raises(ValueError, match=match):
        TransformerClassifier(**(args | kwargs))
