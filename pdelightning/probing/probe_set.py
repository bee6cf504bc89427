"""The fixed probe set: the same validation samples at every probe, for any number of processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

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
        dataset: the validation dataset.
        collate_fn: its loader's collate function.
        size: number of probe samples (fewer if the dataset is smaller: said with a warning unless ``size`` is
            :data:`DEFAULT_PROBE_SIZE`, which adapts to a small validation set silently).
        batch_size: probe batch size.
        seed: seed of the draw.
        rank, world_size: this process's share.
    """

    def __init__(
        self, dataset: Any, collate_fn: Any, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        n = len(dataset)
        if size > n and size != DEFAULT_PROBE_SIZE:  # a chosen size is said (once per probe set); the default adapts
            rank_zero_warn(f"probe_size={size} is more than the {n} validation samples: the probes use all {n}")
        g = torch.Generator().manual_seed(seed)
        self.chosen = torch.randperm(n, generator=g)[: min(size, n)].sort().values
        self.size = len(self.chosen)
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
            self.batches.append((collate_fn([dataset[int(self.chosen[p])] for p in pos]), pos))
        self.figure_position = int(order[0]) if order else 0
        self.stand_in: tuple[Any, Tensor] | None = None
        if not self.batches and self.size:
            self.stand_in = (collate_fn([dataset[int(self.chosen[0])]]), torch.zeros(0, dtype=torch.long))

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
