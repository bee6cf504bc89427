from __future__ import annotations

import gzip
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pdelightning.data import MNISTDataModule
from pdelightning.data.mnist import MNIST_FILES, MNIST_MEAN, MNIST_STD, prepare_mnist_root

MNIST_N_TRAIN, MNIST_N_TEST = 50, 20  # as written by conftest's `mnist_gz_dir`


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torchvision's download must never run, and scratch copies go to this test's tmp dir."""

    def fail(self: object) -> None:
        raise AssertionError("torchvision MNIST.download called")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()


def _ids(x: torch.Tensor) -> list[int]:
    """Recover each image's id from pixel [0, 0] (written by the fixture), undoing the normalisation."""
    return ((x[:, 0, 0] * MNIST_STD + MNIST_MEAN) * 255).round().long().tolist()


def test_gz_only_loads_with_download_false(mnist_gz_dir: Path) -> None:
    raw = mnist_gz_dir / "MNIST" / "raw"
    assert not any((raw / name).exists() for name in MNIST_FILES)
    dm = MNISTDataModule(data_dir=mnist_gz_dir, batch_size=8, val_fraction=0.2)
    dm.prepare_data()
    dm.setup("fit")
    assert all((raw / name).is_file() for name in MNIST_FILES)  # decompressed in place (writable dir)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (40, 10, MNIST_N_TEST)

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 28, 28) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.int64
    # known values: background 0 and the 255 square, normalised with the documented constants
    assert x[0, 20, 20].item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-6)
    assert x[0, 7, 7].item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
    # labels follow the ids (label = id % 10), so the images kept their labels
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        xs, ys = ds.tensors
        assert [i % 10 for i in _ids(xs)] == ys.tolist()
    assert _ids(dm.test_dataset.tensors[0]) == list(range(100, 100 + MNIST_N_TEST))


def test_setup_without_prepare_data(mnist_gz_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_gz_dir))
    dm.setup("test")
    assert len(dm.test_dataset) == MNIST_N_TEST


def test_read_only_dir_uses_scratch_copy(mnist_gz_dir: Path, tmp_path: Path) -> None:
    raw = mnist_gz_dir / "MNIST" / "raw"
    before = sorted(p.name for p in raw.iterdir())
    mode = raw.stat().st_mode
    raw.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        root = prepare_mnist_root(mnist_gz_dir)
        dm = MNISTDataModule(data_dir=mnist_gz_dir)
        dm.setup("fit")
        assert sorted(p.name for p in raw.iterdir()) == before  # source untouched
    finally:
        raw.chmod(mode)
    assert root != mnist_gz_dir and root.is_relative_to(tmp_path / "scratch")
    assert all((root / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)
    assert len(dm.train_dataset) + len(dm.val_dataset) == MNIST_N_TRAIN


def test_read_only_dir_partly_decompressed(mnist_gz_dir: Path) -> None:
    raw = mnist_gz_dir / "MNIST" / "raw"
    gz = raw / "t10k-labels-idx1-ubyte.gz"
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()  # this file exists only decompressed; the other three only as .gz
    mode = raw.stat().st_mode
    raw.chmod(0o555)
    try:
        root = prepare_mnist_root(mnist_gz_dir)
        dm = MNISTDataModule(data_dir=mnist_gz_dir)
        dm.setup("test")
    finally:
        raw.chmod(mode)
    assert (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").is_symlink()
    assert dm.test_dataset.tensors[1].tolist() == [i % 10 for i in range(100, 100 + MNIST_N_TEST)]


def test_already_decompressed_is_used_as_is(mnist_gz_dir: Path) -> None:
    assert prepare_mnist_root(mnist_gz_dir) == mnist_gz_dir
    for gz in (mnist_gz_dir / "MNIST" / "raw").glob("*.gz"):
        gz.unlink()
    assert prepare_mnist_root(mnist_gz_dir) == mnist_gz_dir
    dm = MNISTDataModule(data_dir=mnist_gz_dir)
    dm.setup("fit")
    assert len(dm.test_dataset) == MNIST_N_TEST


def test_missing_files_error_names_path_and_remedy(tmp_path: Path) -> None:
    dm = MNISTDataModule(data_dir=tmp_path / "nowhere")
    raw = os.path.join(str(tmp_path / "nowhere"), "MNIST", "raw")
    with pytest.raises(FileNotFoundError, match=rf"MNIST not found in {raw}.*train-images-idx3-ubyte.*download: true"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte"):
        dm.setup("fit")


def test_one_missing_file_is_reported(mnist_gz_dir: Path) -> None:
    (mnist_gz_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="copy the four"):
        MNISTDataModule(data_dir=mnist_gz_dir).setup("fit")


def test_subsets_split_sizes_disjoint_and_deterministic(mnist_gz_dir: Path) -> None:
    def build(seed: int) -> MNISTDataModule:
        dm = MNISTDataModule(data_dir=mnist_gz_dir, train_subset=30, test_subset=7, val_fraction=0.1, seed=seed)
        dm.setup("fit")
        return dm

    dm = build(0)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (27, 3, 7)
    train_ids, val_ids = _ids(dm.train_dataset.tensors[0]), _ids(dm.val_dataset.tensors[0])
    assert not set(train_ids) & set(val_ids)
    assert set(train_ids) | set(val_ids) <= set(range(MNIST_N_TRAIN))
    assert set(_ids(dm.test_dataset.tensors[0])) <= set(range(100, 100 + MNIST_N_TEST))
    again = build(0)
    assert _ids(again.train_dataset.tensors[0]) == train_ids and _ids(again.val_dataset.tensors[0]) == val_ids
    other = build(1)
    assert sorted(_ids(other.train_dataset.tensors[0]) + _ids(other.val_dataset.tensors[0])) != sorted(
        train_ids + val_ids
    )


def test_full_split_is_stratified(mnist_gz_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=mnist_gz_dir, val_fraction=0.2)
    dm.setup("fit")
    assert np.bincount(dm.val_dataset.tensors[1].numpy()).tolist() == [1] * 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_subset": 0}, r"train_subset=0 must be a positive integer"),
        ({"test_subset": -5}, r"test_subset=-5 must be a positive integer"),
    ],
)
def test_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)
