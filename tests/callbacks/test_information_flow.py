"""InformationFlow end to end (its CKA / correlation math: tests/analysis/test_representation.py, test_cka_hsic.py)."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.information_flow import InformationFlow
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning.task import ClassificationTask
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events

PREFIX = "analysis/information_flow"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the callback: arguments --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, r"pooling='max' is not one of \('mean', 'flatten'\)"),
        ({"correlation": "rows"}, r"correlation='rows' is not one of \('flattened', 'per_sample'\)"),
        ({"reference": torch.nn.Linear(2, 2), "reference_checkpoint": "x.ckpt"}, "not both"),
        ({"reference": "model"}, "must be an nn.Module"),
        ({"reference_class": "pdelightning.task.ClassificationTask"}, "only used with reference_checkpoint"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "pdelightning.task.Nope"}, "cannot be imported"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "torch.nn.Linear"}, "not a LightningModule"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "Task"}, "dotted path"),
        ({"heatmap_samples": 0}, "heatmap_samples=0 must be at least 1"),
        ({"probe_size": 3}, "unbiased CKA needs at least 4"),
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InformationFlow(**kwargs)


def test_layout_groups_per_layer_curves():
    charts = InformationFlow().layout()
    assert charts["consecutive-layer correlation"] == [rf"{PREFIX}/consecutive_corr/.*"]
    assert "CKA vs reference" not in charts
    assert "Spearman vs reference" in InformationFlow(reference=torch.nn.Linear(2, 2)).layout()


# ---- the callback end to end ----------------------------------------------------------------------------
def _fit(module, callback, tmp_path, loaders=None, **trainer_kw):
    train, val = loaders or image_loaders(n=48, batch_size=16)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **trainer_kw,
    )
    trainer.fit(module, train, val)
    return trainer, read_events(tmp_path)


def test_missing_reference_checkpoint_is_named(tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=r"reference_checkpoint='.*missing\.ckpt' does not exist"):
        _fit(our_task("transformer"), InformationFlow(reference_checkpoint=str(missing), probe_size=16), tmp_path)


def _values(acc, tag: str) -> list[float]:
    return [e.value for e in acc.Scalars(tag)]


def _assert_keys(acc, quantities: list[str], layers: list[str]) -> None:
    tags = set(acc.Tags()["scalars"])
    for q in quantities:
        for layer in layers:
            tag = f"{PREFIX}/{q}/{layer}"
            assert tag in tags, f"{tag} missing; have {sorted(t for t in tags if t.startswith(PREFIX))}"
            values = _values(acc, tag)
            assert len(values) == 2 and all(math.isfinite(v) for v in values)  # probe at start + epoch end


@pytest.mark.parametrize(("kind", "ref_kind", "figures"), [("transformer", "pde", True), ("pde", "transformer", False)])
def test_end_to_end_against_the_other_model(tmp_path, kind, ref_kind, figures):
    callback = InformationFlow(
        reference=our_task(ref_kind, n_layers=2), probe_size=32, probe_batch_size=12, figures=figures
    )
    _, acc = _fit(our_task(kind, n_layers=2), callback, tmp_path)
    _assert_keys(acc, ["consecutive_corr", "cka_consecutive"], ["blocks.0", "blocks.1"])
    _assert_keys(
        acc,
        ["pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"],
        ["embedding", "blocks.0", "blocks.1"],
    )
    assert not any("consecutive" in t and t.endswith("/embedding") for t in acc.Tags()["scalars"])
    images = {f"{PREFIX}/heatmaps", f"{PREFIX}/cka_matrix"} if figures else set()
    assert set(acc.Tags()["images"]) == images
    for tag in ("cka_consecutive", "consecutive_corr"):
        assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in _values(acc, f"{PREFIX}/{tag}/blocks.1"))


def test_model_against_itself_is_perfectly_correlated(tmp_path):
    task = our_task("pde", n_layers=2)
    callback = InformationFlow(
        reference=task, correlation="per_sample", probe_size=24, probe_batch_size=24, figures=False
    )
    _, acc = _fit(task, callback, tmp_path)
    for q in ("pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"):
        for layer in ("embedding", "blocks.0", "blocks.1"):
            assert _values(acc, f"{PREFIX}/{q}/{layer}") == pytest.approx([1.0, 1.0], abs=1e-5)
    assert acc.Tags()["images"] == []


def test_stock_encoder_with_globs_and_flatten_pooling(tmp_path):
    callback = InformationFlow(
        reference=our_task("transformer", n_layers=3),
        layers="encoder.layers.*",
        embedding="proj",
        pooling="flatten",
        probe_size=16,
        figures=False,
    )
    _, acc = _fit(StockEncoderModule(n_layers=2), callback, tmp_path)
    layers = ["encoder.layers.0", "encoder.layers.1"]
    _assert_keys(acc, ["consecutive_corr", "cka_consecutive"], layers)
    _assert_keys(acc, ["pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"], ["embedding", *layers])
    assert not any("/blocks.2" in t for t in acc.Tags()["scalars"])  # i < min(L, L_ref)


def test_model_without_layers_gives_a_clear_error(tmp_path):
    with pytest.raises(TargetNotFoundError, match="MLPModule has no Transformer layers to analyse"):
        _fit(MLPModule(), InformationFlow(probe_size=8), tmp_path)
    with pytest.raises(TargetNotFoundError, match="reference model: MLPModule has no Transformer layers"):
        _fit(our_task("transformer"), InformationFlow(reference=MLPModule(), probe_size=8), tmp_path)


def test_token_inputs_pool_over_valid_tokens_only(tmp_path):
    g = _gen(7)
    n, T = 32, 10
    x = torch.randint(1, 20, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    x[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # padding at the end
    y = torch.arange(n) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    task = our_task("transformer", n_layers=2, input_kind="tokens", vocab_size=20, max_len=T, norm="none")
    callback = InformationFlow(probe_size=n, figures=False)
    _fit(task, callback, tmp_path, loaders=(loader, loader))
    pooled = {}
    task.model.hook_pooled.register_forward_hook(lambda m, a, out: pooled.setdefault("h", out))
    task.eval()
    with torch.no_grad():
        task(x)
    # with norm="none" the model's own pooling (masked mean, padding excluded) is the last layer's pooled state
    torch.testing.assert_close(callback.last_reps["blocks.1"], pooled["h"], atol=1e-5, rtol=1e-5)


def _cli_style_checkpoint(tmp_path) -> tuple[str, ClassificationTask]:
    """A checkpoint as ``pdelightning fit`` writes it: the model's class_path config is in the hparams."""
    init = {"num_classes": 4, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "image_size": 8}
    hparams = {"model": {"class_path": "pdelightning.models.PDEClassifier", "init_args": init}, "num_classes": 4}
    with _given_hyperparameters_context(hparams, "lightning.pytorch.cli.instantiate_module"):
        task = ClassificationTask(PDEClassifier(**init), num_classes=4)
    path = tmp_path / "ref.ckpt"
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, path)
    return str(path), task


@pytest.mark.parametrize("reference_class", ["pdelightning.task.ClassificationTask", None], ids=["given", "default"])
def test_reference_from_checkpoint(tmp_path, reference_class):
    path, saved = _cli_style_checkpoint(tmp_path)
    callback = InformationFlow(reference_checkpoint=path, reference_class=reference_class, probe_size=16, figures=False)
    _, acc = _fit(our_task("transformer", n_layers=2), callback, tmp_path / "run")
    assert isinstance(callback.reference, ClassificationTask)
    assert isinstance(callback.reference.model, PDEClassifier)
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(callback.reference.state_dict()[name], value)  # the reference was not trained
    _assert_keys(acc, ["pearson_vs_reference", "cka_vs_reference"], ["embedding", "blocks.0", "blocks.1"])


def _picklable_task(cls: type) -> ClassificationTask:  # our_task's optimizer lambda cannot cross ddp_spawn
    return ClassificationTask(
        cls(num_classes=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, image_size=8, bottleneck_dim=None), num_classes=4
    )


def _ddp_run(tmp_path, strategy_kw):
    torch.manual_seed(0)
    task, ref = _picklable_task(TransformerClassifier), _picklable_task(PDEClassifier)
    callback = InformationFlow(reference=ref, probe_size=30, probe_batch_size=8, figures=False)
    _, acc = _fit(task, callback, tmp_path, accelerator="cpu", **strategy_kw)
    return {t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"] if t.startswith(PREFIX)}


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_gives_the_one_process_values(tmp_path):
    one = _ddp_run(tmp_path / "one", {"devices": 1})
    two = _ddp_run(tmp_path / "two", {"devices": 2, "strategy": "ddp_spawn"})
    assert one.keys() == two.keys() and one
    for k in one:  # step 0 (before any training step): same weights, same probe set
        assert two[k] == pytest.approx(one[k], abs=1e-5), k


def test_measure_keys_and_too_few_samples_for_cka():
    g = _gen(8)
    x = torch.randn(12, 4, generator=g)
    reps = {"embedding": x, "blocks.0": 2 * x, "reference/embedding": x, "reference/blocks.0": torch.exp(x)}
    scalars, matrix, cross = InformationFlow().measure(reps)
    assert float(scalars[f"{PREFIX}/consecutive_corr/blocks.0"]) == pytest.approx(1.0)
    assert float(scalars[f"{PREFIX}/cka_consecutive/blocks.0"]) == pytest.approx(1.0, abs=1e-6)
    assert float(scalars[f"{PREFIX}/spearman_vs_reference/blocks.0"]) == pytest.approx(1.0, abs=1e-6)
    assert float(scalars[f"{PREFIX}/pearson_vs_reference/blocks.0"]) < 0.95
    assert matrix.shape == (2, 2) and cross.shape == (2, 2)
    few = {k: v[:3] for k, v in reps.items()}  # a probe set smaller than 4: correlations only
    scalars, matrix, cross = InformationFlow().measure(few)
    assert matrix is None and cross is None
    assert not any("cka" in k for k in scalars) and f"{PREFIX}/pearson_vs_reference/blocks.0" in scalars
