"""Iterable data (a stream with no ``len``): the probe set is the stream's first samples, drawn once, bounded."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from pdelightning.probing.hub import ProbeHub
from pdelightning.probing.probe_set import ProbeSet, concat, draw_stream
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import StockEncoderModule


class Stream(IterableDataset):
    """Samples ``(x_i, i % 4)`` with ``x_i`` a seeded 8x8 image and ``i`` its place in the stream; ``shuffle`` gives a
    new order at every pass (as a streaming pipeline with a shuffle buffer does), ``n=None`` never ends.
    """

    def __init__(self, n: int | None = 40, shuffle: bool = False, batch: int | None = None) -> None:
        self.n, self.shuffle, self.batch, self.passes = n, shuffle, batch, 0
        g = torch.Generator().manual_seed(0)
        self.templates = torch.rand(4, 8, 8, generator=g)

    def sample(self, i: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1000 + i)
        return self.templates[i % 4] + 0.3 * torch.randn(8, 8, generator=g), torch.tensor(i % 4)

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        order: Any = itertools.count() if self.n is None else range(self.n)
        if self.shuffle and self.n is not None:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.passes)).tolist()
        samples = (self.sample(i) for i in order)
        if self.batch is None:
            yield from samples
            return
        while chunk := list(itertools.islice(samples, self.batch)):
            yield default_collate(chunk)


def _rows(probe: ProbeSet) -> dict[int, Tensor]:
    """``{position: x}`` of every sample of a probe set."""
    return {int(p): x for (x, _y), index in probe for p, x in zip(index, x, strict=True)}


def test_the_probe_set_is_the_streams_first_samples_drawn_once() -> None:
    stream = Stream(shuffle=True)
    first = list(itertools.islice(iter(Stream(shuffle=True)), 10))  # the order of the first pass
    probe = ProbeSet(stream, default_collate, size=10, batch_size=4, seed=0)
    assert probe.size == 10 and stream.passes == 1
    rows = _rows(probe)
    assert sorted(rows) == list(range(10))
    for p, x in rows.items():
        torch.testing.assert_close(x, first[p][0])
    # the same samples at every probe, although every pass over the stream has another order
    again = _rows(probe)
    assert stream.passes == 1 and all(torch.equal(again[p], rows[p]) for p in rows)
    # partners share a batch (the shuffled null needs them side by side)
    for _, index in probe:
        mates = probe.partner[index]
        assert all(int(m) in index.tolist() for m in mates if m >= 0)


def test_an_endless_stream_is_read_only_as_far_as_the_probe_size() -> None:
    probe = ProbeSet(Stream(n=None), default_collate, size=12, batch_size=4, seed=0)
    assert probe.size == 12
    assert sorted(_rows(probe)) == list(range(12))


def test_a_short_stream_gives_what_it_has_and_an_empty_one_says_so() -> None:
    assert ProbeSet(Stream(n=5), default_collate, size=256, batch_size=4, seed=0).size == 5
    with pytest.raises(ValueError, match="Stream yielded no sample"):
        ProbeSet(Stream(n=0), default_collate, size=8, batch_size=4, seed=0)


def test_a_stream_of_whole_batches_is_split_into_samples() -> None:
    """``DataLoader(stream, batch_size=None)``: the stream yields batches of 4; the probe set takes 10 samples."""
    stream = Stream(batch=4)
    loader = DataLoader(stream, batch_size=None)
    probe = ProbeSet(stream, loader.collate_fn, size=10, batch_size=4, seed=0, batched=True)
    rows = _rows(probe)
    assert sorted(rows) == list(range(10))
    for p, x in rows.items():
        torch.testing.assert_close(x, stream.sample(p)[0])
    for (_x, y), index in probe:
        assert y.tolist() == [int(p) % 4 for p in index]


def test_concat_joins_one_sample_batches() -> None:
    parts = [(torch.tensor([[i, i]]), {"m": torch.tensor([i])}) for i in range(3)]
    x, d = concat(parts)
    assert x.tolist() == [[0, 0], [1, 1], [2, 2]] and d["m"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_out_the_positions_each_from_its_own_stream(world_size: int) -> None:
    """Each rank iterates its own copy; together the ranks hold every position once, in pairs."""
    probes = [ProbeSet(Stream(), default_collate, 11, 4, 0, rank=r, world_size=world_size) for r in range(world_size)]
    held = [set(_rows(p)) for p in probes]
    assert sorted(p for h in held for p in h) == list(range(11))  # disjoint, complete
    for probe, mine in zip(probes, held, strict=True):
        for p in mine:
            torch.testing.assert_close(_rows(probe)[p], Stream().sample(p)[0])
        mates = {int(probe.partner[p]) for p in mine} - {-1}
        assert mates <= mine
    assert all(torch.equal(p.partner, probes[0].partner) for p in probes)


def test_ranks_agree_on_the_size_of_the_shortest_stream() -> None:
    counts: list[int] = []

    def agree(count: int) -> int:  # what the strategy's reduction gives when the other rank's stream has 7 samples
        counts.append(count)
        return min(count, 7)

    probe = ProbeSet(Stream(n=40), default_collate, 16, 4, 0, rank=0, world_size=2, agree=agree)
    assert counts == [16] and probe.size == 7

    def broken() -> Iterator[Any]:
        yield Stream().sample(0)
        raise OSError("shard unreadable")

    class Broken(IterableDataset):
        def __iter__(self) -> Iterator[Any]:
            return broken()

    seen: list[int] = []
    with pytest.raises(ValueError, match="Broken failed"):
        draw_stream(Broken(), 8, agree=lambda c: seen.append(c) or c)
    assert seen == [-1]  # a failing rank still takes part in the agreement, with -1


def _fit(train: DataLoader, val: DataLoader | None, monkeypatch: pytest.MonkeyPatch) -> tuple[L.Trainer, Any, list]:
    monkeypatch.setenv("PDELIGHTNING_CALLBACKS", "all")
    torch.manual_seed(0)
    module = StockEncoderModule()
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            max_steps=3, logger=logger, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=2,
        )  # fmt: skip
        trainer.fit(module, train, val)
    return trainer, logger, [str(w.message) for w in caught]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _own_clean_loss(trainer: L.Trainer, samples: list[tuple[Tensor, Tensor]]) -> float:
    """The model's own mean loss on ``samples``: what ``loss_clean`` must equal."""
    module = trainer.lightning_module.eval()
    x, y = default_collate(samples)
    with torch.no_grad():
        return float(F.cross_entropy(module(x), y))


def test_an_iterable_validation_stream_trains_to_the_end_with_every_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    val = Stream(n=40, shuffle=True)
    trainer, logger, messages = _fit(DataLoader(Stream(n=64), batch_size=8), DataLoader(val, batch_size=8), monkeypatch)
    assert trainer.global_step == 3
    assert not [m for m in messages if "switched off" in m], messages
    for key in ("attention_similarity/cosine", "layer_mutual_information/I_TY", "pde_fit/detail/r2",
                "stability_monitor/W_O_spectral", "information_flow/consecutive_corr",
                "jacobian_stability/spectral_norm", "attention_rollout/entropy"):  # fmt: skip
        assert f"analysis/{key}/encoder.layers.0" in logger.keys(), key  # noqa: SIM118
    perturbation = next(c for c in trainer.callbacks if type(c).__name__ == "PerturbationEval")
    probe = ProbeHub.of(trainer).probe_set(trainer, perturbation)
    assert probe.size == 40  # the whole (short) stream: probe_size 256 bounds an endless one
    # the probe set is the first pass of the stream (the same one at every probe), the clean loss the model's own
    first = list(iter(Stream(n=40, shuffle=True)))
    assert all(torch.equal(x, first[p][0]) for p, x in _rows(probe).items())
    clean = logger.series("analysis/perturbation_eval/loss_clean")
    assert len(clean) >= 2
    assert clean[-1][1] == pytest.approx(_own_clean_loss(trainer, first), rel=1e-5)


def test_iterable_training_data_and_no_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, logger, messages = _fit(DataLoader(Stream(n=None), batch_size=8), None, monkeypatch)
    assert trainer.global_step == 3
    assert any("probe set is drawn from the training data" in m for m in messages)
    assert not [m for m in messages if "switched off" in m], messages
    perturbation = next(c for c in trainer.callbacks if type(c).__name__ == "PerturbationEval")
    probe = ProbeHub.of(trainer).probe_set(trainer, perturbation)
    assert probe.size == perturbation.probe_size  # bounded
    # the curves are measured on a random subset of max_samples probe positions (the lowest ranks)
    first = [Stream().sample(p) for p in range(probe.size) if probe.rank[p] < perturbation.max_samples]
    assert len(first) == perturbation.max_samples < probe.size
    clean = logger.series("analysis/perturbation_eval/loss_clean")
    assert clean[-1][1] == pytest.approx(_own_clean_loss(trainer, first), rel=1e-5)


_DDP_SCRIPT = """
import json, sys
import lightning.pytorch as L, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from pdelightning.callbacks import InformationFlow, PerturbationEval, StabilityMonitor
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import StockEncoderModule
from tests.probing.test_iterable_data import Stream

class RankShard(Stream):
    # each rank streams its own shard (samples rank, rank + 2, ...): rank 0 has 20 samples, rank 1 only 9
    def __iter__(self):
        rank = dist.get_rank() if dist.is_initialized() else 0
        yield from (self.sample(i) for i in range(rank, 2 * (20 if rank == 0 else 9), 2))

kw = dict(budget=None, every_n_steps=2, probe_size=16, probe_batch_size=4)
torch.manual_seed(0)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=MemoryLogger(),
                    callbacks=[InformationFlow(**kw), PerturbationEval(**kw), StabilityMonitor(**kw)],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=1)
trainer.fit(StockEncoderModule(), torch.utils.data.DataLoader(Stream(n=64), batch_size=8),
            torch.utils.data.DataLoader(RankShard(), batch_size=4))
probe = ProbeHub.of(trainer).probe_set(trainer, trainer.callbacks[0])
held = {{int(p): x.tolist() for (x, _), index in probe for p, x in zip(index, x)}}
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"size": probe.size, "held": held, "steps": trainer.global_step}}, f)
"""


@pytest.mark.ddp
@pytest.mark.slow  # two processes: ~15-50 s on a busy machine
def test_ddp_ranks_draw_from_their_own_streams_and_agree_on_the_size(tmp_path: Any) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT.format(root=str(root), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PDELIGHTNING_CALLBACKS", None)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [4, 4]
    assert [r["size"] for r in ranks] == [9, 9]  # the shorter stream (rank 1's) bounds the probe set
    positions = [sorted(int(p) for p in r["held"]) for r in ranks]
    assert sorted(positions[0] + positions[1]) == list(range(9))  # every position once
    for rank, r in enumerate(ranks):
        for p, x in r["held"].items():  # position p of rank r's share is the p-th sample of rank r's own shard
            assert x == Stream().sample(rank + 2 * int(p))[0].tolist()
