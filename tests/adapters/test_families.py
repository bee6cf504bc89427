"""Every family the adapters support, with every callback at its defaults: attention read exactly as the library
computes it, the clean loss equal to the model's own validation loss, and nothing that can kill the user's run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch

from pdelightning.adapters import reader_kind, resolve
from pdelightning.plugin import CALLBACK_NAMES, build_callbacks
from pdelightning.probing.batch import call_model, valid_from_batch
from pdelightning.probing.capture import Capture, Request
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import MLPModule, image_loaders
from tests.helpers.zoo import FAMILIES, family, library_attention, own_loss

EXPECTED_FAMILY = {
    "bert": "huggingface", "vit": "huggingface", "gpt2": "huggingface", "llama": "huggingface", "timm": "timm",
    "torch": "torch", "transformer_lens": "transformer_lens", "custom": "generic", "ours": "ours",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_is_the_librarys_own(name: str) -> None:
    module, _, val = family(name)
    batch = next(iter(val))
    adapter, targets = resolve(module, need=("layers", "attention"))
    assert adapter is not None and adapter.family == EXPECTED_FAMILY[name]
    assert len(targets.layers) == 2
    module.eval()
    with torch.no_grad(), Capture(adapter, targets, Request(attention=True, hidden=True)) as cap:
        call_model(module, batch)
        captured = cap.pop()
    reference = library_attention(name, module, batch)
    valid = captured.valid if captured.valid is not None else valid_from_batch(batch)
    for layer, expected in zip(targets.layers, reference, strict=True):
        p = captured.attention[layer.name]
        assert p.shape == expected.shape, (layer.name, reader_kind(layer.attention))
        torch.testing.assert_close(p, expected.float(), atol=1e-5, rtol=0)
        rows = p.sum(-1)  # [B, H, Q]
        queries = valid[:, None, :].expand_as(rows) if valid is not None and valid.shape[1] == rows.shape[-1] else None
        checked = rows[queries] if queries is not None else rows.flatten()
        torch.testing.assert_close(checked, torch.ones_like(checked), atol=1e-5, rtol=0)
        assert captured.hidden[layer.name].dim() == 3
    # the switches are undone: the next training step runs the model's usual path
    if name in ("bert", "vit", "gpt2", "llama"):
        assert module.model.config._attn_implementation != "eager"
    if name == "timm":
        assert all(b.attn.fused_attn for b in module.model.blocks)


@pytest.mark.parametrize("name", FAMILIES)
def test_all_callbacks_with_no_arguments_through_the_plugin(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PDELIGHTNING_CALLBACKS=all`` on a user's model: the run finishes and every callback measures it."""
    monkeypatch.setenv("PDELIGHTNING_CALLBACKS", "all")
    module, train, val = family(name)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            max_steps=3, logger=logger, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu",
        )  # fmt: skip
        names = {type(c).__name__ for c in trainer.callbacks}
        assert set(CALLBACK_NAMES) <= names
        trainer.fit(module, train, val)
    switched_off = [str(w.message) for w in caught if "switched off" in str(w.message)]
    assert not switched_off, switched_off
    _adapter, targets = resolve(module)
    layers = [t.name for t in targets.layers]
    keys = logger.keys()
    for layer in layers:
        for key in ("attention_similarity/cosine", "layer_mutual_information/I_TY", "gradient_flow/grad_norm",
                    "stability_monitor/W_O_spectral", "stability_monitor/drift", "information_flow/consecutive_corr",
                    "perturbation_eval/amplification", "pde_fit/r2_attention", "jacobian_stability/spectral_norm",
                    "attention_rollout/entropy"):  # fmt: skip
            assert f"analysis/{key}/{layer}" in keys, (key, layer)
    for key in ("perturbation_eval/loss_clean", "overhead/fraction", "jacobian_stability/lyapunov"):
        assert f"analysis/{key}" in keys
    values = [v for k in keys if k.startswith("analysis/stability_monitor/W_O_spectral") for _, v in logger.series(k)]
    assert values and all(math.isfinite(v) and v > 0 for v in values)
    # the clean loss of the last probe is the model's own validation loss on the same samples
    hub = ProbeHub.of(trainer)
    perturbation = next(c for c in trainer.callbacks if type(c).__name__ == "PerturbationEval")
    total, count = 0.0, 0
    for raw, index in hub.probe_set(trainer, perturbation):
        n = len(index)
        total += float(own_loss(name, module, raw)) * n
        count += n
    last = logger.series("analysis/perturbation_eval/loss_clean")[-1][1]
    assert last == pytest.approx(total / count, rel=1e-5)
    # probes at the start and at the end at least, and the realised overhead is logged
    assert len(logger.series("analysis/perturbation_eval/loss_clean")) >= 2


def test_a_model_without_a_transformer_finishes_with_one_warning_per_callback_that_cannot_attach() -> None:
    callbacks = build_callbacks("all")
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(
            max_steps=2, logger=logger, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu",
        ).fit(MLPModule(), *image_loaders(n=32))  # fmt: skip
    off = [str(w.message) for w in caught if "switched off" in str(w.message)]
    for name in ("AttentionSimilarity", "InformationFlow", "LayerMutualInformation", "StabilityMonitor", "PDEFit",
                 "JacobianStability", "AttentionRollout"):  # fmt: skip
        mine = [m for m in off if m.startswith(name)]
        assert len(mine) == 1, (name, off)
        assert "has no Transformer layers to analyse" in mine[0] and "Modules seen: net" in mine[0]
    # what needs no Transformer still works on an MLP: gradients per module, loss under input noise
    keys = logger.keys()
    assert "analysis/gradient_flow/grad_norm/net.1" in keys
    assert "analysis/perturbation_eval/loss_clean" in keys
