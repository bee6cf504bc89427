"""Swin Transformers (timm and HuggingFace), built from configs with random init: every stage analysed, attention read
per window exactly as the library computes it, and every callback either logging per stage or saying what it skips.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from pdelightning.adapters import TargetNotFoundError, resolve
from pdelightning.adapters.windowed import (
    dense_attention,
    flatten_grid,
    window_allowed,
    window_keys,
    window_rows,
    window_tokens,
)
from pdelightning.analysis.attention import attention_entropy
from pdelightning.analysis.rollout import attention_rollout, row_entropy
from pdelightning.models.protocol import WindowLayout
from pdelightning.plugin import build_callbacks
from pdelightning.probing.batch import call_model
from pdelightning.probing.capture import Capture, EmbeddingEdit, Request
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.zoo import DictDataset, HFModule, TupleDataset, TupleModule

KINDS = ("timm", "timm_v2", "hf")
IMG, CLASSES = 32, 3


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def swin(kind: str, img: int = IMG) -> L.LightningModule:
    """A tiny two-stage Swin (8x8 then 4x4 tokens, widths 16 and 32, windows of 4x4, shifted in every 2nd block)."""
    torch.manual_seed(0)
    if kind.startswith("timm"):
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        cls = SwinTransformer if kind == "timm" else SwinTransformerV2
        model = cls(img_size=img, patch_size=4, in_chans=1, num_classes=CLASSES, window_size=4, embed_dim=16,
                    depths=(2, 2), num_heads=(2, 4))  # fmt: skip
        return TupleModule(model)
    import transformers as tr

    tr.logging.set_verbosity_error()
    cfg = tr.SwinConfig(image_size=img, patch_size=4, num_channels=1, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                        window_size=4, num_labels=CLASSES)  # fmt: skip
    return HFModule(tr.SwinForImageClassification(cfg))


def loaders(kind: str, n: int = 16, img: int = IMG) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, 1, img, img, generator=g) + y.float()[:, None, None, None]
    data = TupleDataset(x, y) if kind != "hf" else DictDataset(pixel_values=x, labels=y)
    return DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)


def batch_of(kind: str, n: int = 3) -> Any:
    x = torch.randn(n, 1, IMG, IMG, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(n, dtype=torch.long)
    return (x, y) if kind != "hf" else {"pixel_values": x, "labels": y}


def library_windows(kind: str, module: L.LightningModule, batch: Any) -> list[Tensor]:
    """Every block's window attention ``[B·nW, H, N, N]`` as the library computes it.

    timm: by hand from each block's ``qkv`` with timm's own partition, relative-position bias and ``attn_mask``;
    HuggingFace: the weights its eager ``SwinLayer`` returns, checked against ``output_attentions=True`` (which
    gives each stage's last block).
    """
    model = module.model
    module.eval()
    out: list[Tensor] = []
    with torch.no_grad():
        if kind == "timm":
            from timm.models.swin_transformer import window_partition

            handles = [
                blk.register_forward_pre_hook(lambda m, a: out.append(_timm_by_hand(m, a[0], window_partition)))
                for stage in model.layers
                for blk in stage.blocks
            ]
            try:
                model(batch[0])
            finally:
                for h in handles:
                    h.remove()
            return out
        if kind == "timm_v2":  # cosine attention: the probabilities its explicit softmax module gives
            handles = [
                blk.attn.softmax.register_forward_hook(lambda m, a, o: out.append(o))
                for stage in model.layers
                for blk in stage.blocks
            ]
            try:
                model(batch[0])
            finally:
                for h in handles:
                    h.remove()
            return out
        was = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            handles = [
                blk.register_forward_hook(lambda m, a, o: out.append(o[1]))
                for stage in model.swin.encoder.layers
                for blk in stage.blocks
            ]
            try:
                own = model(pixel_values=batch["pixel_values"], output_attentions=True).attentions
            finally:
                for h in handles:
                    h.remove()
        finally:
            model.set_attn_implementation(was)
        assert len(own) == 2 and own[0].shape == out[1].shape and own[1].shape == out[3].shape
        torch.testing.assert_close(own[0], out[1])  # output_attentions: the last block of each stage
        torch.testing.assert_close(own[1], out[3])
        return out


def _timm_by_hand(block: Any, x: Tensor, window_partition: Any) -> Tensor:
    h = block.norm1(x)
    if any(block.shift_size):
        h = torch.roll(h, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    win = window_partition(h, block.window_size).flatten(1, 2)  # [B·nW, N, C]
    attn = block.attn
    q, k, _ = attn.qkv(win).reshape(win.shape[0], win.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()
    if block.attn_mask is not None:
        nw = block.attn_mask.shape[0]
        scores = (scores.view(-1, nw, attn.num_heads, *scores.shape[-2:]) + block.attn_mask[None, :, None]).flatten(
            0, 1
        )
    return scores.softmax(-1)


def captured(kind: str, module: L.LightningModule, batch: Any, **request: bool) -> tuple[Any, Any]:
    adapter, targets = resolve(module, need=("layers", "attention"))
    module.eval()
    with torch.no_grad(), Capture(adapter, targets, Request(**request)) as cap:
        call_model(module, batch)
        return targets, cap.pop()


# ---- the window geometry -----------------------------------------------------------------------------------------
def test_window_geometry_by_hand() -> None:
    lay = WindowLayout(grid=(4, 4), window=(2, 2), shift=(1, 1))
    # the shifted grid's (0, 0) holds token (1, 1) = 5; its first window holds tokens (1..2) x (1..2)
    assert window_tokens(lay)[0].tolist() == [5, 6, 9, 10]
    assert window_tokens(lay)[3].tolist() == [15, 12, 3, 0]  # the wrapped corner: tokens from all four corners
    allowed = window_allowed(lay)
    assert bool(allowed[0].all())  # an interior window: no mask
    assert allowed[3].sum(-1).tolist() == [1, 1, 1, 1]  # the corner window: each token only with itself
    rows = window_rows(torch.full((2 * 4, 1, 4, 4), 0.25), lay)  # uniform windows, masked pairs dropped
    assert rows.shape == (2, 1, 16, 4)
    token5 = window_keys(lay)[5]
    assert sorted(token5.tolist()) == [5, 6, 9, 10]
    assert dense_attention(rows, lay)[0, 0, 0].nonzero().flatten().tolist() == [0]  # token 0 sits in the corner


@pytest.mark.parametrize("kind", KINDS)
def test_the_shift_mask_is_the_librarys_own(kind: str) -> None:
    module = swin(kind)
    _, targets = resolve(module)
    shifted = [t for t in targets.layers if t.windows is not None and any(t.windows.shift)]
    assert len(shifted) == 1  # stage 0's second block; stage 1 (4x4 tokens) fits one window and is not shifted
    layer = shifted[0]
    if kind != "hf":
        mask = layer.block.attn_mask
    else:
        h, w = layer.windows.grid
        mask = layer.block.get_attn_mask(h, w, dtype=torch.float32, device=torch.device("cpu"))
    torch.testing.assert_close(window_allowed(layer.windows), mask == 0, rtol=0, atol=0)


# ---- the adapter -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_is_a_layer_and_outputs_are_tokens(kind: str) -> None:
    module = swin(kind)
    batch = batch_of(kind)
    targets, cap = captured(kind, module, batch, hidden=True, embedding=True, sublayers=True)
    assert targets.family == "swin"
    names = [t.name.split("layers.", 1)[1] for t in targets.layers]
    assert names == ["0.blocks.0", "0.blocks.1", "1.blocks.0", "1.blocks.1"]
    assert [t.windows.stage for t in targets.layers] == [0, 0, 1, 1]
    widths = {0: (64, 16), 1: (16, 32)}  # (T, d): 8x8 tokens of width 16, then 4x4 of width 32
    for t in targets.layers:
        T, d = widths[t.windows.stage]
        for bucket in (cap.hidden, cap.resid_pre, cap.attn_out, cap.mlp_out):
            assert bucket[t.name].shape == (3, T, d)
        # a residual block: output = input + attention contribution + MLP contribution
        torch.testing.assert_close(
            cap.hidden[t.name], cap.resid_pre[t.name] + cap.attn_out[t.name] + cap.mlp_out[t.name]
        )
    assert cap.embedding.shape == (3, 64, 16)
    # the tokens are the library's own maps in raster order: the last block's output is what the head pools
    model = module.model
    with torch.no_grad():
        if kind != "hf":
            own = flatten_grid(model.layers(model.patch_embed(batch[0])))
        else:
            own = model.swin.encoder.layers[1].blocks[1](
                cap.resid_pre[targets.layers[3].name], (4, 4)
            )[0]  # fmt: skip
    torch.testing.assert_close(cap.hidden[targets.layers[3].name], own)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_is_the_librarys_own_per_window(kind: str) -> None:
    module = swin(kind)
    batch = batch_of(kind)
    fused = [m.fused_attn for m in module.model.modules() if hasattr(m, "fused_attn")]
    targets, cap = captured(kind, module, batch, attention=True)
    reference = library_windows(kind, module, batch)
    assert len(reference) == len(targets.layers) == 4
    for layer, own in zip(targets.layers, reference, strict=True):
        nw = (layer.windows.grid[0] // 4) * (layer.windows.grid[1] // 4)
        assert own.shape == (3 * nw, 2 if layer.windows.stage == 0 else 4, 16, 16)
        rows = cap.attention[layer.name]
        assert rows.shape == (3, own.shape[1], nw * 16, 16)
        expected = window_rows(own.float(), layer.windows)
        assert (rows - expected).abs().max() < 1e-6
        # every token's row is a distribution over its window's keys (masked pairs excluded)
        torch.testing.assert_close(rows.sum(-1), torch.ones_like(rows.sum(-1)), atol=1e-5, rtol=0)
    # the switches are undone
    if kind == "timm":
        assert [m.fused_attn for m in module.model.modules() if hasattr(m, "fused_attn")] == fused
    elif kind == "hf":
        assert module.model.config._attn_implementation != "eager"


@pytest.mark.parametrize("kind", KINDS)
def test_the_token_operator_reproduces_the_librarys_attention_output(kind: str) -> None:
    """The full ``[T, T]`` operator built from the rows, applied to the values in raster order, gives the library's
    own attention output (before its output projection): the window bookkeeping and the shift are right.
    """
    module = swin(kind)
    batch = batch_of(kind)
    targets, cap = captured(kind, module, batch, attention=True, sublayers=True)
    for layer in targets.layers:
        u = cap.resid_pre[layer.name]  # [B, T, d]
        block, attn = layer.block, layer.attention
        proj = attn.o_proj if kind == "hf" else attn.proj
        seen: list[Tensor] = []
        handle = proj.register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            if kind == "timm":
                x = u.view(u.shape[0], *layer.windows.grid, u.shape[-1])
                z = block.norm1(x).flatten(1, 2)
                block._attn(block.norm1(x))
                v = attn.qkv(z)[..., 2 * u.shape[-1] :]
            elif kind == "timm_v2":  # post-norm, and the qkv bias kept apart
                x = u.view(u.shape[0], *layer.windows.grid, u.shape[-1])
                z = u
                block._attn(x)
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                v = F.linear(z, attn.qkv.weight, bias)[..., 2 * u.shape[-1] :]
            else:
                z = block.layernorm_before(u)
                block(u, layer.windows.grid)
                v = attn.v_proj(z)
        handle.remove()
        heads = cap.attention[layer.name].shape[1]
        per_window = seen[0].reshape(-1, 16, u.shape[-1])  # [B·nW, N, C], the library's window order
        ours = dense_attention(cap.attention[layer.name], layer.windows)  # [B, H, T, T]
        vh = v.view(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)  # [B, H, T, dh]
        out = (ours @ vh).transpose(1, 2).reshape(u.shape)  # [B, T, C] in raster order
        from_library = _unwindow(per_window, layer.windows, u.shape[0])
        torch.testing.assert_close(out, from_library, atol=1e-5, rtol=0)


def _unwindow(per_window: Tensor, layout: WindowLayout, b: int) -> Tensor:
    """The library's per-window outputs ``[B·nW, N, C]`` back in raster order ``[B, T, C]`` (window tokens)."""
    index = window_tokens(layout)  # [nW, N]
    out = per_window.new_zeros(b, layout.grid[0] * layout.grid[1], per_window.shape[-1])
    out[:, index.flatten()] = per_window.view(b, -1, per_window.shape[-1])
    return out


# ---- training with every callback ----------------------------------------------------------------------------------
SKIPPED = {
    "JacobianStability": "lyapunov over all layers skipped",
    "AttentionRollout": "rollout across stages skipped",
    "InformationFlow": "consecutive_corr of ",
    "StabilityMonitor": "drift skipped",
    "PDEFit": "the diffusion term (D, r2_diffusion) skipped",
}
PER_LAYER = (
    "attention_similarity/cosine", "attention_similarity/entropy", "layer_mutual_information/I_TY",
    "gradient_flow/grad_norm", "stability_monitor/W_O_spectral", "stability_monitor/rms_growth",
    "stability_monitor/cka_to_embedding", "information_flow/cka_consecutive", "perturbation_eval/amplification",
    "pde_fit/detail/r2", "pde_fit/detail/alpha", "jacobian_stability/spectral_norm", "attention_rollout/entropy",
)  # fmt: skip


def _fit(kind: str, callbacks: list[Any]) -> tuple[L.LightningModule, MemoryLogger, list[str], L.Trainer]:
    module = swin(kind)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            max_steps=2, logger=logger, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu",
        )  # fmt: skip
        trainer.fit(module, *loaders(kind))
    return module, logger, [str(w.message) for w in caught], trainer


@pytest.mark.parametrize("kind", KINDS)
def test_all_callbacks_through_the_plugin_analyse_every_stage(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pdelightning.callbacks import attention_rollout as rollout_module

    monkeypatch.setattr(rollout_module, "_CHUNK_ELEMENTS", 3 * 64 * 64)  # stage 0 rolled out 3 samples at a time
    module, logger, messages, trainer = _fit(kind, build_callbacks("all"))
    assert trainer.global_step == 2
    assert not [m for m in messages if "switched off" in m], messages
    _, targets = resolve(module)
    layers = [t.name for t in targets.layers]
    keys = logger.keys()
    for layer in layers:  # every stage's blocks, every callback
        for key in PER_LAYER:
            assert f"analysis/{key}/{layer}" in keys, (key, layer)
    stage0, stage1 = layers[:2], layers[2:]
    for layer in stage0:
        assert f"analysis/stability_monitor/drift/{layer}" in keys
    for layer in stage1:  # not defined across the patch merging: skipped, and said
        assert f"analysis/stability_monitor/drift/{layer}" not in keys
        assert f"analysis/pde_fit/D/{layer}" not in keys
    assert f"analysis/information_flow/consecutive_corr/{stage0[1]}" in keys
    assert f"analysis/information_flow/consecutive_corr/{stage1[0]}" not in keys
    assert f"analysis/information_flow/consecutive_corr/{stage1[1]}" in keys
    assert "analysis/jacobian_stability/lyapunov" not in keys  # one exponent per stage instead
    stage_keys = (
        {"model.layers.0", "model.layers.1"}
        if kind != "hf"
        else {"model.swin.encoder.layers.0", "model.swin.encoder.layers.1"}
    )
    for stage in stage_keys:
        series = logger.series(f"analysis/jacobian_stability/lyapunov/{stage}")
        assert series and all(math.isfinite(v) for _, v in series), stage
    for name, what in SKIPPED.items():
        said = [m for m in messages if m.startswith(f"{name}: {what}")]
        assert len(said) == 1, (name, [m for m in messages if m.startswith(name)])
    assert stage1[0] in next(m for m in messages if m.startswith("InformationFlow: consecutive_corr"))
    # a residual block is exactly u + attention + MLP (pre-norm; post-norm in V2): with Δt = 1/L the fit gives
    # α = c = L and R² = 1
    for layer in layers:  # the full fit of a non-PDE layer is under detail/
        for q, expected in (("alpha", 4.0), ("ffn_coef", 4.0), ("r2", 1.0)):
            assert logger.series(f"analysis/pde_fit/detail/{q}/{layer}")[-1][1] == pytest.approx(expected, abs=1e-4), q
    # values: at the start the reference is the model itself, so its attention matches itself exactly
    for layer in layers:
        first = logger.series(f"analysis/attention_similarity/cosine/{layer}")[0]
        assert first[0] == 0 and first[1] == pytest.approx(1.0, abs=1e-5)
    # the clean loss of the last probe is the model's own loss on the probe samples
    hub = ProbeHub.of(trainer)
    perturbation = next(c for c in trainer.callbacks if type(c).__name__ == "PerturbationEval")
    total, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for raw, index in hub.probe_set(trainer, perturbation):
            loss = module.model(**raw).loss if kind == "hf" else F.cross_entropy(module(raw[0]), raw[1])
            total, count = total + float(loss) * len(index), count + len(index)
    assert logger.series("analysis/perturbation_eval/loss_clean")[-1][1] == pytest.approx(total / count, rel=1e-5)
    # the last probe's attention entropy and per-stage rollout, recomputed from the library's own attention
    entropy = dict.fromkeys(layers, 0.0)
    rollout = dict.fromkeys(layers, 0.0)
    for raw, _ in hub.probe_set(trainer, perturbation):
        rows = [
            window_rows(p.float(), t.windows)
            for p, t in zip(library_windows(kind, module, raw), targets.layers, strict=True)
        ]
        for i, layer in enumerate(layers):
            entropy[layer] += float(attention_entropy(rows[i]).mean(1).sum())  # per row, heads averaged
        for stage in ((0, 1), (2, 3)):  # the rollout restarts at each stage
            dense = [dense_attention(rows[i], targets.layers[i].windows) for i in stage]
            per_sample = row_entropy(attention_rollout(dense), reduction="none").mean(-1)  # [L, B]
            for j, i in enumerate(stage):
                rollout[layers[i]] += float(per_sample[j].sum())
    similarity = next(c for c in trainer.callbacks if type(c).__name__ == "AttentionSimilarity")
    for layer in layers:  # the figure's map: the full [T, T] operator of one sample, each row within its window
        model_map, _ = similarity._maps[layer]
        t = 64 if layer in stage0 else 16
        assert model_map.shape == (t, t)
        torch.testing.assert_close(model_map.sum(-1), torch.ones(t), atol=1e-5, rtol=0)
        assert int((model_map > 0).sum(-1).max()) <= 16
    for layer in layers:
        logged = logger.series(f"analysis/attention_similarity/entropy/{layer}")[-1][1]
        assert logged == pytest.approx(entropy[layer] / (count * (64 if layer in stage0 else 16)), rel=1e-4)
        logged = logger.series(f"analysis/attention_rollout/entropy/{layer}")[-1][1]
        assert logged == pytest.approx(rollout[layer] / count, rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_explicitly_attached_callbacks_work(kind: str) -> None:
    callbacks = [type(c)() for c in build_callbacks("all")]  # on_missing="raise", the default
    assert all(getattr(c, "on_missing", "raise") == "raise" for c in callbacks)
    _, logger, messages, trainer = _fit(kind, callbacks)
    assert trainer.global_step == 2
    assert not [m for m in messages if "switched off" in m]
    assert "analysis/attention_rollout/entropy/" in " ".join(sorted(logger.keys()))


@pytest.mark.parametrize("kind", KINDS)
def test_windows_that_do_not_tile_the_grid_raise_naming_the_layers(kind: str) -> None:
    """24 px / 4 = 6x6 tokens in windows of 4: the library pads the grid; those layers offer no attention target."""
    from pdelightning.callbacks import AttentionRollout

    module = swin(kind, img=24)
    _, targets = resolve(module)
    untiled = [t.name for t in targets.layers if t.attention is None]
    assert len(untiled) == 2 and all("layers.0.blocks" in n for n in untiled)
    with pytest.raises(TargetNotFoundError, match=r"no attention module found for layers \[.*layers\.0\.blocks\.0"):
        resolve(module, need=("layers", "attention"))
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[AttentionRollout()], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")  # fmt: skip
    with pytest.raises(TargetNotFoundError, match="no attention module found"):
        trainer.fit(module, *loaders(kind, img=24))


def test_doctests_of_the_window_geometry() -> None:
    import doctest

    from pdelightning.adapters import windowed

    result = doctest.testmod(windowed, raise_on_error=False)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_edits_see_tokens_and_go_back_to_the_models_layout(kind: str) -> None:
    """PerturbationEval's edits of ``u_0`` get ``[B, T, d]`` tokens; the model receives them in its own layout."""
    module = swin(kind)
    batch = batch_of(kind)
    adapter, targets = resolve(module)
    delta = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(3))
    first = targets.layers[0]
    module.eval()
    with torch.no_grad():
        with Capture(adapter, targets, Request(hidden=True, sublayers=True)) as cap, EmbeddingEdit(targets) as edit:
            edit.fn = lambda u: u + delta
            call_model(module, batch)
            got = cap.pop()
        clean = got.resid_pre[first.name]  # seen before the edit (hooks run in the order they were added)
        if kind == "hf":
            expected = first.block(clean + delta, first.windows.grid)[0]
        else:
            expected = flatten_grid(first.block((clean + delta).view(3, 8, 8, 16)))
    torch.testing.assert_close(got.hidden[first.name], expected)
