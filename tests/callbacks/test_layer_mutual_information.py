"""LayerMutualInformation: estimators against known answers, saturation, end to end, checkpoint round trip."""

from __future__ import annotations

import doctest
import math

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import pdelightning.callbacks.layer_mutual_information as lmi
from pdelightning.analysis.representation import padding_mask_from_inputs, pool_tokens
from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.layer_mutual_information import LayerMutualInformation
from pdelightning.plots import information_plane_figure
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events, scalar_tags, scalars

KEY = "analysis/layer_mutual_information"


def _trainer(tmp_path, callbacks, max_epochs: int = 1, **kw) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        **kw,
    )


# ---- math against known answers ------------------------------------------------------------------------
def test_doctests() -> None:
    assert doctest.testmod(lmi).failed == 0


def test_pooling_masks_padding() -> None:
    x = torch.tensor([[4, 2, 0, 0], [1, 1, 1, 3]])
    h = torch.arange(8.0).view(2, 4, 1)
    mask = padding_mask_from_inputs(x)
    assert torch.equal(pool_tokens(h, mask), torch.tensor([[0.5], [5.5]]))
    assert torch.equal(pool_tokens(h, mask, "flatten"), torch.tensor([[0.0, 1.0, 0.0, 0.0], [4.0, 5.0, 6.0, 7.0]]))
    # a layer whose token axis has another length than the input's (e.g. a CLS token) is pooled unmasked
    assert torch.equal(pool_tokens(torch.ones(2, 5, 1), mask), torch.ones(2, 1))
    assert padding_mask_from_inputs(torch.rand(2, 4, 4)) is None  # images: no padding


def test_figure_marks_saturated_points() -> None:
    history = [
        {
            "step": s,
            "I_XT": {"a": 1.0 + s, "b": 6.0},
            "I_TY": {"a": 0.5 * s, "b": 2.0},
            "saturated": {"a": False, "b": True},
        }
        | {"log2_N": 6.0, "H_Y": 2.0}
        for s in range(3)
    ]
    fig = information_plane_figure(history, ["a", "b"])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("log2 N" in s for s in labels) and any("saturated" in s for s in labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"estimator": "mine"}, "estimator='mine' is not one of"),
        ({"pooling": "max"}, "pooling='max' is not one of"),
        ({"noise_variance": 0.0}, "noise_variance=0.0 must be positive"),
        ({"kde_max_samples": 1}, "kde_max_samples=1"),
        ({"n_bins": 1}, "n_bins=1"),
        ({"n_components": 0}, "n_components=0"),
        ({"probe_folds": 1}, "probe_folds=1"),
        ({"bins": "linear"}, r"bins='linear' is not one of \('equal_width', 'quantile'\)"),
        ({"saturation_tol": -1.0}, "saturation_tol=-1.0"),
        ({"probe_size": 0}, "probe_size=0"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LayerMutualInformation(**kwargs)


# ---- end to end --------------------------------------------------------------------------------------------
def _assert_logged(log_dir, layers: list[str]) -> None:
    tags = scalar_tags(log_dir)
    expected = {f"{KEY}/detail/H_Y", f"{KEY}/detail/log2_N"} | {
        f"{KEY}/{q}/{layer}" for q in ("I_XT", "I_TY", "detail/saturated") for layer in layers
    }
    assert expected <= tags, sorted(tags)
    for tag in expected:
        values = [v for _, v in scalars(log_dir, tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (tag, values)  # start + epoch end
    for layer in layers:
        assert all(v >= 0 for _, v in scalars(log_dir, f"{KEY}/I_TY/{layer}"))
        assert all(v in (0.0, 1.0) for _, v in scalars(log_dir, f"{KEY}/detail/saturated/{layer}"))
    assert f"{KEY}/information_plane" in read_events(log_dir).Tags()["images"]


@pytest.mark.parametrize("kind, estimator", [("transformer", "probe"), ("pde", "kde")])  # binning: tests below
def test_end_to_end_on_our_models(tmp_path, kind, estimator) -> None:
    train, val = image_loaders(n=64)
    cb = LayerMutualInformation(estimator=estimator, probe_size=48, kde_max_samples=40, noise_variance=1.0)
    _trainer(tmp_path, [cb]).fit(our_task(kind), train, val)
    _assert_logged(tmp_path, ["blocks.0", "blocks.1"])
    assert [h["step"] for h in cb.history] == [0, 4]
    expected_log2_n = math.log2(48 if estimator == "binning" else 40)  # the KDE uses kde_max_samples of them
    assert scalars(tmp_path, f"{KEY}/detail/log2_N")[0][1] == pytest.approx(expected_log2_n)


def test_stock_encoder_via_globs(tmp_path) -> None:
    train, val = image_loaders(n=64)
    cb = LayerMutualInformation(layers="encoder.layers.*", probe_size=48, pooling="flatten")
    _trainer(tmp_path, [cb]).fit(StockEncoderModule(), train, val)
    _assert_logged(tmp_path, ["encoder.layers.0", "encoder.layers.1"])


def test_token_inputs_with_padding(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    n, t_max = 64, 12
    y = torch.arange(n) % 4
    x = torch.randint(1, 20, (n, t_max), generator=g)
    x[:, 0] = 20 + y  # the first token tells the class
    lengths = torch.randint(3, t_max + 1, (n,), generator=g)
    x[torch.arange(t_max)[None, :] >= lengths[:, None]] = 0  # padding at the end
    ds = TensorDataset(x, y)
    model = our_task("transformer", input_kind="tokens", vocab_size=24, max_len=t_max)
    cb = LayerMutualInformation(estimator="binning", probe_size=48)
    _trainer(tmp_path, [cb]).fit(model, DataLoader(ds, batch_size=16, shuffle=True), DataLoader(ds, batch_size=16))
    _assert_logged(tmp_path, ["blocks.0", "blocks.1"])


def test_saturated_estimates_are_flagged_and_warned(tmp_path) -> None:
    train, val = image_loaders(n=64)
    cb = LayerMutualInformation(estimator="binning", n_components=None, n_bins=10_000, probe_size=48)
    with pytest.warns(UserWarning, match="ceiling"):
        _trainer(tmp_path, [cb]).fit(our_task("transformer"), train, val)
    for layer in ("blocks.0", "blocks.1"):
        assert [v for _, v in scalars(tmp_path, f"{KEY}/detail/saturated/{layer}")] == [1.0, 1.0]
        assert [v for _, v in scalars(tmp_path, f"{KEY}/I_XT/{layer}")] == pytest.approx([math.log2(48)] * 2)


def test_mlp_without_layers_fails_clearly(tmp_path) -> None:
    train, val = image_loaders(n=32)
    with pytest.raises(TargetNotFoundError, match="no Transformer layers to analyse"):
        _trainer(tmp_path, [LayerMutualInformation(probe_size=16)]).fit(MLPModule(), train, val)


def test_checkpoint_round_trip_continues_the_trajectory(tmp_path) -> None:
    train, val = image_loaders(n=64)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = LayerMutualInformation(estimator="kde", probe_size=32, noise_variance=1.0)
    _trainer(tmp_path / "a", [first, ckpt], enable_checkpointing=True).fit(our_task("pde"), train, val)
    saved = torch.load(ckpt.last_model_path, weights_only=False)["callbacks"][first.state_key]["history"]
    assert saved and [h["step"] for h in saved] == [h["step"] for h in first.history[: len(saved)]]

    resumed = LayerMutualInformation(estimator="kde", probe_size=32, noise_variance=1.0)
    assert resumed.state_key == first.state_key
    trainer = _trainer(tmp_path / "b", [resumed], max_epochs=2, enable_checkpointing=True)
    # weights_only=False: our own checkpoint, whose task hparams hold the optimizer factory (a partial).
    trainer.fit(our_task("pde"), train, val, ckpt_path=ckpt.last_model_path, weights_only=False)
    assert resumed.history[: len(saved)] == saved  # the pre-resume points are still on the curve
    assert len(resumed.history) == len(saved) + 1 and resumed.history[-1]["step"] == 8

    # The callback's own state is plain Python, loadable with torch.load(weights_only=True).
    torch.save(resumed.state_dict(), tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True) == resumed.state_dict()


class _TokenTagger(StockEncoderModule):
    """A user's token-classification model: one label per token ``[B, T]``, per-token logits ``[B, T, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten()))


def _token_labelled(n: int = 48) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, 8, generator=g)
    y = (x[..., 0] > 0).long()  # one label per row token: [n, 8]
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16, shuffle=True), DataLoader(ds, batch_size=16)


def test_token_level_labels_are_refused_with_their_shape(tmp_path) -> None:
    """Before: ``[B, T]`` labels were flattened and cut to B, i.e. the first sample's token labels became every
    sample's "label". Now: attached by hand it raises naming the shape; attached as the plugin does, it warns once and
    steps aside while the run trains on."""
    train, val = _token_labelled()
    with pytest.raises(ValueError, match=r"labels have shape \[32, 8\] \(token-level labels"):
        _trainer(tmp_path / "a", [LayerMutualInformation(probe_size=32)]).fit(_TokenTagger(), train, val)
    cb = LayerMutualInformation(probe_size=32, on_error="warn")
    with pytest.warns(UserWarning) as record:
        trainer = _trainer(tmp_path / "b", [cb], max_epochs=2)
        trainer.fit(_TokenTagger(), train, val)
    about = [str(w.message) for w in record if "labels have shape [32, 8]" in str(w.message)]
    assert len(about) == 1 and "LayerMutualInformation" in about[0]  # once, then it steps aside
    assert trainer.global_step == 6 and cb.failed and cb.history == []
