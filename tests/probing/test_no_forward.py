"""LightningModules without ``forward()``: ``training_step`` calls ``self.model(...)`` and the probes call that model.

The attention the probes read is the library's own (``output_attentions=True`` for HuggingFace), every callback
attached by the plugin trains to the end and logs what it logs for the same model wrapped with a ``forward()``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pdelightning.adapters import resolve
from pdelightning.plugin import CALLBACK_NAMES
from pdelightning.probing.batch import call_model, forward_implemented, split_batch, valid_from_batch, wrapped_model
from pdelightning.probing.capture import Capture, Request
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.zoo import (
    IMG,
    NUM_CLASSES,
    SEQ,
    VOCAB,
    DictDataset,
    HFModule,
    PaddedEncoder,
    TupleDataset,
    TupleModule,
    _timm,
    _tokens,
    library_attention,
)


class HFNoForward(L.LightningModule):
    """The most common user module around a HuggingFace model: no ``forward()``, ``self.model(**batch).loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model(**batch).loss, batch_size=len(batch["labels"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TupleNoForward(L.LightningModule):
    """A module around a timm / PyTorch model without ``forward()``: ``self.model(*inputs)`` in ``training_step``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        *inputs, y = batch
        return F.cross_entropy(self.model(*inputs), y)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._loss(batch)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch[-1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class HFWithForward(HFNoForward):
    forward = HFModule.forward


class TupleWithForward(TupleNoForward):
    forward = TupleModule.forward


def _hf_model(kind: str) -> nn.Module:
    import transformers as tr

    tr.logging.set_verbosity_error()
    if kind == "bert":
        cfg: Any = tr.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=SEQ, num_labels=NUM_CLASSES, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return tr.BertForSequenceClassification(cfg)
    cfg = tr.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=SEQ,
        num_labels=NUM_CLASSES, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )  # fmt: skip
    return tr.DistilBertForSequenceClassification(cfg)


CASES = ("bert", "distilbert", "timm", "torch")


def _case(name: str, with_forward: bool = False, n: int = 24) -> tuple[L.LightningModule, DataLoader, DataLoader]:
    """A tiny model of ``name`` wrapped without (or, for comparison, with) ``forward()``, and its loaders."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids, mask, y = _tokens(n, g)
    if name in ("bert", "distilbert"):
        module: L.LightningModule = (HFWithForward if with_forward else HFNoForward)(_hf_model(name))
        data: Any = DictDataset(input_ids=ids, attention_mask=mask, labels=y)
    else:
        model = _timm() if name == "timm" else PaddedEncoder()
        module = (TupleWithForward if with_forward else TupleNoForward)(model)
        if name == "timm":
            data = TupleDataset(torch.randn(n, 1, IMG, IMG, generator=g) + y.float()[:, None, None, None], y)
        else:
            data = TupleDataset(ids, mask == 0, y)
    return module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)


def _reference_name(name: str) -> str:
    return "bert" if name == "distilbert" else name  # library_attention: output_attentions=True for every HF model


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_placeholder_forward_is_told_apart_from_a_real_one() -> None:
    assert not forward_implemented(HFNoForward(nn.Linear(2, 2)))
    assert not forward_implemented(nn.Module())
    assert forward_implemented(HFWithForward(nn.Linear(2, 2)))
    assert forward_implemented(nn.Linear(2, 2))


@pytest.mark.parametrize("name", CASES)
def test_probe_forward_of_a_module_without_forward_reads_the_librarys_own_attention(name: str) -> None:
    module, _, val = _case(name)
    batch = next(iter(val))
    args, kwargs, _ = split_batch(batch)
    inner = wrapped_model(module, args, kwargs)
    assert inner is module.model  # the whole wrapped model (its head included), not the recognised backbone
    adapter, targets = resolve(module, need=("layers", "attention"))
    module.eval()
    with torch.no_grad(), Capture(adapter, targets, Request(attention=True, hidden=True)) as cap:
        out = call_model(module, batch)
        captured = cap.pop()
    # the logits are the wrapped model's own, for the batch's inputs (labels left out)
    with torch.no_grad():
        if isinstance(batch, dict):
            expected_logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            expected_logits = module.model(*batch[:-1])
    logits = out.logits if hasattr(out, "logits") else out
    torch.testing.assert_close(logits, expected_logits, atol=1e-6, rtol=0)
    assert logits.shape == (len(batch[-1]) if isinstance(batch, list) else len(batch["labels"]), NUM_CLASSES)
    reference = library_attention(_reference_name(name), module, batch)
    valid = captured.valid if captured.valid is not None else valid_from_batch(batch)
    assert len(targets.layers) == len(reference) == 2
    for layer, expected in zip(targets.layers, reference, strict=True):
        p = captured.attention[layer.name]
        assert p.shape == expected.shape
        torch.testing.assert_close(p, expected.float(), atol=1e-5, rtol=0)
        if valid is not None and valid.shape[1] == p.shape[-1]:
            rows = p.sum(-1)[valid[:, None, :].expand(-1, p.shape[1], -1)]
            torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


def _fit(module: L.LightningModule, train: DataLoader, val: DataLoader) -> tuple[L.Trainer, MemoryLogger, list[str]]:
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            max_steps=3, logger=logger, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu",
        )  # fmt: skip
        assert set(CALLBACK_NAMES) <= {type(c).__name__ for c in trainer.callbacks}
        trainer.fit(module, train, val)
    return trainer, logger, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", CASES)
def test_all_callbacks_through_the_plugin_measure_a_module_without_forward(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PDELIGHTNING_CALLBACKS=all``: the run ends, nothing steps aside, and the start and final probes log exactly
    what they log for the same model (same weights, same data) wrapped with a ``forward()``.
    """
    monkeypatch.setenv("PDELIGHTNING_CALLBACKS", "all")
    module, train, val = _case(name)
    twin, _, _ = _case(name, with_forward=True)
    twin.model = copy.deepcopy(module.model)
    trainer, logger, messages = _fit(module, train, val)
    assert trainer.global_step == 3
    assert not [m for m in messages if "switched off" in m], messages
    _, twin_logger, _ = _fit(twin, train, val)
    _adapter, targets = resolve(module)
    keys = logger.keys()
    for layer in (t.name for t in targets.layers):
        for key in ("attention_similarity/cosine", "layer_mutual_information/I_TY", "gradient_flow/grad_norm",
                    "stability_monitor/W_O_spectral", "information_flow/consecutive_corr",
                    "perturbation_eval/amplification", "pde_fit/detail/r2", "jacobian_stability/spectral_norm",
                    "attention_rollout/entropy"):  # fmt: skip
            assert f"analysis/{key}/{layer}" in keys, (key, layer)
    # the probes at the start and at the end (not timing-dependent) log the same values as the twin with forward()
    compared = 0
    for key in sorted(k for k in keys if k.startswith("analysis/") and "overhead" not in k):
        mine, theirs = dict(logger.series(key)), dict(twin_logger.series(key))
        for step in {0, 3} & mine.keys() & theirs.keys():
            a, b = mine[step], theirs[step]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-6), (key, step, a, b)
            compared += 1
    assert compared > 50
    # the clean loss of the final probe is the model's own loss on the probe samples
    hub = ProbeHub.of(trainer)
    perturbation = next(c for c in trainer.callbacks if type(c).__name__ == "PerturbationEval")
    total, count = 0.0, 0
    module.eval()
    with torch.no_grad():
        for raw, index in hub.probe_set(trainer, perturbation):
            own = module.model(**raw).loss if isinstance(raw, dict) else module._loss(raw)
            total += float(own) * len(index)
            count += len(index)
    assert logger.series("analysis/perturbation_eval/loss_clean")[-1][1] == pytest.approx(total / count, rel=1e-5)


class BackboneOnly(L.LightningModule):
    """No ``forward()`` and two children that own parameters, composed in ``training_step``: nothing to call alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 4), nn.Linear(4, NUM_CLASSES)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.embed(x).mean(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _token_loader() -> DataLoader:
    ids, _, y = _tokens(16, torch.Generator().manual_seed(0))
    return DataLoader(TupleDataset(ids, y), batch_size=8)


def test_a_module_without_forward_and_nothing_to_call_gets_one_clear_error() -> None:
    with pytest.raises(TypeError, match=r"BackboneOnly .*defines no forward\(\).*probe_forward"):
        call_model(BackboneOnly(), (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2)))


def _trainer(callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_steps=2, logger=MemoryLogger(), callbacks=callbacks, enable_progress_bar=False, accelerator="cpu",
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip


def test_nothing_to_call_is_found_at_setup_explicitly_and_steps_aside_under_the_plugin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pdelightning.adapters import TargetNotFoundError
    from pdelightning.callbacks import PerturbationEval

    with pytest.raises(
        TargetNotFoundError, match=r"BackboneOnly defines no forward\(\).*children: embed \(Embedding\)"
    ):
        _trainer([PerturbationEval(probe_size=8)]).fit(BackboneOnly(), _token_loader(), _token_loader())
    monkeypatch.setenv("PDELIGHTNING_CALLBACKS", "all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer([])
        trainer.fit(BackboneOnly(), _token_loader(), _token_loader())
    assert trainer.global_step == 2
    off = [str(w.message) for w in caught if "switched off" in str(w.message)]
    assert any(m.startswith("PerturbationEval is switched off") and "defines no forward()" in m for m in off), off


def test_probe_forward_stays_the_override() -> None:
    module, _, val = _case("bert")
    calls: list[Any] = []

    def probe_forward(batch: Any) -> Tensor:
        calls.append(batch)
        return torch.zeros(len(batch["labels"]), NUM_CLASSES)

    module.probe_forward = probe_forward  # type: ignore[method-assign]
    batch = next(iter(val))
    assert call_model(module, batch).abs().sum() == 0 and calls == [batch]


class KwargsForward(HFNoForward):
    """A pass-through ``forward(*args, **kwargs)`` that the user never filled in."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def test_a_pass_through_forward_that_raises_not_implemented_falls_back_to_the_wrapped_model() -> None:
    module, _, val = _case("bert")
    stub = KwargsForward(module.model).eval()
    batch = next(iter(val))
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(call_model(stub, batch).logits, expected)


class NeedsLabels(nn.Module):
    """A user's wrapper whose ``forward`` requires the labels (it returns the HF output, loss included)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Any:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_a_wrapper_that_requires_the_labels_gets_them_and_is_preferred_to_the_backbone_inside() -> None:
    module = HFNoForward(NeedsLabels(_hf_model("bert"))).eval()
    batch = next(iter(_case("bert")[2]))
    args, kwargs, _ = split_batch(batch)
    assert wrapped_model(module, args, kwargs) is module.model.hf  # without the labels only the HF model binds
    assert wrapped_model(module, args, kwargs, batch) is module.model  # with them, the outermost wrapper
    with torch.no_grad():
        out = call_model(module, batch)
        expected = module.model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out.logits, expected.logits)
    assert out.loss is not None  # the wrapper got the labels


class Seq2Seq(nn.Linear):  # a parameter owner: the single child a probe may call
    def __init__(self) -> None:
        super().__init__(1, 1)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, decoder_input_ids: Tensor | None = None) -> Any:
        return {"logits": torch.zeros(1), "labels": labels, "decoder_input_ids": decoder_input_ids}


class ClassifierHead(Seq2Seq):
    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Any:  # type: ignore[override]
        return {"logits": torch.zeros(1), "labels": labels}


def test_labels_reach_only_an_encoder_decoder_model_given_no_decoder_inputs() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([[1, 2], [3, 4]])}
    seq2seq, head = HFNoForward(Seq2Seq()), HFNoForward(ClassifierHead())
    assert torch.equal(call_model(seq2seq, batch)["labels"], batch["labels"])  # shifted into decoder inputs by HF
    assert call_model(head, batch)["labels"] is None  # logits do not depend on them: left out
    given = {**batch, "decoder_input_ids": torch.zeros(2, 2, dtype=torch.long)}
    assert call_model(seq2seq, given)["labels"] is None
