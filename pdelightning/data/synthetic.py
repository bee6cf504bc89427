"""Small synthetic data sets, generated in memory, deterministic given a seed: stand-ins for tests and demos.

Each split comes from its own random stream (``numpy.random.default_rng([seed, k])``), so changing the
size of one split does not change the others.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from pdelightning.data.base import PAD_ID, ClassificationDataModule, check_positive_int, image_dataset

SYNTHETIC_MEAN = 0.5
"""Images are normalised as ``(x - 0.5) / 0.5``, so values lie in [-1, 1]."""
SYNTHETIC_STD = 0.5
FIRST_CLASS_TOKEN = 2
"""Ids 0 (``<pad>``) and 1 (``<unk>``, never used here) are reserved; class tokens start at 2."""


def _check_nonnegative_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative number")
    return float(value)


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` labels with class counts differing by at most one, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


class SyntheticImageDataModule(ClassificationDataModule):
    """Square grayscale images: class ``c`` is a fixed random template plus Gaussian pixel noise.

    The ``num_classes`` templates have pixels uniform in [0, 1]; an image is its class template plus
    ``noise * N(0, 1)`` per pixel, clipped to [0, 1], then normalised with mean 0.5 and std 0.5 (values in
    [-1, 1]). With the defaults the nearest template is the right class for essentially every image, so a
    small model learns it to > 90 % within an epoch or two. Classes are balanced (counts differ by at most 1).
    Batches: ``x`` float32 ``[B, image_size, image_size]``, ``y`` int64 ``[B]``.

    Args:
        image_size: side of the images.
        num_classes: number of classes (templates), at least 2.
        num_train: training images.
        num_val: validation images.
        num_test: test images.
        noise: standard deviation of the pixel noise, before clipping.
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the templates and the samples.

    Raises:
        ValueError: on a non-positive size, fewer than 2 classes, or negative ``noise``.

    Example::

        dm = SyntheticImageDataModule(image_size=8, num_classes=4)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [64, 8, 8] float32, y: [64] int64
    """

    def __init__(
        self,
        image_size: int = 8,
        num_classes: int = 4,
        num_train: int = 1024,
        num_val: int = 256,
        num_test: int = 256,
        noise: float = 0.5,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.image_size = check_positive_int("image_size", image_size)
        if check_positive_int("num_classes", num_classes) < 2:
            raise ValueError(f"num_classes={num_classes} must be at least 2")
        self.num_classes = num_classes
        self.sizes = {
            "train": check_positive_int("num_train", num_train),
            "val": check_positive_int("num_val", num_val),
            "test": check_positive_int("num_test", num_test),
        }
        self.noise = _check_nonnegative_float("noise", noise)
        self.input_kind = "image"
        self.save_hyperparameters()

    def templates(self) -> np.ndarray:
        """The class templates, float ``[num_classes, image_size, image_size]`` in [0, 1]."""
        rng = np.random.default_rng([self.seed, 0])
        return rng.random((self.num_classes, self.image_size, self.image_size))

    def _split(self, k: int, n: int, templates: np.ndarray) -> TensorDataset:
        rng = np.random.default_rng([self.seed, k])
        y = _balanced_labels(rng, n, self.num_classes)
        x = np.clip(templates[y] + self.noise * rng.standard_normal((n, self.image_size, self.image_size)), 0.0, 1.0)
        return image_dataset(x, y, 1.0, SYNTHETIC_MEAN, SYNTHETIC_STD)

    @override
    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        t = self.templates()
        return (
            self._split(1, self.sizes["train"], t),
            self._split(2, self.sizes["val"], t),
            self._split(3, self.sizes["test"], t),
        )


class SyntheticTokenDataModule(ClassificationDataModule):
    """Variable-length token sequences whose class is signalled by class-specific tokens among random ones.

    Ids: 0 is ``<pad>``, 1 is ``<unk>`` (reserved, unused), class ``c`` owns the ``num_class_tokens`` ids
    starting at ``2 + c * num_class_tokens``, and all higher ids up to ``vocab_size - 1`` are filler. A
    sequence of class ``c`` has a length uniform in ``[min_len, max_len]``, is filled with random filler
    ids, and has ``num_signals`` of its positions (distinct, at random) overwritten with random tokens of
    class ``c``. It is padded with 0 at the end to ``max_len``. So the label is exactly the class whose
    tokens occur, at any position. Classes are balanced (counts differ by at most 1).
    Batches: ``x`` int64 ``[B, max_len]``, ``y`` int64 ``[B]``.

    Args:
        vocab_size: number of ids (embedding size), at least ``2 + num_classes * num_class_tokens + 1``.
        max_len: longest sequence and padded length.
        min_len: shortest sequence, at least ``num_signals``.
        num_classes: number of classes, at least 2.
        num_class_tokens: ids reserved for each class.
        num_signals: class tokens placed in each sequence.
        num_train: training sequences.
        num_val: validation sequences.
        num_test: test sequences.
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the samples.

    Raises:
        ValueError: on a non-positive size, fewer than 2 classes, ``min_len`` outside
            ``[num_signals, max_len]``, or a ``vocab_size`` too small to hold the class and filler ids.

    Example::

        dm = SyntheticTokenDataModule(vocab_size=64, max_len=32, num_classes=4)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [64, 32] int64, y: [64] int64
        padding_mask = x == dm.pad_id
    """

    def __init__(
        self,
        vocab_size: int = 64,
        max_len: int = 32,
        min_len: int = 8,
        num_classes: int = 4,
        num_class_tokens: int = 2,
        num_signals: int = 3,
        num_train: int = 1024,
        num_val: int = 256,
        num_test: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if check_positive_int("num_classes", num_classes) < 2:
            raise ValueError(f"num_classes={num_classes} must be at least 2")
        self.num_classes = num_classes
        self.num_class_tokens = check_positive_int("num_class_tokens", num_class_tokens)
        self.num_signals = check_positive_int("num_signals", num_signals)
        self.max_len = check_positive_int("max_len", max_len)
        self.min_len = check_positive_int("min_len", min_len)
        if not self.num_signals <= self.min_len <= self.max_len:
            raise ValueError(f"min_len={min_len} must lie in [num_signals, max_len] = [{num_signals}, {max_len}]")
        self.first_filler = FIRST_CLASS_TOKEN + num_classes * num_class_tokens
        if check_positive_int("vocab_size", vocab_size) <= self.first_filler:
            raise ValueError(
                f"vocab_size={vocab_size} must exceed 2 + num_classes * num_class_tokens = {self.first_filler} "
                f"(room for <pad>, <unk>, the class tokens and at least one filler id)"
            )
        self.vocab_size = vocab_size
        self.sizes = {
            "train": check_positive_int("num_train", num_train),
            "val": check_positive_int("num_val", num_val),
            "test": check_positive_int("num_test", num_test),
        }
        self.input_kind = "tokens"
        self.save_hyperparameters()

    def class_tokens(self, c: int) -> range:
        """The ids that signal class ``c``."""
        start = FIRST_CLASS_TOKEN + c * self.num_class_tokens
        return range(start, start + self.num_class_tokens)

    def _split(self, k: int, n: int) -> TensorDataset:
        rng = np.random.default_rng([self.seed, k])
        y = _balanced_labels(rng, n, self.num_classes)
        lengths = rng.integers(self.min_len, self.max_len + 1, size=n)
        x = np.full((n, self.max_len), PAD_ID, dtype=np.int64)
        for i in range(n):
            length = lengths[i]
            x[i, :length] = rng.integers(self.first_filler, self.vocab_size, size=length)
            pos = rng.choice(length, size=self.num_signals, replace=False)
            x[i, pos] = (
                FIRST_CLASS_TOKEN
                + y[i] * self.num_class_tokens
                + rng.integers(0, self.num_class_tokens, size=self.num_signals)
            )
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    @override
    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        return (
            self._split(1, self.sizes["train"]),
            self._split(2, self.sizes["val"]),
            self._split(3, self.sizes["test"]),
        )
