"""scikit-learn's bundled 8x8 handwritten digits: no download, loads in milliseconds (the quickstart default)."""

from __future__ import annotations

from torch.utils.data import Dataset
from typing_extensions import override

from pdelightning.data.base import ClassificationDataModule, check_fraction, image_dataset, stratified_split

DIGITS_MEAN = 0.3053
"""Mean pixel of all 1797 digits after dividing by 16."""
DIGITS_STD = 0.3760
"""Pixel standard deviation of all 1797 digits after dividing by 16."""


class DigitsDataModule(ClassificationDataModule):
    """The 1797 8x8 digit images of ``sklearn.datasets.load_digits``, in 10 classes.

    Pixels (0..16) are divided by 16, then normalised with ``DIGITS_MEAN`` = 0.3053 and ``DIGITS_STD`` =
    0.3760 (mean and std over all images). Batches: ``x`` float32 ``[B, 8, 8]``, ``y`` int64 ``[B]``.

    The images are split three ways, stratified by label and deterministic given ``seed``: first
    ``ceil(test_fraction * 1797)`` images go to test, then ``ceil(val_fraction * rest)`` of the rest to
    validation. With the defaults that is 1293 train, 144 val and 360 test images.

    Args:
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_fraction: share of the non-test images held out for validation, in (0, 1).
        test_fraction: share of all images held out for testing, in (0, 1).
        seed: seed of the splits.

    Raises:
        ValueError: on a non-positive ``batch_size``, a negative ``num_workers``, or a fraction outside (0, 1).

    Example::

        dm = DigitsDataModule(batch_size=32)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [32, 8, 8] float32, y: [32] int64
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        self.num_classes = 10
        self.input_kind = "image"
        self.image_size = 8
        self.save_hyperparameters()

    @override
    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits  # lazy: keeps `import pdelightning.data` fast

        digits = load_digits()
        images, labels = digits.images, digits.target
        rest, test = stratified_split(labels, self.test_fraction, self.seed)
        train, val = stratified_split(labels[rest], self.val_fraction, self.seed)
        train, val = rest[train], rest[val]

        train_ds, val_ds, test_ds = (
            image_dataset(images[idx], labels[idx], 16.0, DIGITS_MEAN, DIGITS_STD) for idx in (train, val, test)
        )
        return train_ds, val_ds, test_ds
