from __future__ import annotations

from typing import TypeVar

import numpy as np
import pytest
import torch

from pdelightning.data import ClassificationDataModule, SyntheticImageDataModule, SyntheticTokenDataModule

DM = TypeVar("DM", bound=ClassificationDataModule)


def _setup(dm: DM) -> DM:
    dm.setup("fit")
    return dm


def test_image_batches() -> None:
    dm = _setup(SyntheticImageDataModule(image_size=8, num_classes=4, batch_size=16))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 8, 8) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0  # [0, 1] normalised with mean 0.5, std 0.5
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1024, 256, 256)


def test_image_classes_balanced() -> None:
    dm = _setup(SyntheticImageDataModule(num_classes=3, num_train=10, num_val=5, num_test=6))
    assert sorted(np.bincount(dm.train_dataset.tensors[1].numpy()).tolist()) == [3, 3, 4]
    assert np.bincount(dm.test_dataset.tensors[1].numpy()).tolist() == [2, 2, 2]


def test_image_learnable_by_nearest_class_mean() -> None:
    dm = _setup(SyntheticImageDataModule())
    xtr, ytr = dm.train_dataset.tensors
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(dm.num_classes)]).flatten(1)
    xte, yte = dm.test_dataset.tensors
    pred = torch.cdist(xte.flatten(1), means).argmin(1)
    assert (pred == yte).float().mean().item() > 0.9


def test_image_deterministic_and_splits_independent() -> None:
    a = _setup(SyntheticImageDataModule(seed=5))
    b = _setup(SyntheticImageDataModule(seed=5, num_train=100))
    c = _setup(SyntheticImageDataModule(seed=6))
    assert torch.equal(a.test_dataset.tensors[0], b.test_dataset.tensors[0])
    assert torch.equal(a.val_dataset.tensors[0], b.val_dataset.tensors[0])
    assert not torch.equal(a.test_dataset.tensors[0], c.test_dataset.tensors[0])
    assert not torch.equal(a.train_dataset.tensors[0][:100], a.val_dataset.tensors[0][:100])


def test_image_bad_values() -> None:
    with pytest.raises(ValueError, match=r"num_classes=1 must be at least 2"):
        SyntheticImageDataModule(num_classes=1)
    with pytest.raises(ValueError, match=r"noise=-0.1 must be a non-negative number"):
        SyntheticImageDataModule(noise=-0.1)
    with pytest.raises(ValueError, match=r"num_val=0 must be a positive integer"):
        SyntheticImageDataModule(num_val=0)


def test_token_batches_and_padding() -> None:
    dm = _setup(SyntheticTokenDataModule(vocab_size=40, max_len=24, min_len=5, batch_size=16))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 24) and x.dtype == torch.int64
    assert y.shape == (16,) and y.dtype == torch.int64
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        x = ds.tensors[0]
        pad = x == dm.pad_id
        assert not pad[:, 0].any()  # at least one real token
        assert torch.all(pad[:, 1:] >= pad[:, :-1])  # once padding starts, it continues to the end
        lengths = (~pad).sum(1)
        assert lengths.min() >= 5 and lengths.max() <= 24
        assert x.min() >= 0 and x.max() < dm.vocab_size
        assert not (x == 1).any()  # <unk> is reserved, never generated


def test_token_label_is_signalled_by_class_tokens() -> None:
    dm = _setup(SyntheticTokenDataModule(num_classes=4, num_class_tokens=2, num_signals=3))
    x, y = dm.train_dataset.tensors
    assert [list(dm.class_tokens(c)) for c in range(4)] == [[2, 3], [4, 5], [6, 7], [8, 9]]
    is_class_token = (x >= 2) & (x < 10)
    assert torch.all(is_class_token.sum(1) == 3)
    token_class = torch.where(is_class_token, (x - 2) // 2, -1)
    assert torch.all((token_class == y[:, None]) | (token_class == -1))
    assert np.bincount(y.numpy()).tolist() == [256, 256, 256, 256]


def test_token_deterministic() -> None:
    a = _setup(SyntheticTokenDataModule(seed=1))
    b = _setup(SyntheticTokenDataModule(seed=1))
    c = _setup(SyntheticTokenDataModule(seed=2))
    assert torch.equal(a.train_dataset.tensors[0], b.train_dataset.tensors[0])
    assert not torch.equal(a.train_dataset.tensors[0], c.train_dataset.tensors[0])


def test_token_bad_values() -> None:
    with pytest.raises(ValueError, match=r"vocab_size=10 must exceed 2 \+ num_classes \* num_class_tokens = 10"):
        SyntheticTokenDataModule(vocab_size=10, num_classes=4, num_class_tokens=2)
    with pytest.raises(ValueError, match=r"min_len=2 must lie in \[num_signals, max_len\] = \[3, 32\]"):
        SyntheticTokenDataModule(min_len=2)
    with pytest.raises(ValueError, match=r"min_len=40 must lie in"):
        SyntheticTokenDataModule(min_len=40)
