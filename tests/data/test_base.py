from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

import pdelightning.data as data_pkg
from pdelightning.data import (
    ClassificationDataModule,
    DigitsDataModule,
    MNISTDataModule,
    NewsgroupsDataModule,
    SyntheticImageDataModule,
    SyntheticTokenDataModule,
)
from pdelightning.data.base import pad_sequences, random_subset, split_sizes, stratified_split

ALL_MODULES = [
    DigitsDataModule,
    MNISTDataModule,
    NewsgroupsDataModule,
    SyntheticImageDataModule,
    SyntheticTokenDataModule,
]


def test_package_exports() -> None:
    assert sorted(data_pkg.__all__) == sorted(["ClassificationDataModule", *(cls.__name__ for cls in ALL_MODULES)])
    for cls in ALL_MODULES:
        assert issubclass(cls, ClassificationDataModule)
        assert issubclass(cls, L.LightningDataModule)


# Attributes a model is built from, available right after __init__ (no file is read there).
@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (DigitsDataModule, {}, (10, "image", 8, 0, 0)),
        (MNISTDataModule, {"data_dir": "/nonexistent"}, (10, "image", 28, 0, 0)),
        (NewsgroupsDataModule, {"data_dir": "/nonexistent"}, (20, "tokens", 0, 20000, 256)),
        (NewsgroupsDataModule, {"vocab_size": 500, "max_len": 64}, (20, "tokens", 0, 500, 64)),
        (NewsgroupsDataModule, {"categories": ["sci.space", "alt.atheism"]}, (2, "tokens", 0, 20000, 256)),
        (SyntheticImageDataModule, {"image_size": 6, "num_classes": 3}, (3, "image", 6, 0, 0)),
        (SyntheticTokenDataModule, {"vocab_size": 50, "max_len": 20}, (4, "tokens", 0, 50, 20)),
    ],
)
def test_attributes_after_init(cls: type, kwargs: dict, expected: tuple) -> None:
    dm = cls(**kwargs)
    assert (dm.num_classes, dm.input_kind, dm.image_size, dm.vocab_size, dm.max_len) == expected
    assert dm.pad_id == 0
    assert dm.train_dataset is None  # nothing loaded yet


@pytest.mark.parametrize("cls", ALL_MODULES)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -1}, r"batch_size=-1 must be a positive integer"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"batch_size": 2.5}, r"batch_size=2.5 must be a positive integer"),
        ({"num_workers": -1}, r"num_workers=-1 must be a non-negative integer"),
    ],
)
def test_bad_common_arguments(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [DigitsDataModule, MNISTDataModule, NewsgroupsDataModule])
@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(cls: type, fraction: float) -> None:
    with pytest.raises(ValueError, match=rf"val_fraction={fraction} must be a number strictly between 0 and 1"):
        cls(val_fraction=fraction)


def test_dataloader_before_setup_raises() -> None:
    with pytest.raises(RuntimeError, match=r"call setup\(\) before"):
        SyntheticImageDataModule().train_dataloader()


def test_loader_options() -> None:
    dm = SyntheticImageDataModule(batch_size=7, num_workers=2)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert loader.batch_size == 7
        assert loader.num_workers == 2
        assert loader.persistent_workers is True
        assert loader.pin_memory is torch.cuda.is_available()
    dm0 = SyntheticImageDataModule()
    dm0.setup("fit")
    assert dm0.train_dataloader().persistent_workers is False


def test_predict_is_test_and_eval_loaders_are_ordered() -> None:
    dm = SyntheticImageDataModule(num_test=100, batch_size=32)
    dm.setup("predict")
    pred = torch.cat([x for x, _ in dm.predict_dataloader()])
    test = torch.cat([x for x, _ in dm.test_dataloader()])
    assert torch.equal(pred, test)
    assert torch.equal(test, dm.test_dataset.tensors[0])


def test_split_sizes_follow_ceil_rule() -> None:
    assert split_sizes(1797, 0.2) == (1437, 360)
    assert split_sizes(60000, 0.1) == (54000, 6000)
    assert split_sizes(11314, 0.1) == (10182, 1132)
    assert split_sizes(10, 0.01) == (9, 1)


def test_stratified_split_is_deterministic_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    keep, out = stratified_split(labels, 0.1, seed=3)
    keep2, out2 = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(keep, keep2) and np.array_equal(out, out2)
    assert len(out) == 10 and len(keep) == 90
    assert np.intersect1d(keep, out).size == 0
    assert np.array_equal(np.sort(np.concatenate([keep, out])), np.arange(100))
    assert np.bincount(labels[out], minlength=4).tolist() == [4, 3, 2, 1]
    _, out3 = stratified_split(labels, 0.1, seed=4)
    assert not np.array_equal(out, out3)


def test_stratified_split_falls_back_when_a_class_is_tiny() -> None:
    labels = np.array([0, 0, 0, 0, 1])  # class 1 has one member: no stratification possible
    keep, out = stratified_split(labels, 0.4, seed=0)
    assert len(keep) == 3 and len(out) == 2


def test_stratified_split_rejects_empty_part() -> None:
    with pytest.raises(ValueError, match="one part would be empty"):
        stratified_split(np.array([0]), 0.5, seed=0)


def test_random_subset() -> None:
    assert np.array_equal(random_subset(5, None, 0), np.arange(5))
    assert np.array_equal(random_subset(5, 10, 0), np.arange(5))
    sub = random_subset(100, 10, 0)
    assert len(sub) == 10 and len(set(sub.tolist())) == 10 and np.all(np.diff(sub) > 0)
    assert np.array_equal(sub, random_subset(100, 10, 0))


def test_pad_sequences_pads_at_end_truncates_and_fills_empty() -> None:
    x = pad_sequences([[5, 6], [], [7, 8, 9, 10, 11]], max_len=4)
    assert x.dtype == torch.int64
    assert x.tolist() == [[5, 6, 0, 0], [1, 0, 0, 0], [7, 8, 9, 10]]


def test_torchvision_is_not_imported_at_module_level() -> None:
    for path in Path(data_pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("torchvision", "sklearn") for n in names), (path, names)


@pytest.mark.parametrize("cls", ALL_MODULES)
def test_jsonargparse_signature_and_help(cls: type) -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    help_text = parser.format_help()
    assert "--data.batch_size" in help_text
    assert "examples per batch" in help_text  # Google docstring Args are shown


def test_jsonargparse_parses_literals_and_lists() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(NewsgroupsDataModule, "data")
    cfg = parser.parse_args(["--data.source=tarball", "--data.remove=[headers, quotes]", "--data.vocab_size=100"])
    dm = parser.instantiate_classes(cfg).data
    assert dm.source == "tarball" and dm.remove == ("headers", "quotes") and dm.vocab_size == 100
    assert "tarball" in parser.format_help() and "sklearn" in parser.format_help()
    with pytest.raises(Exception, match="source"):
        parser.parse_args(["--data.source=web"])


class _TinyClassifier(L.LightningModule):
    def __init__(self, dm: ClassificationDataModule) -> None:
        super().__init__()
        self.tokens = dm.input_kind == "tokens"
        n_in = dm.max_len if self.tokens else dm.image_size**2
        self.embed = nn.Embedding(dm.vocab_size, 4) if self.tokens else None
        self.head = nn.Linear(n_in * (4 if self.tokens else 1), dm.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.embed(x) if self.embed is not None else x).flatten(1))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._step(batch))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._step(batch))

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("cls", [DigitsDataModule, SyntheticImageDataModule, SyntheticTokenDataModule])
def test_runs_in_a_trainer(cls: type) -> None:
    dm = cls(batch_size=16)
    model = _TinyClassifier(dm)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    preds = trainer.predict(model, datamodule=dm)
    assert preds is not None and preds[0].shape == (16,)


class _LinkedModel(L.LightningModule):
    def __init__(
        self, num_classes: int = -1, input_kind: str = "", image_size: int = -1, vocab_size: int = -1, max_len: int = -1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()


class _LinkingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("num_classes", "input_kind", "image_size", "vocab_size", "max_len"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data=SyntheticTokenDataModule", "--data.vocab_size=50", "--data.max_len=12"], (4, "tokens", 0, 50, 12)),
        (["--data=DigitsDataModule"], (10, "image", 8, 0, 0)),
        (["--data=NewsgroupsDataModule", "--data.categories=[sci.space, sci.med]"], (2, "tokens", 0, 20000, 256)),
    ],
)
def test_lightning_cli_links_attributes_on_instantiate(args: list[str], expected: tuple) -> None:
    cli = _LinkingCLI(
        _LinkedModel,
        ClassificationDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--trainer.logger=false", *args],
        save_config_callback=None,
    )
    hp = cli.model.hparams
    assert (hp.num_classes, hp.input_kind, hp.image_size, hp.vocab_size, hp.max_len) == expected
