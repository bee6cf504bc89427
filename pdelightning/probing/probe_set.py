"""The fixed probe set: the same validation samples at every probe, for any number of processes.

A map-style dataset (``len`` and ``dataset[i]``) gives a seeded random subset of its samples. An iterable dataset
(``torch.utils.data.IterableDataset``, a stream with no ``len``) gives its first ``size`` samples, drawn once by
iterating it in the training process (bounded: an endless stream is read only that far) and kept, so every probe sees
the same samples however the stream shuffles. Under DDP each rank iterates its own copy of the dataset; probe
position ``i`` is the ``i``-th sample of the stream of the rank that owns position ``i`` (the positions are dealt to
ranks as for a map-style dataset), so a stream that shards itself by rank gives each rank samples of its own shard,
and one that does not gives the same probe set as a single process. The ranks agree on the size (the shortest
rank's stream bounds it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from pdelightning.probing.batch import batch_size as rows_of
from pdelightning.probing.batch import take_rows

#: Default number of probe samples, for every callback (one number; LayerMutualInformation's estimator bias at this
#: N is stated in its docstring).
DEFAULT_PROBE_SIZE = 256


class ProbeSet:
    """The probe samples of one rank, collated in batches on the CPU (inputs only, no activations).

    ``size`` samples are drawn once from ``dataset`` with a seeded permutation (the same on every rank and for every
    world size); position ``i`` of the probe set is the ``i``-th drawn sample in dataset order. A seeded random
    matching pairs the positions (:attr:`partner`; with an odd size one position has none): each is the other's
    partner for the shuffled null (a random other sample). :attr:`rank` orders the positions at random: a callback
    that measures only ``k`` samples takes those of rank ``< k`` (a random subset, the same on every rank). Pairs
    are dealt to ranks round-robin and batches are made of whole pairs (``batch_size`` is rounded up to even), so
    partners always share a batch, and a subset of an even number of lowest ranks holds whole pairs. The sample
    figures draw (:attr:`figure_position`, rank 0) is in the first pair, on process 0. A rank may get no sample
    at all (a probe set smaller than the world size): :attr:`stand_in` then holds a batch of probe sample 0 with an
    empty index, which the rank runs so that it takes part in every collective with zero rows.

    Args:
        dataset: the validation dataset (map-style or iterable, see the module docstring).
        collate_fn: its loader's collate function.
        size: number of probe samples (fewer if the dataset is smaller: said with a warning unless ``size`` is
            :data:`DEFAULT_PROBE_SIZE`, which adapts to a small validation set silently).
        batch_size: probe batch size.
        seed: seed of the draw.
        rank, world_size: this process's share.
        batched: the dataset yields whole batches (a loader with ``batch_size=None``): its items are split into
            samples, and probe batches are concatenated from them.
        agree: for an iterable dataset under DDP, the smallest of the ranks' sample counts given this rank's (every
            rank calls it once, after its draw; ``-1`` from any rank means one failed).
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Any,
        size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batched: bool = False,
        agree: Callable[[int], int] | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        drawn: list[Any] | None = None
        if is_iterable(dataset):
            drawn = draw_stream(dataset, size, collate_fn if batched else None, agree)
            self.chosen = torch.arange(len(drawn))
            collate_fn = concat if batched else collate_fn
        else:
            n = len(dataset)
            # a chosen size is said (once per probe set); the default adapts
            if size > n and size != DEFAULT_PROBE_SIZE:
                rank_zero_warn(f"probe_size={size} is more than the {n} validation samples: the probes use all {n}")
            self.chosen = torch.randperm(n, generator=g)[: min(size, n)].sort().values
        self.size = len(self.chosen)

        def sample(position: int) -> Any:
            return drawn[position] if drawn is not None else dataset[int(self.chosen[position])]

        order = torch.randperm(self.size, generator=g).tolist()
        # a random rank of every position: callbacks that measure only some samples take the lowest ranks
        self.rank = torch.empty(self.size, dtype=torch.long)
        self.rank[torch.tensor(order, dtype=torch.long)] = torch.arange(self.size)
        pairs = [order[i : i + 2] for i in range(0, self.size, 2)]
        self.partner = torch.full((self.size,), -1, dtype=torch.long)
        for pair in pairs:
            if len(pair) == 2:
                self.partner[pair[0]], self.partner[pair[1]] = pair[1], pair[0]
        mine = [p for pair in pairs[rank::world_size] for p in pair]
        batch_size = batch_size + batch_size % 2
        self.batches: list[tuple[Any, Tensor]] = []
        for start in range(0, len(mine), batch_size):
            pos = torch.tensor(mine[start : start + batch_size], dtype=torch.long)
            self.batches.append((collate_fn([sample(int(p)) for p in pos]), pos))
        self.figure_position = int(order[0]) if order else 0
        self.stand_in: tuple[Any, Tensor] | None = None
        if not self.batches and self.size:
            self.stand_in = (collate_fn([sample(0)]), torch.zeros(0, dtype=torch.long))

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        if self.stand_in is not None:
            return iter([self.stand_in])
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches) or int(self.stand_in is not None)


def partner_rows(index: Tensor, partner: Tensor | None) -> Tensor:
    """Row of each sample's shuffled-null partner in this batch (``partner[position]``), ``-1`` if it has none.

    Example::

        >>> partner_rows(torch.tensor([4, 5, 8]), torch.tensor([-1, -1, -1, -1, 5, 4, -1, -1, -1])).tolist()
        [1, 0, -1]
    """
    row_of = {int(p): i for i, p in enumerate(index.tolist())}
    if partner is None:
        return torch.full_like(index, -1)
    mates = partner[index.cpu()].tolist()
    return torch.tensor([row_of.get(int(m), -1) for m in mates], dtype=torch.long, device=index.device)


def is_iterable(dataset: Any) -> bool:
    """Whether ``dataset`` is a stream (an ``IterableDataset``, or iterable with no ``len``) rather than indexable."""
    if isinstance(dataset, IterableDataset):
        return True
    try:
        len(dataset)
    except TypeError:
        return hasattr(dataset, "__iter__")
    return False


def draw_stream(
    dataset: Any, size: int, unbatch: Callable[[Any], Any] | None = None, agree: Callable[[int], int] | None = None
) -> list[Any]:
    """The first ``size`` samples of an iterable dataset (fewer if it ends first), read once.

    Args:
        dataset: the stream.
        size: how many samples to keep (the stream is read no further).
        unbatch: when the stream yields whole batches, the collate function to apply to each before splitting it
            into one-sample batches.
        agree: see :class:`ProbeSet` (the count is cut to what every rank has).

    Raises:
        ValueError: when the stream (of any rank) yields nothing, or when its iteration failed on some rank.
    """
    samples: list[Any] = []
    failed: BaseException | None = None
    try:
        if unbatch is None:
            samples = list(itertools.islice(iter(dataset), size))
        else:
            for item in dataset:
                batch = unbatch(item)
                for i in range(rows_of(batch)):
                    samples.append(take_rows(batch, slice(i, i + 1)))
                    if len(samples) == size:
                        break
                if len(samples) == size:
                    break
    except Exception as err:  # every rank must still reach the agreement below
        failed = err
    count = -1 if failed is not None else len(samples)
    if agree is not None:
        count = agree(count)
    if count < 0:
        raise ValueError(f"drawing the probe set from the iterable dataset {type(dataset).__name__} failed") from failed
    if count == 0:
        raise ValueError(f"the iterable dataset {type(dataset).__name__} yielded no sample for the probe set")
    return samples[:count]


def concat(batches: list[Any]) -> Any:
    """One batch of one-sample batches (tensors concatenated along the batch axis; other values from the first).

    Example::

        >>> concat([{"x": torch.tensor([[1, 2]]), "n": 3}, {"x": torch.tensor([[3, 4]]), "n": 3}])["x"].tolist()
        [[1, 2], [3, 4]]
    """
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {k: concat([b[k] for b in batches]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat(list(col)) for col in zip(*batches, strict=True)))
    if isinstance(first, (tuple, list)):
        return type(first)(concat(list(col)) for col in zip(*batches, strict=True))
    return first


def probe_set_of(trainer: Any, loader: DataLoader, size: int, batch_size: int, seed: int) -> ProbeSet:
    """The probe set of this rank drawn from ``loader``'s dataset (its collate function; its batching)."""
    world = int(getattr(trainer, "world_size", 1) or 1)
    agree = None
    if world > 1 and is_iterable(loader.dataset):
        strategy = trainer.strategy

        def agree(count: int) -> int:  # the smallest count of all ranks (-1: one failed)
            t = torch.tensor([-float(count)], device=strategy.root_device)
            return -int(strategy.reduce(t, reduce_op="max").item())

    return ProbeSet(
        loader.dataset,
        loader.collate_fn,
        size,
        batch_size,
        seed,
        trainer.global_rank,
        world,
        batched=loader.batch_size is None,
        agree=agree,
    )
