from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pdelightning.data import DigitsDataModule
from pdelightning.data.digits import DIGITS_MEAN, DIGITS_STD


def _raw_pixels(x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: back to the integer pixels 0..16."""
    raw = ((x * DIGITS_STD + DIGITS_MEAN) * 16).numpy()
    assert np.allclose(raw, raw.round(), atol=1e-4)
    return raw.round().astype(np.int64)


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    return dm


def test_batch_shape_dtype_range(dm: DigitsDataModule) -> None:
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert y.min() >= 0 and y.max() <= 9
    raw = _raw_pixels(x)
    assert raw.min() >= 0 and raw.max() <= 16


def test_split_sizes_as_documented(dm: DigitsDataModule) -> None:
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1293, 144, 360)


def test_splits_partition_the_data(dm: DigitsDataModule) -> None:
    digits = load_digits()
    expected = Counter(
        (img.astype(np.int64).tobytes(), int(t)) for img, t in zip(digits.images, digits.target, strict=True)
    )
    got: Counter = Counter()
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        x, y = ds.tensors
        got.update((img.tobytes(), int(t)) for img, t in zip(_raw_pixels(x), y, strict=True))
    assert got == expected  # same multiset: every image in exactly one split, with its label


def test_normalisation_constants(dm: DigitsDataModule) -> None:
    x = torch.cat([ds.tensors[0] for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)])
    assert x.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_split_is_stratified(dm: DigitsDataModule) -> None:
    counts = np.bincount(load_digits().target)
    test_counts = np.bincount(dm.test_dataset.tensors[1].numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)


def test_deterministic_given_seed(dm: DigitsDataModule) -> None:
    again = DigitsDataModule(batch_size=32)
    again.setup("fit")
    other = DigitsDataModule(batch_size=32, seed=1)
    other.setup("fit")
    for a, b in ((dm.train_dataset, again.train_dataset), (dm.test_dataset, again.test_dataset)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(dm.test_dataset.tensors[0], other.test_dataset.tensors[0])


def test_custom_fractions() -> None:
    dm = DigitsDataModule(val_fraction=0.5, test_fraction=0.5)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (449, 449, 899)


def test_bad_test_fraction() -> None:
    with pytest.raises(ValueError, match=r"test_fraction=1 must be a number strictly between 0 and 1"):
        DigitsDataModule(test_fraction=1)
