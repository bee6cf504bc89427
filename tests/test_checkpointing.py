"""AtomicCheckpointIO: atomic writes under SIGKILL, finite-only saves, named errors for unreadable files."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pdelightning.checkpointing import (
    AtomicCheckpointIO,
    CorruptCheckpointError,
    NonFiniteCheckpointWarning,
    count_nonfinite,
    load_checkpoint_file,
    newest_readable_checkpoint,
    remove_stale_temp_files,
    stale_temp_files,
    temp_path,
)
from pdelightning.cli import build_cli
from pdelightning.resume import (
    KeepConfigCallback,
    RNGStateCheckpoint,
    event_files,
    purge_events,
    rng_states,
    set_rng_states,
)
from tests.helpers.configs import CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(value: float, step: int, n: int = 1000) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((n,), value), "b": torch.zeros(3)}}


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


def test_save_writes_a_loadable_file_and_no_temp(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0, 5), path)
    io.save_checkpoint(_ckpt(2.0, 6), path)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 6 and torch.equal(loaded["state_dict"]["w"], torch.full((1000,), 2.0))
    assert _temps(path.parent) == []
    assert temp_path(path).parent == path.parent  # the temporary file is on the target's filesystem


def _writer(path: str, tensors: list[torch.Tensor], ready: multiprocessing.synchronize.Event) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (it would hang)
    io = AtomicCheckpointIO()
    ready.set()
    step = 1
    while True:  # rewrite the same file until killed
        io.save_checkpoint({"global_step": step, "state_dict": {"w": tensors[step % 2]}}, path)
        step += 1


def test_sigkill_during_writes_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    tensors = [torch.zeros(2_000_000), torch.ones(2_000_000)]  # 8 MB each, built before forking
    AtomicCheckpointIO().save_checkpoint({"global_step": 0, "state_dict": {"w": tensors[0]}}, path)
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    kills, leftovers = 12, 0
    for _ in range(kills):
        ready = ctx.Event()
        proc = ctx.Process(target=_writer, args=(str(path), tensors, ready))
        proc.start()
        assert ready.wait(30)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        assert path.stat().st_size > 0
        left = _temps(tmp_path)
        leftovers += len(left)
        assert stale_temp_files(tmp_path) == left  # a dead writer's temporary file is recognised as stale
        loaded = load_checkpoint_file(path, weights_only=True)  # never truncated: the old or the new file
        assert torch.equal(loaded["state_dict"]["w"], tensors[loaded["global_step"] % 2])
        assert _temps(tmp_path) == []  # ... and removed by the next load (or save) in that folder
    assert 0 < leftovers <= kills  # some kills landed mid-write (the writer spends most of its time writing)


def test_stale_temp_files_only_of_dead_writers_on_this_host(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".last.ckpt.tmp-{host}-{dead.pid}-0123abcd"
    alive = tmp_path / f".last.ckpt.tmp-{host}-{os.getppid()}-0123abcd"
    other_host = tmp_path / f".last.ckpt.tmp-elsewhere-{dead.pid}-0123abcd"
    unrelated = tmp_path / "notes.tmp-x"
    for p in (stale, alive, other_host, unrelated):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (alive, other_host, unrelated))


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda b: b"", "is empty"),
        (lambda b: b[: len(b) // 2], "truncated or corrupt"),
        (lambda b: b"\x00" * 64 + b[64:], "truncated or corrupt"),
    ],
    ids=["empty", "truncated", "overwritten-header"],
)
def test_unreadable_checkpoint_names_itself_and_the_newest_readable_one(tmp_path, damage, what) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint(_ckpt(1.0, 10), tmp_path / "epoch=0-step=10.ckpt")
    os.utime(tmp_path / "epoch=0-step=10.ckpt", (1, 1))  # the older one
    io.save_checkpoint(_ckpt(2.0, 20), tmp_path / "epoch=1-step=20.ckpt")
    io.save_checkpoint(_ckpt(3.0, 30), tmp_path / "last.ckpt")
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(CorruptCheckpointError) as err:
        io.load_checkpoint(bad)
    msg = str(err.value)
    assert str(bad) in msg and what in msg
    assert f"--ckpt_path {tmp_path / 'epoch=1-step=20.ckpt'}" in msg and "(global step 20)" in msg


def test_unreadable_checkpoint_alone_says_there_is_no_other(tmp_path: Path) -> None:
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"")
    (tmp_path / "other.ckpt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match=r"no other readable checkpoint in .*; start again without"):
        load_checkpoint_file(bad)
    assert newest_readable_checkpoint(tmp_path) is None


def test_count_nonfinite() -> None:
    sd = {
        "a": torch.tensor([1.0, float("inf")]),
        "b": torch.tensor([float("nan")]),
        "c": torch.ones(2),
        "i": torch.ones(2, dtype=torch.long),
    }
    assert count_nonfinite(sd) == (["a", "b"], 3)


def test_nonfinite_checkpoint_is_refused_and_the_finite_one_kept(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0, 5), path)
    before = path.read_bytes()
    bad = _ckpt(float("nan"), 6)
    with pytest.warns(
        NonFiniteCheckpointWarning,
        match=rf"1 of 2 model tensors hold NaN or inf \(w\); the earlier finite {path} is kept",
    ) as rec:
        io.save_checkpoint(bad, path)
        io.save_checkpoint(bad, path)  # warned once per path
    assert len([w for w in rec if issubclass(w.category, NonFiniteCheckpointWarning)]) == 1
    assert path.read_bytes() == before
    io.remove_checkpoint(path)  # ModelCheckpoint rotating top-k while the model is non-finite: ignored
    assert path.exists()
    assert io.refused == [(str(path), 1, 2), (str(path), 1, 2)]
    io.save_checkpoint(_ckpt(3.0, 7), path)  # finite again: written, and removals work again
    assert io.load_checkpoint(path)["global_step"] == 7
    io.remove_checkpoint(path)
    assert not path.exists()


def test_nonfinite_without_earlier_file_writes_nothing(tmp_path: Path) -> None:
    with pytest.warns(NonFiniteCheckpointWarning, match="is not written"):
        AtomicCheckpointIO().save_checkpoint(_ckpt(float("inf"), 1), tmp_path / "best.ckpt")
    assert list(tmp_path.iterdir()) == []


QUICK = ["-c", str(CONFIGS / "quickstart.yaml"), "--trainer.accelerator=cpu"]


def test_cli_installs_the_plugin_unless_the_config_gives_one() -> None:
    cli = build_cli(QUICK, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert any(isinstance(c, RNGStateCheckpoint) for c in cli.trainer.callbacks)
    cli = build_cli([*QUICK, "--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(10), np.random.rand(10), random.random()  # move every generator on
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_purge_events_drops_steps_from_the_resume_step_and_a_truncated_tail(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        for step in range(10):
            w.add_scalar("train/loss", float(step), step)
    (f,) = event_files(tmp_path)
    f.write_bytes(f.read_bytes() + b"\x05\x00\x00")  # a half-written record, as a killed writer leaves
    assert purge_events(tmp_path, 6) == 4
    acc = EventAccumulator(str(tmp_path), purge_orphaned_data=False)
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]
    assert purge_events(tmp_path, 6) == 0  # idempotent


def test_keep_config_never_overwrites_a_different_config(tmp_path: Path) -> None:
    args = [*QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=0"]
    first = build_cli(args, run=False)
    (cb,) = [c for c in first.trainer.callbacks if isinstance(c, KeepConfigCallback)]
    cb.setup(first.trainer, first.model, "fit")
    log_dir = Path(first.trainer.log_dir)
    original = (log_dir / "config.yaml").read_text()
    again = build_cli(args, run=False)  # the same config: left alone
    next(c for c in again.trainer.callbacks if isinstance(c, KeepConfigCallback)).setup(
        again.trainer, again.model, "fit"
    )
    assert sorted(p.name for p in log_dir.glob("config*.yaml")) == ["config.yaml"]
    # what a resume of the same run changes (the checkpoint, the logger version) does not count as different
    resumed = yaml.safe_load(original)
    resumed.update(ckpt_path="somewhere/last.ckpt")
    resumed["trainer"]["logger"]["init_args"]["version"] = None
    (log_dir / "config.yaml").write_text(yaml.safe_dump(resumed))
    next(c for c in again.trainer.callbacks if isinstance(c, KeepConfigCallback)).already_saved = False
    next(c for c in again.trainer.callbacks if isinstance(c, KeepConfigCallback)).setup(
        again.trainer, again.model, "fit"
    )
    assert sorted(p.name for p in log_dir.glob("config*.yaml")) == ["config.yaml"]
    (log_dir / "config.yaml").write_text(original)
    other = build_cli([*args, "--model.model.init_args.n_layers=2"], run=False)
    next(c for c in other.trainer.callbacks if isinstance(c, KeepConfigCallback)).setup(
        other.trainer, other.model, "fit"
    )
    assert (log_dir / "config.yaml").read_text() == original
    assert yaml.safe_load((log_dir / "config.1.yaml").read_text())["model"]["model"]["init_args"]["n_layers"] == 2
