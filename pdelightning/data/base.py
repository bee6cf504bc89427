"""The base class of every data module here, and the small helpers they share.

Every module yields ``(x, y)`` batches and describes its data through attributes that exist right after
``__init__`` (before any file is read), so that LightningCLI can link them into the model with
``link_arguments(..., apply_on="instantiate")``:

- ``num_classes``: number of labels; ``y`` is int64 in ``[0, num_classes)``.
- ``input_kind``: ``"image"`` (``x`` is float32 ``[B, H, W]``, scaled to [0, 1] then normalised) or
  ``"tokens"`` (``x`` is int64 ``[B, max_len]``, padded with ``pad_id = 0`` at the end).
- ``image_size``: side of the square images (0 for tokens).
- ``vocab_size``: number of token ids, i.e. the embedding size, specials included (0 for images).
- ``max_len``: token sequence length (0 for images: the model decides how images become tokens).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
from typing_extensions import override

from pdelightning._checks import InputKind, check_choice  # noqa: F401 (check_choice: re-exported for the data modules)
from pdelightning.utils import rng_states, set_rng_states

PAD_ID = 0
UNK_ID = 1


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (>= 1)")
    return value


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """Like :func:`check_positive_int`, but ``None`` is allowed (meaning "no limit")."""
    return None if value is None else check_positive_int(name, value)


def check_fraction(name: str, value: Any) -> float:
    """Return ``value`` if it lies strictly between 0 and 1, else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} must be a number strictly between 0 and 1")
    return float(value)


def split_sizes(n: int, fraction: float) -> tuple[int, int]:
    """Sizes ``(n - k, k)`` of a split that holds out ``k = ceil(fraction * n)`` of ``n`` items.

    This is scikit-learn's ``train_test_split`` rule for a float ``test_size``.
    """
    k = math.ceil(fraction * n)
    return n - k, k


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into ``(keep, held_out)`` index arrays, deterministic given ``seed``.

    ``held_out`` has ``ceil(fraction * n)`` items (:func:`split_sizes`). The split is stratified by label
    (scikit-learn's ``train_test_split``) when every class has at least 2 members and the held-out part is
    at least as large as the number of classes, and a plain seeded random split otherwise. Both index
    arrays are sorted, so the data keep their original order.

    Raises:
        ValueError: if either part would be empty.
    """
    n = len(labels)
    n_keep, n_out = split_sizes(n, fraction)
    if n_keep < 1 or n_out < 1:
        raise ValueError(f"cannot split {n} examples with fraction {fraction}: one part would be empty")
    from sklearn.model_selection import train_test_split  # lazy: keeps `import pdelightning.data` fast

    counts = np.bincount(labels) if n else np.zeros(0, dtype=np.int64)
    present = counts[counts > 0]
    n_classes = len(present)
    stratify = labels if present.min() >= 2 and n_classes <= min(n_out, n_keep) else None
    keep, out = train_test_split(np.arange(n), test_size=n_out, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(out)


def random_subset(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``min(size, n)`` items of ``range(n)``, drawn at random (all of them if ``size`` is None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def pad_sequences(seqs: Sequence[Sequence[int]], max_len: int, pad_id: int = PAD_ID) -> Tensor:
    """Stack token id lists into an int64 ``[N, max_len]`` tensor: truncated to ``max_len``, padded at the end.

    An empty sequence becomes the single ``<unk>`` id, so every row holds at least one non-pad token.
    """
    out = np.full((len(seqs), max_len), pad_id, dtype=np.int64)
    for i, seq in enumerate(seqs):
        ids = list(seq[:max_len]) or [UNK_ID]
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


class ResumableRandomSampler(RandomSampler):
    """``RandomSampler`` (same orders: a per-epoch seed drawn from torch's global RNG) that can replay an epoch.

    After :meth:`resume_at` ``(seed, skip)``, the next iteration uses that seed without touching the global RNG
    and starts after the first ``skip`` indices.
    """

    def __init__(self, data_source: Sized) -> None:
        super().__init__(data_source)  # type: ignore[arg-type]
        self.seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def resume_at(self, seed: int, skip: int) -> None:
        """Make the next epoch replay the one of ``seed``, from index ``skip`` on."""
        self._resume = (int(seed), int(skip))

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if self._resume is not None:
            seed, skip = self._resume
            self._resume = None
        else:
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(n, generator=generator).tolist()[skip:]


class ResumableDataLoader(DataLoader):
    """A shuffling ``DataLoader`` that Lightning can stop and resume mid-epoch (it is ``_Stateful``).

    Without it, a run resumed from a mid-epoch checkpoint reshuffles the rest of that epoch. Here
    :meth:`state_dict` holds the epoch's shuffling seed and the number of batches handed out, and after
    :meth:`load_state_dict` the next iteration replays the same order from the next batch, leaving torch's
    global RNG as the uninterrupted run had it. Orders are the ones ``DataLoader(shuffle=True)`` gives.
    With another sampler whose order is fixed for the epoch (Lightning's ``DistributedSampler`` under DDP, a
    sequential one) a resumed epoch loads and drops the batches already trained on and goes on from the next one.
    """

    def __init__(self, dataset: Dataset, *args: Any, shuffle: bool | None = None, **kwargs: Any) -> None:
        if shuffle and kwargs.get("sampler") is None and kwargs.get("batch_sampler") is None:
            kwargs["sampler"] = ResumableRandomSampler(dataset)  # type: ignore[arg-type]
            shuffle = None
        super().__init__(dataset, *args, shuffle=shuffle, **kwargs)
        self._batches = 0
        self._pending: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler if isinstance(self.sampler, ResumableRandomSampler) else None
        pending, self._pending = self._pending, None
        batches = pending["batches"] if pending is not None else 0
        seed = pending.get("seed") if pending is not None else None
        n_batches = self._length()
        if batches and n_batches is not None and batches > n_batches:
            warnings.warn(
                f"the checkpoint's epoch had handed out {batches} batches but this train loader has {n_batches} "
                "(another batch size or number of processes?): the resumed run starts a new epoch",
                stacklevel=2,
            )
        inside = pending is not None and 0 <= batches < (n_batches if n_batches is not None else math.inf)
        if inside and sampler is not None and seed is not None:
            sampler.resume_at(seed, batches * (self.batch_size or 1))
            if batches:
                states = rng_states()  # the iterator draws a worker base seed the interrupted epoch had drawn
                iterator = super().__iter__()
                set_rng_states(states)
            else:
                iterator = super().__iter__()
            self._batches = batches
            return self._count(iterator)
        if inside and batches > 0:  # another sampler: drop what the interrupted epoch handed out
            self._batches = batches
            return self._count(self._after(batches))
        self._batches = 0
        return self._count(super().__iter__())

    def _length(self) -> int | None:
        try:
            return len(self)
        except TypeError:  # an iterable dataset without a length
            return None

    def _after(self, skip: int) -> Iterator[Any]:
        """The epoch's batches after its first ``skip``, for a sampler other than :class:`ResumableRandomSampler` whose
        order is fixed for the epoch (Lightning's ``DistributedSampler`` under DDP, a sequential one).

        Nothing happens until the first batch is asked for: Lightning creates the iterator before it sets the
        sampler's epoch (``set_epoch``), so the order is read only then. The first ``skip`` batches are loaded and
        dropped (so each rank goes on from the next batch of its own order), and the random states (torch, numpy,
        Python) are put back as they were before: the iterator's worker base seed and whatever loading those batches
        drew had been drawn by the interrupted epoch before its checkpoint.
        """
        states = rng_states()
        iterator = super().__iter__()
        for _ in itertools.islice(iterator, skip):
            pass
        set_rng_states(states)
        yield from iterator

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """``{"seed": this epoch's shuffling seed (or None), "batches": batches handed out so far}``."""
        seed = self.sampler.seed if isinstance(self.sampler, ResumableRandomSampler) else None
        return {"seed": seed, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the epoch of ``state_dict`` at the next iteration."""
        self._pending = {"seed": state_dict.get("seed"), "batches": int(state_dict.get("batches", 0))}


class ClassificationDataModule(L.LightningDataModule):
    """Base class: ``(x, y)`` classification batches plus the attributes a model needs to be built.

    Subclasses set the class attributes below in ``__init__`` (so they are valid before ``setup``) and
    implement :meth:`_build_datasets`, which ``setup`` calls once. The ``predict`` loader serves the test set.

    Args:
        batch_size: examples per batch, for every loader.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process). With workers, they are
            kept alive between epochs (``persistent_workers``); memory is pinned only when CUDA is available.
        seed: seed for everything random in the data (splits, subsets, synthetic samples).

    Raises:
        ValueError: if ``batch_size`` is not a positive integer or ``num_workers`` is negative.

    Attributes:
        num_classes: number of labels.
        input_kind: ``"image"`` or ``"tokens"``.
        image_size: side of the square images (0 for tokens).
        vocab_size: embedding size including the specials ``<pad>`` = 0 and ``<unk>`` = 1 (0 for images).
        max_len: token sequence length (0 for images).
        pad_id: the padding id (0); padding sits at the end, the model derives the mask ``x == pad_id``.
    """

    num_classes: int
    input_kind: InputKind
    image_size: int = 0
    vocab_size: int = 0
    max_len: int = 0
    pad_id: int = PAD_ID

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be a non-negative integer")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Load or generate the data and return the ``(train, val, test)`` datasets."""
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        """Build the three datasets on first call (every stage gets all of them; they are small)."""
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset, self.test_dataset = self._build_datasets()

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a dataloader")
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the order follows the global seed, see ``seed_everything``).

        The loader is a :class:`ResumableDataLoader`, so a run resumed from a mid-epoch checkpoint continues
        the interrupted epoch in the same order.
        """
        return self._loader(self.train_dataset, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches, in a fixed order."""
        return self._loader(self.val_dataset, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches, in a fixed order."""
        return self._loader(self.test_dataset, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test batches again (``(x, y)`` tuples), for ``trainer.predict``."""
        return self._loader(self.test_dataset, shuffle=False)


def image_dataset(
    images: Tensor | np.ndarray, labels: Tensor | np.ndarray, scale: float, mean: float, std: float
) -> TensorDataset:
    """A ``TensorDataset`` of float32 images ``(images / scale - mean) / std`` and int64 labels."""
    x = torch.as_tensor(images).to(torch.float32, copy=True).div_(scale).sub_(mean).div_(std)
    y = torch.as_tensor(labels).to(torch.long)
    return TensorDataset(x, y)
