"""Data modules: ``(x, y)`` classification batches plus the attributes a model is built from.

Every module exposes ``num_classes``, ``input_kind``, ``image_size``, ``vocab_size``, ``max_len`` and
``pad_id`` right after ``__init__``, for LightningCLI's ``link_arguments(..., apply_on="instantiate")``.
"""

from pdelightning.data.base import ClassificationDataModule
from pdelightning.data.digits import DigitsDataModule
from pdelightning.data.mnist import MNISTDataModule
from pdelightning.data.newsgroups import NewsgroupsDataModule
from pdelightning.data.synthetic import SyntheticImageDataModule, SyntheticTokenDataModule

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "NewsgroupsDataModule",
    "SyntheticImageDataModule",
    "SyntheticTokenDataModule",
]
