"""ResumableDataLoader: DataLoader(shuffle=True)'s orders, resumable mid-epoch without touching the global RNG."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.data import DigitsDataModule
from pdelightning.data.base import ResumableDataLoader, ResumableRandomSampler

DATA = TensorDataset(torch.arange(23))


def _epochs(loader: DataLoader, n: int) -> list[list[int]]:
    return [[int(v) for (b,) in loader for v in b] for _ in range(n)]


def test_same_orders_as_torch_shuffle() -> None:
    torch.manual_seed(5)
    expected = _epochs(DataLoader(DATA, batch_size=4, shuffle=True), 3)
    after_expected = torch.rand(1)
    torch.manual_seed(5)
    got = _epochs(ResumableDataLoader(DATA, batch_size=4, shuffle=True), 3)
    assert got == expected and torch.equal(torch.rand(1), after_expected)  # same draws from the global RNG
    assert sorted(got[0]) == list(range(23)) and got[0] != got[1]


def test_resume_mid_epoch_replays_the_rest_without_touching_the_rng() -> None:
    torch.manual_seed(1)
    full = ResumableDataLoader(DATA, batch_size=4, shuffle=True)
    it = iter(full)
    first = [next(it) for _ in range(2)]
    state = full.state_dict()
    rng = torch.get_rng_state()
    rest = [b for (b,) in it]
    next_epoch = _epochs(full, 1)[0]

    torch.set_rng_state(rng)  # the resumed process: RNG restored from the checkpoint, a fresh loader
    resumed = ResumableDataLoader(DATA, batch_size=4, shuffle=True)
    resumed.load_state_dict(state)
    got = [b for (b,) in resumed]
    assert state["batches"] == 2 and len(first) == 2
    assert [b.tolist() for b in got] == [b.tolist() for b in rest]
    assert _epochs(resumed, 1)[0] == next_epoch  # the RNG was left where the uninterrupted run had it


def test_state_at_the_end_of_an_epoch_starts_a_fresh_one() -> None:
    torch.manual_seed(2)
    loader = ResumableDataLoader(DATA, batch_size=4, shuffle=True)
    _epochs(loader, 1)
    state, rng = loader.state_dict(), torch.get_rng_state()
    expected = _epochs(loader, 1)[0]
    torch.set_rng_state(rng)
    resumed = ResumableDataLoader(DATA, batch_size=4, shuffle=True)
    resumed.load_state_dict(state)
    assert state["batches"] == 6 and _epochs(resumed, 1)[0] == expected


def test_train_loader_of_the_data_modules_is_resumable() -> None:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)
    assert isinstance(dm.train_dataloader().sampler, ResumableRandomSampler)
    assert type(dm.val_dataloader()) is DataLoader  # evaluation loaders stay plain and ordered


def test_resume_mid_epoch_with_a_distributed_sampler_continues_each_ranks_order() -> None:
    """Under DDP Lightning gives the loader a ``DistributedSampler``: a resumed epoch drops the batches each rank
    already handed out and goes on from the next one of that rank's order, leaving the random states alone. Lightning
    creates the iterator before it sets the sampler's epoch (``fit_loop.setup_data`` then ``on_advance_start``), so
    the resumed loader is driven in that order, in epoch 1 (epoch 0's order differs)."""
    import random

    import numpy as np
    from torch.utils.data import DistributedSampler

    def loader(rank: int, epoch: int | None = None) -> ResumableDataLoader:
        sampler = DistributedSampler(DATA, num_replicas=2, rank=rank, shuffle=True, seed=3)
        if epoch is not None:
            sampler.set_epoch(epoch)
        return ResumableDataLoader(DATA, batch_size=3, sampler=sampler)

    def rng() -> tuple[float, float, float]:
        return float(torch.rand(1)), float(np.random.rand()), random.random()

    for rank in (0, 1):
        full = [[int(v) for v in b] for (b,) in loader(rank, epoch=1)]  # 12 of 23 samples (one repeated): 4 batches
        assert len(full) == 4 and full != [[int(v) for v in b] for (b,) in loader(rank, epoch=0)]
        interrupted = loader(rank, epoch=1)
        it = iter(interrupted)
        next(it), next(it)
        state = interrupted.state_dict()
        assert state == {"seed": None, "batches": 2}
        resumed = loader(rank)  # a fresh sampler (epoch 0), as a restarted process builds it
        resumed.load_state_dict(state)
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        before = rng()
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        it = iter(resumed)
        resumed.sampler.set_epoch(1)  # type: ignore[attr-defined]
        rest = [[int(v) for v in b] for (b,) in it]
        assert rest == full[2:] and rng() == before
        assert resumed.state_dict()["batches"] == 4


def test_a_checkpoint_from_a_longer_epoch_starts_a_new_epoch_and_says_so() -> None:
    import pytest

    loader = ResumableDataLoader(DATA, batch_size=4, shuffle=True)  # 6 batches
    loader.load_state_dict({"seed": 1, "batches": 9})
    with pytest.warns(UserWarning, match="had handed out 9 batches but this train loader has 6"):
        got = [int(v) for (b,) in loader for v in b]
    assert sorted(got) == list(range(23))
