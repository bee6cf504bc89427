"""Bad input that is the machine's or the environment's (a read-only folder, a full disk), values Lightning accepts
that would be silently surprising (``--ckpt_path last`` with nothing to resume, a probe set larger than the
validation set, an empty plugin YAML): exit 2 with one line naming the place and the fix, or one warning.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from pdelightning.cli import EXIT_BAD_INPUT, main
from tests.test_bad_input import QUICK, _write, run_main


# ---- the machine, not the run: a read-only folder, a full disk ----------------------------------------------------
def test_read_only_log_dir_exits_2_naming_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    logs = tmp_path / "ro"
    real = os.makedirs

    def refuse(path: object, *args: object, **kwargs: object) -> None:  # a read-only mount (root ignores chmod)
        if str(path).startswith(str(logs)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "makedirs", refuse)
    code, last = run_main(
        ["fit", "-c", QUICK, "--trainer.max_steps=1", f"--trainer.logger.init_args.save_dir={logs}"], capsys
    )
    assert code == EXIT_BAD_INPUT, last
    assert re.search(rf"cannot write to {re.escape(str(logs))}\S*: Read-only file system", last), last
    assert "--trainer.logger.init_args.save_dir" in last
    assert not logs.exists()


def test_disk_full_during_a_checkpoint_exits_2_and_leaves_no_partial_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import errno
    import io

    import pdelightning.checkpointing as ckpt_module

    class Full(io.FileIO):
        """A file on a disk that fills after 1000 bytes: the real ``torch.save`` then raises its RuntimeError."""

        written = 0

        def write(self, b: object) -> int:
            self.written += len(b)  # type: ignore[arg-type]
            if self.written > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)  # type: ignore[arg-type]

    def open_full(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        return Full(path, mode) if mode == "wb" else builtins.open(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt_module, "open", open_full, raising=False)
    logs = tmp_path / "logs"
    short = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    code, last = run_main(["fit", "-c", QUICK, *short, f"--trainer.logger.init_args.save_dir={logs}"], capsys)
    assert code == EXIT_BAD_INPUT, last
    assert re.search(r"cannot write checkpoint .*\.ckpt: No space left on device", last), last
    assert "free space" in last
    assert not [p for p in logs.rglob("*") if ".tmp-" in p.name or p.suffix == ".ckpt"]


def test_ckpt_path_last_without_a_run_says_it_starts_fresh(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    earlier = logs / "quickstart" / "version_0" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "last.ckpt").write_bytes(b"an earlier run's")  # only named in the message, not loaded
    short = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    args = ["fit", "-c", QUICK, *short, "--ckpt_path=last", f"--trainer.logger.init_args.save_dir={logs}"]
    with pytest.warns(UserWarning, match=r"--ckpt_path last: .* starts from scratch.*version_0/checkpoints/last\.ckpt"):
        main(args)


def test_empty_plugin_yaml_says_it_attaches_nothing(tmp_path: Path) -> None:
    from pdelightning.plugin import build_callbacks

    empty = _write(tmp_path / "empty.yaml", "")
    with pytest.warns(UserWarning, match=r"empty\.yaml lists no callbacks: nothing is attached"):
        assert build_callbacks(str(empty)) == []


def test_probe_size_above_the_validation_set_is_said(tmp_path: Path) -> None:
    from pdelightning.probing.probe_set import DEFAULT_PROBE_SIZE, ProbeSet

    data = [(torch.full((2,), float(i)), i) for i in range(10)]
    with pytest.warns(UserWarning, match=r"probe_size=100000 is more than the 10 validation samples"):
        probes = ProbeSet(data, torch.utils.data.default_collate, 100000, 4, seed=0)
    assert probes.size == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProbeSet(data, torch.utils.data.default_collate, 10, 4, seed=0)  # exactly the set: no warning
        ProbeSet(data, torch.utils.data.default_collate, DEFAULT_PROBE_SIZE, 4, seed=0)  # the default adapts silently
