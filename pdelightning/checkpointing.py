"""Checkpoint files that a kill cannot corrupt, that never hold non-finite weights, and that name themselves.

:class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin (the ``pdelightning`` command line
installs it unless the trainer config names another one). Compared with Lightning's ``TorchCheckpointIO``:

- **Atomic**: a checkpoint is serialised into a temporary file *in the directory of the target* (so the
  final rename never crosses filesystems), flushed and ``fsync``-ed, then ``os.replace``-d into place and
  the directory ``fsync``-ed. A kill at any moment leaves the previous file or the new one, never a
  0-byte or half-written one. Temporary files of writers that died (same host, process gone) are
  removed by the next save or load in that directory.
- **Finite only**: a checkpoint whose model state holds NaN or inf is not written; the previous file at
  that path (the last finite one) stays, with one warning per path.
- **Named errors**: an empty, truncated or corrupt file raises :class:`CorruptCheckpointError` naming the
  file and the newest other readable checkpoint in the same folder.

Example::

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import socket
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from pdelightning.trust import UntrustedFileError, load_data_file
from pdelightning.utils import InputError

PathArg = str | os.PathLike
"""A checkpoint path as Lightning's ``CheckpointIO`` methods take it."""

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
_CLI_TRUST_HINT = (
    "resume only from checkpoints you wrote; if you trust the file's author, add --weights_only false (or pass "
    "weights_only=False to Trainer.fit), which runs the file's pickle code"
)
_UNREADABLE = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError, ValueError)


class CorruptCheckpointError(InputError):
    """A checkpoint file exists but cannot be read (empty, truncated or corrupt)."""


class CheckpointWriteError(InputError):
    """A checkpoint could not be written because the disk is full (the machine, not the run: exit 2 on the CLI)."""


def _no_space(err: BaseException) -> bool:
    """Whether ``err`` (or a cause) is the disk running full; ``torch.save`` reports it as a ``RuntimeError``."""
    link: BaseException | None = err
    seen: list[BaseException] = []
    while link is not None and link not in seen:
        seen.append(link)
        if (isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(link):
            return True
        link = link.__cause__ or link.__context__
    return False


class NonFiniteCheckpointWarning(UserWarning):
    """A checkpoint was not written because its model state holds NaN or inf."""


def temp_path(path: str | Path) -> Path:
    """The temporary file a save to ``path`` writes first: hidden, next to ``path``, unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temp_files(directory: str | Path) -> list[Path]:
    """Temporary checkpoint files in ``directory`` left by writers on this host whose process is gone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    host = socket.gethostname()
    stale = []
    for p in directory.iterdir():
        m = _TMP_RE.match(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            stale.append(p)
    return sorted(stale)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete :func:`stale_temp_files` of ``directory`` and return them."""
    removed = []
    for p in stale_temp_files(directory):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a same-directory temporary file: ``write(f)``, flush, fsync, ``os.replace``.

    A kill leaves either the old ``path`` or the new one; on an exception the temporary file is removed.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def count_nonfinite(state_dict: Mapping[str, Any]) -> tuple[list[str], int]:
    """Names of the floating-point tensors of ``state_dict`` holding NaN or inf, and how many there are in all.

    Example::

        >>> count_nonfinite({"w": torch.tensor([1.0, float("nan")]), "b": torch.zeros(2), "n": torch.tensor(3)})
        (['w'], 2)
    """
    bad, total = [], 0
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            total += 1
            if not bool(torch.isfinite(value).all()):
                bad.append(name)
    return bad, total


def _is_local(path: PathArg) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


def read_checkpoint(path: str | Path, weights_only: bool | None = True) -> dict[str, Any]:
    """``torch.load`` a checkpoint onto the CPU, memory-mapped when the file allows it (no tensor data is read).

    Loaded as data (:func:`~pdelightning.trust.load_data_file`) unless ``weights_only`` is ``False``.

    Raises:
        UntrustedFileError: when the file holds a pickle global outside the allow-list.
    """
    return load_data_file(path, map_location="cpu", trust=weights_only is False, mmap=True)


def readable(path: str | Path) -> tuple[bool, int | None]:
    """Whether ``path`` loads as a checkpoint (as data: a file holding a foreign pickle global does not, so it is
    never offered as the checkpoint to resume from), and its ``global_step`` when it does.
    """
    try:
        ckpt = read_checkpoint(path)
    except (UntrustedFileError, *_UNREADABLE):
        return False, None
    except OSError:
        return False, None
    return True, ckpt.get("global_step") if isinstance(ckpt, dict) else None


def newest_readable_checkpoint(
    directory: str | Path, exclude: str | Path | None = None
) -> tuple[Path, int | None] | None:
    """The most recently modified ``*.ckpt`` in ``directory`` (other than ``exclude``) that loads, with its step."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude is not None else None
    files = [p for p in directory.glob("*.ckpt") if p.is_file() and p.resolve() != skip]
    for p in sorted(files, key=lambda q: q.stat().st_mtime, reverse=True):
        ok, step = readable(p)
        if ok:
            return p, step
    return None


def unreadable_message(path: str | Path, err: BaseException) -> str:
    """Why ``path`` could not be read, and which checkpoint of its folder to resume from instead."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    what = "is empty (0 bytes)" if size == 0 else f"is truncated or corrupt ({size} bytes)"
    cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
    other = newest_readable_checkpoint(path.parent, exclude=path)
    if other is None:
        hint = f"there is no other readable checkpoint in {path.parent}; start again without --ckpt_path"
    else:
        step = f" (global step {other[1]})" if other[1] is not None else ""
        hint = (
            f"the newest readable checkpoint in {path.parent} is {other[0]}{step}: resume with --ckpt_path {other[0]}"
        )
    return f"checkpoint {path} {what}, cannot load it ({type(err).__name__}: {cause}); {hint}"


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", weights_only: bool | None = None, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load`` a checkpoint as data, raising :class:`CorruptCheckpointError` (with the way out) when it is
    unreadable. ``weights_only=None`` means ``True``; only an explicit ``False`` runs the file's pickle code.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        UntrustedFileError: if it holds a pickle global outside the allow-list (an intact but foreign file).
        CorruptCheckpointError: if it is empty, truncated or otherwise unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    remove_stale_temp_files(path.parent)
    try:
        return load_data_file(
            path, map_location=map_location, trust=weights_only is False, mmap=mmap, hint=_CLI_TRUST_HINT
        )
    except UntrustedFileError:  # intact but foreign: not "corrupt"
        raise
    except _UNREADABLE as err:
        raise CorruptCheckpointError(unreadable_message(path, err)) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes atomically, keeps the last finite checkpoint, and names unreadable files.

    Args:
        refuse_nonfinite: do not write a checkpoint whose model state (``checkpoint["state_dict"]``) holds
            NaN or inf; the file already at that path is kept. While the model is non-finite, requests to
            delete checkpoints (``ModelCheckpoint`` rotating its top-k) are ignored too, so the last finite
            "best" file survives.

    Attributes:
        refused: ``(path, n_nonfinite, n_tensors)`` of every save that was refused.

    Example::

        >>> io = AtomicCheckpointIO()
        >>> io.refuse_nonfinite
        True
    """

    def __init__(self, refuse_nonfinite: bool = True) -> None:
        super().__init__()
        self.refuse_nonfinite = bool(refuse_nonfinite)
        self.refused: list[tuple[str, int, int]] = []
        self._warned: set[str] = set()
        self._nonfinite = False

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathArg, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically, or not at all when its model state is non-finite.

        Raises:
            TypeError: if ``storage_options`` is given (as ``TorchCheckpointIO``).
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        if self.refuse_nonfinite:
            bad, total = count_nonfinite(checkpoint.get("state_dict", {}))
            self._nonfinite = bool(bad)
            if bad:
                self._refuse(str(path), bad, total)
                return
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(str(path).removeprefix("file://"))
        kept = target.is_file()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(target.parent)
            atomic_write(target, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as err:
            if not _no_space(err):
                raise
            previous = f"the previous {target} is kept" if kept else "no partial file is left"
            raise CheckpointWriteError(
                f"cannot write checkpoint {target}: No space left on device ({previous}); free space on that disk "
                "or write checkpoints elsewhere (--trainer.logger.init_args.save_dir DIR)"
            ) from err

    def _refuse(self, path: str, bad: list[str], total: int) -> None:
        self.refused.append((path, len(bad), total))
        if path in self._warned:
            return
        self._warned.add(path)
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        kept = (
            f"the earlier finite {path} is kept"
            if os.path.isfile(path)
            else f"{path} is not written (there was no earlier finite file there)"
        )
        rank_zero_warn(
            f"not saving checkpoint {path}: {len(bad)} of {total} model tensors hold NaN or inf ({names}); {kept}",
            category=NonFiniteCheckpointWarning,
        )

    @override
    def load_checkpoint(
        self, path: PathArg, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load ``path``; an unreadable file raises :class:`CorruptCheckpointError` naming a readable alternative.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            CorruptCheckpointError: if it is empty, truncated or corrupt.
        """
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(
            str(path).removeprefix("file://"), map_location=map_location, weights_only=weights_only
        )

    @override
    def remove_checkpoint(self, path: PathArg) -> None:
        """Delete ``path``, except while the model is non-finite (the file may be the last finite one)."""
        if self._nonfinite:
            return
        super().remove_checkpoint(path)
