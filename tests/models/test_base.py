"""What both classifiers share: input shapes, padding invariance, masked pooling, hook names, analysis targets."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pdelightning.models import (
    AnalysisTargets,
    PDEClassifier,
    SupportsAnalysis,
    TransformerClassifier,
    masked_mean,
)
from pdelightning.models.base import SequenceClassifier

SMALL = dict(num_classes=3, d_model=8, n_layers=2, n_heads=2, d_ff=16)
MODELS = {"transformer": TransformerClassifier, "pde": PDEClassifier}


def _model(kind: str, **kw) -> SequenceClassifier:
    torch.manual_seed(0)
    return MODELS[kind](**(SMALL | kw)).eval()


def _tokens_model(kind: str, **kw) -> SequenceClassifier:
    return _model(kind, input_kind="tokens", vocab_size=30, max_len=10, pad_id=0, **kw)


def test_masked_mean_known_values() -> None:
    x = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -100.0]]] * 2)
    mask = torch.tensor([[False, False, False, True], [False] * 4])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 20.0], [26.5, -10.0]]))
    torch.testing.assert_close(masked_mean(x, None), torch.tensor([[26.5, -10.0]] * 2))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(("tokenization", "n_tokens"), [("rows", 8), ("patches", 16)])
def test_image_inputs_shapes(kind: str, tokenization: str, n_tokens: int) -> None:
    model = _model(kind, image_size=8, tokenization=tokenization, patch_size=2)
    seen: list[Tensor] = []
    model.hook_embed.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.rand(5, 8, 8)
    logits = model(x)
    assert logits.shape == (5, 3)
    assert seen[0].shape == (5, n_tokens, 8)
    torch.testing.assert_close(model(x[:, None]), logits)
    logits_kl, kl = model(x, return_kl=True)
    torch.testing.assert_close(logits_kl, logits)
    assert kl.shape == () and kl >= 0


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("transformer", {"norm": "pre"}),
        ("transformer", {"norm": "post"}),
        ("transformer", {"norm": "none", "residual": False}),
        ("pde", {"boundary": "dirichlet", "coupling": True, "forcing": True}),
        ("pde", {"boundary": "neumann", "norm": "pre"}),
        ("pde", {"boundary": "periodic", "norm": "post", "diffusion": "scalar"}),
    ],
)
def test_padded_tokens_do_not_change_the_logits(kind: str, kw: dict) -> None:
    model = _tokens_model(kind, **kw)
    x = torch.tensor([[5, 3, 7, 0, 0, 0], [2, 9, 4, 8, 1, 0], [11, 12, 13, 14, 15, 16]])
    mask = x == 0
    logits = model(x)
    torch.testing.assert_close(model(x, mask), logits)  # the derived mask is the pad-id mask
    garbage = x.masked_scatter(mask, torch.randint(1, 30, (int(mask.sum()),)))
    assert (garbage != 0).all()
    torch.testing.assert_close(model(garbage, mask), logits)
    # ... and without the mask the garbage is read: the test can tell
    assert not torch.allclose(model(garbage), logits)


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("transformer", {}),
        ("pde", {"boundary": "dirichlet"}),
        ("pde", {"boundary": "neumann"}),
        ("pde", {"boundary": "periodic"}),
    ],
)
def test_padded_sequence_classifies_like_the_unpadded_one(kind: str, kw: dict) -> None:
    """Masked pooling, masked keys and the padding boundary: padding to a longer length changes nothing."""
    model = _tokens_model(kind, **kw)
    short = torch.tensor([[5, 3, 7]])
    padded = torch.tensor([[5, 3, 7, 0, 0, 0, 0]])
    torch.testing.assert_close(model(padded), model(short))


@pytest.mark.parametrize("kind", MODELS)
def test_tensorlens_hook_names_exist(kind: str) -> None:
    names = dict(_model(kind, image_size=6).named_modules())
    expected = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"]
    expected += ["blocks.1.hook_resid_post", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "hook_pooled"]
    assert set(expected) <= names.keys()


@pytest.mark.parametrize("kind", MODELS)
def test_analysis_targets_in_depth_order(kind: str) -> None:
    model = _model(kind, image_size=6, n_layers=3)
    assert isinstance(model, SupportsAnalysis)
    targets = model.analysis_targets()
    assert isinstance(targets, AnalysisTargets)
    assert targets.embedding is model.hook_embed
    assert [t.name for t in targets.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    order: list[str] = []
    for t, blk in zip(targets.layers, model.blocks, strict=True):
        assert t.module is blk.hook_resid_post
        assert t.attention is blk.attn
        assert t.out_proj is blk.attn.out_proj
        assert torch.equal(t.value_weight, blk.attn.in_proj.weight[16:])
        t.module.register_forward_hook(lambda m, i, o, name=t.name: order.append(name))
    model(torch.rand(2, 6, 6))
    assert order == ["blocks.0", "blocks.1", "blocks.2"]  # forward order is depth order
    if kind == "transformer":
        assert all(t.pde is None for t in targets.layers)


def test_analysis_targets_pde_step_params() -> None:
    model = _model("pde", image_size=6, n_layers=2, dt=0.2, dx=0.5, diffusion_init=0.3, alpha_init=0.7)
    with torch.no_grad():
        model.blocks[1].raw_diffusion.fill_(-30.0)  # softplus keeps D >= 0 however negative the raw value
        model.blocks[1].alpha.fill_(-0.4)
    p0, p1 = (t.pde for t in model.analysis_targets().layers)
    assert p0 is not None and p1 is not None
    torch.testing.assert_close(p0.diffusion, torch.full((8,), 0.3))
    assert (p1.diffusion >= 0).all() and p1.diffusion.shape == (8,)
    assert p0.alpha == pytest.approx(0.7) and p1.alpha == pytest.approx(-0.4)
    assert (p0.dt, p0.dx) == (0.2, 0.5)
    assert not p0.diffusion.requires_grad

    scalar = _model("pde", image_size=6, diffusion="scalar", diffusion_init=0.2).analysis_targets().layers[0].pde
    torch.testing.assert_close(scalar.diffusion, torch.tensor([0.2]))
    off = _model("pde", image_size=6, diffusion="none").analysis_targets().layers[0].pde
    assert torch.equal(off.diffusion, torch.zeros(1))


@pytest.mark.parametrize("kind", MODELS)
def test_without_bottleneck_kl_is_zero(kind: str) -> None:
    model = _model(kind, image_size=6, bottleneck_dim=None)
    assert model.bottleneck is None and model.head.in_features == 8
    logits, kl = model(torch.rand(2, 6, 6), return_kl=True)
    assert logits.shape == (2, 3) and kl.item() == 0.0
