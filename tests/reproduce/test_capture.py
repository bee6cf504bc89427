"""The reproduction's capture (:mod:`pdelightning_reproduce.probe`, through the library's adapters and capture) gives
what the engine it replaced gave: forward hooks on our models' own hook points (``hook_embed``,
``blocks.{i}.hook_resid_post``, ``blocks.{i}.attn.hook_pattern``, the block's input, ``attn`` and ``mlp``).

The reference below is that engine, cut to what it recorded; every reduction the analysis reads is compared to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pdelightning.analysis.rank import effective_rank
from pdelightning.analysis.representation import padding_mask_from_inputs, pool_tokens
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning_reproduce.lens import block_io
from pdelightning_reproduce.probe import EMBEDDING, forward_capture, layer_outputs
from tests.helpers.zoo import CustomTransformer

ATOL = 1e-6
N, BATCH = 13, 5  # three batches, the last one short


def _model(kind: str, inputs: str) -> nn.Module:
    torch.manual_seed(1)
    cls = PDEClassifier if kind == "pde" else TransformerClassifier
    extra: dict[str, Any] = {"dt": 0.2, "bottleneck_dim": None} if kind == "pde" else {}
    if inputs == "tokens":
        extra.update(input_kind="tokens", vocab_size=50, max_len=10)
    return cls(num_classes=3, d_model=16, n_layers=3, n_heads=2, d_ff=8, image_size=8, **extra).eval()


def _inputs(inputs: str) -> Tensor:
    g = torch.Generator().manual_seed(0)
    if inputs == "image":
        return torch.rand(N, 8, 8, generator=g)
    x = torch.randint(1, 50, (N, 10), generator=g)
    x[3, 6:] = 0
    x[7, 2:] = 0
    x[9] = 0  # all padding
    return x


@torch.no_grad()
def _hooked(
    model: nn.Module, xb: Tensor, patterns: bool = False, edit: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, dict[str, Tensor], list[Tensor], list[dict[str, Tensor]]]:
    """The replaced engine: hooks on the hook points by name. Returns logits, outputs, patterns, block I/O."""
    outs: dict[str, Tensor] = {}
    pats: list[Tensor] = []
    io: list[dict[str, Tensor]] = [{} for _ in model.blocks]

    def embed(_m: nn.Module, _a: Any, out: Tensor) -> Tensor:
        outs[EMBEDDING] = out if edit is None else edit(out)
        return outs[EMBEDDING]

    handles = [model.hook_embed.register_forward_hook(embed)]
    for i, b in enumerate(model.blocks):
        handles += [
            b.hook_resid_post.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(f"blocks.{i}", o)),
            b.register_forward_pre_hook(lambda _m, a, i=i: io[i].__setitem__("u", a[0])),
            b.attn.register_forward_hook(lambda _m, _a, o, i=i: io[i].__setitem__("attn", o)),
            b.mlp.register_forward_hook(lambda _m, _a, o, i=i: io[i].__setitem__("mlp", o)),
        ]
        if patterns:
            handles.append(b.attn.hook_pattern.register_forward_hook(lambda _m, _a, o: pats.append(o)))
    try:
        logits = model(xb)
    finally:
        for h in handles:
            h.remove()
    return logits, outs, pats, io


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=ATOL, equal_nan=True)


def _noise(start: int, u0: Tensor, valid: Tensor | None) -> Tensor:
    """A deterministic edit of ``u_0`` that depends on the batch and the valid tokens."""
    scale = torch.ones_like(u0) if valid is None else valid[..., None].to(u0)
    return u0 + 0.1 * (start + 1) * scale * torch.linspace(-1, 1, u0.shape[-1])


CASES = [("transformer", "image"), ("transformer", "tokens"), ("pde", "image"), ("pde", "tokens")]


@pytest.mark.parametrize(("kind", "inputs"), CASES)
@pytest.mark.parametrize("patterns", [False, True])
def test_reductions_equal_the_hook_point_engine(kind: str, inputs: str, patterns: bool) -> None:
    model, x = _model(kind, inputs), _inputs(inputs)

    def keep(start: int, xb: Tensor, outs: dict[str, Tensor], pats: list[Tensor]) -> Any:
        return start, {k: v.clone() for k, v in outs.items()}, [p.clone() for p in pats]

    cap = forward_capture(model, x, pad_id=0, erank=True, batch_fn=keep, patterns=patterns, batch_size=BATCH)
    names = [EMBEDDING, *(f"blocks.{i}" for i in range(len(model.blocks)))]
    assert cap.layers == names
    pooled: dict[str, list[Tensor]] = {n: [] for n in names}
    ranks: dict[str, list[Tensor]] = {n: [] for n in names}
    sq = dict.fromkeys(names, 0.0)
    for batch, start in enumerate(range(0, N, BATCH)):
        xb = x[start : start + BATCH]
        mask = padding_mask_from_inputs(xb, 0)
        logits, outs, pats, _ = _hooked(model, xb, patterns)
        _close(cap.logits[start : start + BATCH], logits)
        got_start, got_outs, got_pats = cap.extra[batch]
        assert got_start == start and list(got_outs) == names
        for n in names:
            _close(got_outs[n], outs[n])
            pooled[n].append(pool_tokens(outs[n], mask))
            ranks[n].append(effective_rank(outs[n], mask))
            sq[n] += float(outs[n].pow(2).sum())
        assert len(got_pats) == (len(model.blocks) if patterns else 0)
        for p, q in zip(got_pats, pats, strict=True):
            _close(p, q)
    for n in names:
        _close(cap.pooled[n], torch.cat(pooled[n]))
        _close(cap.erank[n], torch.cat(ranks[n]))
        assert cap.sq[n] == pytest.approx(sq[n], rel=1e-6) and cap.nonfinite[n] == 0.0
        assert cap.count[n] == float(N * x.shape[1] * 16)


@pytest.mark.parametrize(("kind", "inputs"), CASES)
def test_an_edited_embedding_reaches_every_layer_as_before(kind: str, inputs: str) -> None:
    model, x = _model(kind, inputs), _inputs(inputs)
    cap = forward_capture(model, x, pad_id=0, erank=False, embed_fn=_noise, batch_size=BATCH)
    clean = forward_capture(model, x, pad_id=0, erank=False, batch_size=BATCH)
    for start in range(0, N, BATCH):
        xb = x[start : start + BATCH]
        mask = padding_mask_from_inputs(xb, 0)
        valid = None if mask is None else ~mask
        logits, outs, _, _ = _hooked(model, xb, edit=lambda u, s=start, v=valid: _noise(s, u, v))
        _close(cap.logits[start : start + BATCH], logits)
        _close(cap.pooled["blocks.2"][start : start + BATCH], pool_tokens(outs["blocks.2"], mask))
        got = layer_outputs(model, xb, 0, _noise, start)
        assert list(got) == list(outs)
        for n, h in outs.items():
            _close(got[n], h)
    assert not torch.equal(cap.logits, clean.logits)  # the edit did reach the output


@pytest.mark.parametrize(("kind", "inputs"), CASES)
def test_block_io_equals_the_hooks_on_each_block(kind: str, inputs: str) -> None:
    model, x = _model(kind, inputs), _inputs(inputs)
    _, outs, _, ref = _hooked(model, x)
    got = block_io(model, x, "cpu")
    assert len(got) == len(model.blocks)
    for i, io in enumerate(got):
        for key in ("u", "attn", "mlp"):
            _close(io[key], ref[i][key])
        _close(io["out"], outs[f"blocks.{i}"])
        args, _ = io["call"]
        assert args[0] is io["u"] or torch.equal(args[0], io["u"])


@pytest.mark.parametrize("patterns", [False, True])
def test_capture_leaves_the_model_as_it_was(patterns: bool) -> None:
    model, x = _model("pde", "tokens"), _inputs("tokens")
    cap = forward_capture(model, x, pad_id=0, erank=False, patterns=patterns, batch_size=BATCH)
    with torch.no_grad():
        own = torch.cat([model(x[s : s + BATCH]) for s in range(0, N, BATCH)])
    if not patterns:  # the model's own (fused) attention path: bit for bit its own logits
        assert torch.equal(cap.logits, own)
    _close(cap.logits, own)
    for b in model.blocks:
        assert not b.attn.force_explicit and not b.attn.hook_pattern.has_hooks
        assert not b._forward_hooks and not b._forward_pre_hooks and not b.hook_resid_post.has_hooks
    assert not model.hook_embed.has_hooks


def test_capture_finds_the_layers_of_a_model_without_our_hook_names() -> None:
    model = CustomTransformer().eval()
    x = torch.randint(0, 8, (N, 6), generator=torch.Generator().manual_seed(0))
    cap = forward_capture(model, x, pad_id=-1, erank=False, batch_size=BATCH)
    with torch.no_grad():
        h = model.tok(x)
        want = {EMBEDDING: h}
        for i, block in enumerate(model.trunk):
            h = block(h)
            want[f"trunk.{i}"] = h
        logits = model(x)
    assert cap.layers == list(want)
    for n, v in want.items():
        _close(cap.pooled[n], v.mean(1))
    _close(cap.logits, logits)
