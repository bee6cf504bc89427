"""T5 (encoder and encoder-decoder), BART, ModernBERT and torchvision's ViT: attention read exactly as the library
computes it, every callback through the plugin to the end of a run, ``W^O`` found, and PDEFit fitting only the
terms it found (the known answer of a pre-norm residual block: ``α = c = 1/Δt``, R² = 1).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from pdelightning.adapters import huggingface, reader_kind, resolve
from pdelightning.adapters.readers import hf_attention_weights
from pdelightning.callbacks import PDEFit, StabilityMonitor
from pdelightning.plugin import CALLBACK_NAMES
from pdelightning.probing.batch import call_model
from pdelightning.probing.capture import Capture, Request
from tests.helpers.loggers import MemoryLogger
from tests.helpers.zoo import CustomAttention, TupleModule
from tests.helpers.zoo_encdec import ENCDEC_FAMILIES, family, library_attention

#: per family: the adapter, the layer names (real module paths), and where the library keeps each layer's W^O
EXPECTED = {
    "t5_encoder": ("huggingface", "model.encoder.block.{i}", "model.encoder.block.{i}.layer.0.SelfAttention.o"),
    "t5": (
        "huggingface",
        "model.transformer.encoder.block.{i}",
        "model.transformer.encoder.block.{i}.layer.0.SelfAttention.o",
    ),
    "bart": ("huggingface", "model.model.encoder.layers.{i}", "model.model.encoder.layers.{i}.self_attn.out_proj"),
    "modernbert": ("huggingface", "model.model.layers.{i}", "model.model.layers.{i}.attn.Wo"),
    "torchvision_vit": (
        "generic",
        "model.encoder.layers.encoder_layer_{i}",
        "model.encoder.layers.encoder_layer_{i}.self_attention.out_proj",
    ),
}
PER_LAYER_KEYS = (
    "attention_similarity/cosine",
    "layer_mutual_information/I_TY",
    "stability_monitor/W_O_spectral",
    "stability_monitor/W_VO_spectral",
    "stability_monitor/drift",
    "information_flow/consecutive_corr",
    "perturbation_eval/amplification",
    "pde_fit/detail/r2",  # the full fit of a non-PDE layer is a detail
    "pde_fit/detail/alpha",
    "pde_fit/detail/ffn_coef",
    "pde_fit/detail/eq21_fitted",
    "jacobian_stability/spectral_norm",
    "attention_rollout/entropy",
)
#: pre-norm residual blocks: u_{l+1} = u_l + A_l + F_l exactly (BART is post-LN: no known answer)
PRE_NORM = ("t5_encoder", "t5", "modernbert", "torchvision_vit")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ENCDEC_FAMILIES)
@pytest.mark.parametrize("rows", [slice(None), slice(0, 1)], ids=["batch", "one_sample"])
def test_attention_is_the_librarys_own(name: str, rows: slice) -> None:
    """The probabilities equal the library's own ``output_attentions`` maps (one sample too: T5's position bias
    ``[1, H, Q, K]`` then has the weights' shape and must still never be read)."""
    module, _, val = family(name)
    batch = next(iter(val))
    batch = {k: v[rows] for k, v in batch.items()} if isinstance(batch, dict) else [t[rows] for t in batch]
    adapter, targets = resolve(module, need=("layers", "attention"))
    family_name, layer_name, _ = EXPECTED[name]
    assert adapter is not None and adapter.family == family_name
    modules = dict(module.named_modules())
    assert [t.name for t in targets.layers] == [layer_name.format(i=i) for i in range(2)]
    assert all(modules[t.name] is t.module for t in targets.layers)  # the real module path
    module.eval()
    with torch.no_grad(), Capture(adapter, targets, Request(attention=True, hidden=True)) as cap:
        call_model(module, batch)
        captured = cap.pop()
    reference = library_attention(name, module, batch)
    assert len(reference) == 2
    for layer, expected in zip(targets.layers, reference, strict=True):
        p = captured.attention[layer.name]
        assert p.shape == expected.shape, (layer.name, reader_kind(layer.attention))
        assert float((p - expected.float()).abs().max()) <= 1e-5
    if name != "torchvision_vit":  # the switch to eager is undone
        assert module.model.config._attn_implementation != "eager"


def test_hf_attention_weights_never_takes_the_position_bias() -> None:
    out, bias, weights = torch.zeros(3, 5, 8), torch.randn(1, 2, 5, 5), torch.rand(3, 2, 5, 5)
    assert hf_attention_weights((out, bias, weights)) is weights  # T5: (output, position_bias, weights)
    assert hf_attention_weights((out, weights)) is weights  # the others: (output, weights)
    assert hf_attention_weights((out, bias, None)) is None  # SDPA/flash: no weights; the bias is not taken instead
    assert hf_attention_weights((out, bias)) is None  # a [1, H, Q, K] tensor for a batch of 3 is not the weights
    assert hf_attention_weights(out) is None


def _fit_all(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[L.LightningModule, L.Trainer, MemoryLogger, list]:
    monkeypatch.setenv("PDELIGHTNING_CALLBACKS", "all")
    monkeypatch.setattr(huggingface, "_DECLARED", set())
    module, train, val = family(name)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            max_steps=3,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        )
        assert set(CALLBACK_NAMES) <= {type(c).__name__ for c in trainer.callbacks}
        trainer.fit(module, train, val)
    return module, trainer, logger, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ENCDEC_FAMILIES)
def test_all_nine_through_the_plugin(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module, trainer, logger, said = _fit_all(name, monkeypatch)
    assert trainer.global_step == 3
    assert not [m for m in said if "switched off" in m], said
    assert not [m for m in said if m.startswith("PDEFit") or "no attention output projection" in m], said
    decoder = [m for m in said if "decoder stack" in m]
    assert len(decoder) == (1 if name in ("t5", "bart") else 0), decoder  # once, though nine callbacks resolve it
    modules = dict(module.named_modules())
    keys = logger.keys()
    _, layer_name, w_o_name = EXPECTED[name]
    for i in range(2):
        layer = layer_name.format(i=i)
        for key in PER_LAYER_KEYS:
            assert f"analysis/{key}/{layer}" in keys, (key, layer)
        # ||W^O||_2 of the library's own weight, at the last probe (the end of training)
        w_o = modules[w_o_name.format(i=i)].weight.detach()
        logged = logger.series(f"analysis/stability_monitor/W_O_spectral/{layer}")[-1][1]
        assert logged == pytest.approx(float(torch.linalg.matrix_norm(w_o, 2)), rel=1e-5)
        alpha = logger.series(f"analysis/pde_fit/detail/alpha/{layer}")[-1][1]
        ffn = logger.series(f"analysis/pde_fit/detail/ffn_coef/{layer}")[-1][1]
        r2 = logger.series(f"analysis/pde_fit/detail/r2/{layer}")[-1][1]
        if name in PRE_NORM:  # an Euler step of size Δt = 1/L = 1/2 whose strengths are 1/Δt (float32 captures)
            assert alpha == pytest.approx(2.0, abs=1e-4) and ffn == pytest.approx(2.0, abs=1e-4)
            assert r2 == pytest.approx(1.0, abs=1e-6)
        else:  # BART's fc2 is found: a fitted coefficient, not an invented 0
            assert abs(ffn) > 0.1 and r2 < 1.0


class _UnnamedFFNBlock(nn.Module):
    """A pre-norm block whose feed-forward has a name no adapter knows (``transition``)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mixer = CustomAttention(d)
        self.transition = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.transition(self.norm2(x))


class _UnnamedFFNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.trunk = nn.ModuleList([_UnnamedFFNBlock() for _ in range(2)])
        self.cls = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        for block in self.trunk:
            h = block(h)
        return self.cls(h[:, -1])


def test_pde_fit_never_logs_a_coefficient_for_a_term_it_did_not_find() -> None:
    """The FFN is not found: ``ffn_coef`` is absent (not 0), said once, and ``α`` is the attention-only fit."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (16, 8), generator=g), torch.arange(16) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = TupleModule(_UnnamedFFNModel())
    _, targets = resolve(module)
    assert all(t.mlp_out is None and t.attn_out is not None for t in targets.layers)
    fit = PDEFit(diffusion="none", probe_size=16, probe_batch_size=8)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(
            max_steps=2,
            logger=logger,
            callbacks=[fit],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        ).fit(module, loader, loader)
    said = [str(w.message) for w in caught if str(w.message).startswith("PDEFit")]
    assert len(said) == 1 and "feed-forward" in said[0] and "ffn_coef is not logged" in said[0], said
    keys = logger.keys()
    assert not [k for k in keys if "/ffn_coef/" in k]
    # α is the least-squares coefficient of the attention output alone: <A, y> / <A, A> over the probe set
    module.eval()
    model = module.model
    with torch.no_grad():
        h = model.tok(x)
        block = model.trunk[0]
        a = block.mixer(block.norm1(h))
        expected = float((a * (block(h) - h) / 0.5).sum() / (a * a).sum())
    name = targets.layers[0].name
    assert logger.series(f"analysis/pde_fit/detail/alpha/{name}")[-1][1] == pytest.approx(expected, rel=1e-5)
    assert fit.last_results[name].ffn_coef is None


class _MergeAttention(CustomAttention):
    """Attention whose output projection has a name no adapter knows (``merge``)."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__(d, heads)
        self.merge = self.out
        del self.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.out = self.merge
        try:
            return super().forward(x)
        finally:
            del self.out


def test_w_o_not_found_is_said_once_and_nothing_is_invented() -> None:
    torch.manual_seed(0)
    model = _UnnamedFFNModel()
    for block in model.trunk:
        block.mixer = _MergeAttention()
    module = TupleModule(model)
    _, targets = resolve(module)
    assert all(t.out_proj_weight() is None for t in targets.layers)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (16, 8), generator=g), torch.arange(16) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callbacks = [StabilityMonitor(probe_size=16, probe_batch_size=8), PDEFit(probe_size=16, probe_batch_size=8)]
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(
            max_steps=3,
            logger=logger,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        ).fit(module, loader, loader)
    said = [str(w.message) for w in caught]
    w_o = [m for m in said if m.startswith("StabilityMonitor: no attention output projection W^O")]
    assert len(w_o) == 1 and "W_O_spectral" in w_o[0] and "model.trunk.0" in w_o[0], said
    assert len([m for m in said if m.startswith("PDEFit") and "W^O" in m]) == 1, said
    keys = logger.keys()
    assert not [k for k in keys if "W_O_spectral" in k or "W_VO_spectral" in k or "eq21" in k]
    assert "analysis/stability_monitor/drift/model.trunk.1" in keys  # the rest still measured


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_a_decoder_glob_reads_the_causal_self_attention_and_finds_the_sublayers(name: str) -> None:
    """``layers`` on the decoder stack: its causal self-attention is the library's ``decoder_attentions``, and the
    self-attention and feed-forward outputs are found for PDEFit (the cross-attention is not among them)."""
    module, _, val = family(name)
    batch = next(iter(val))
    stack = "model.transformer.decoder.block.*" if name == "t5" else "model.model.decoder.layers.*"
    adapter, targets = resolve(module, layers=stack, need=("layers", "attention"))
    assert all(t.attn_out is not None and t.mlp_out is not None for t in targets.layers)
    module.eval()
    with torch.no_grad(), Capture(adapter, targets, Request(attention=True)) as cap:
        call_model(module, batch)
        captured = cap.pop()
    for layer, expected in zip(targets.layers, library_attention(name, module, batch, "decoder"), strict=True):
        p = captured.attention[layer.name]
        assert float((p - expected.float()).abs().max()) <= 1e-5
        assert float(p.triu(1).abs().max()) == 0.0  # causal
