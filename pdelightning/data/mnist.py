"""MNIST through ``torchvision.datasets.MNIST``, working offline from the four ``.gz`` IDX files.

torchvision (0.28, 0.29) only looks for the *decompressed* IDX files when ``download=False``, so a
directory holding just the original ``*-ubyte.gz`` files reads as "Dataset not found". This module
gunzips them first: into ``<data_dir>/MNIST/raw/`` when that directory is writable, otherwise into a
scratch directory under the system temp dir (the source is left untouched). No network is used unless
``download=True``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from typing_extensions import override

from pdelightning.data.base import (
    ClassificationDataModule,
    check_fraction,
    check_optional_positive_int,
    image_dataset,
    random_subset,
    stratified_split,
)
from pdelightning.data.files import DataFileError, checksum_hint

log = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
"""Mean pixel of the 60,000 training images after dividing by 255."""
MNIST_STD = 0.3081
"""Pixel standard deviation of the 60,000 training images after dividing by 255."""
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The decompressed IDX files torchvision reads from ``<root>/MNIST/raw/``."""


def _is_writable_dir(path: Path) -> bool:
    """Whether we may write into ``path``: the OS allows it *and* its mode has a write bit.

    The mode check matters for root, whom ``os.access`` always allows: a directory made read-only
    with ``chmod a-w`` (like a shared data folder) is then still treated as read-only.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


IDX_DIMS = {2049: 1, 2051: 3}
"""IDX magic numbers of the MNIST files (unsigned bytes) and their number of dimensions: labels, images."""
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError, struct.error)


def idx_expected_size(header: bytes) -> int | None:
    """The byte size an IDX file must have according to its header, or ``None`` if the header is not MNIST's.

    Example::

        >>> idx_expected_size(struct.pack(">IIII", 2051, 60000, 28, 28))
        47040016
    """
    if len(header) < 8:
        return None
    (magic,) = struct.unpack(">I", header[:4])
    ndim = IDX_DIMS.get(magic)
    if ndim is None or len(header) < 4 + 4 * ndim:
        return None
    dims = struct.unpack(f">{ndim}I", header[4 : 4 + 4 * ndim])
    return 4 + 4 * ndim + int(np.prod(dims))


def idx_problem(path: Path) -> str | None:
    """Why the decompressed IDX file ``path`` is unusable (bad header, wrong size), or ``None`` if it is fine."""
    with open(path, "rb") as f:
        header = f.read(16)
    expected = idx_expected_size(header)
    if expected is None:
        return f"{path} does not start with an MNIST IDX header (magic 2049 or 2051)"
    size = path.stat().st_size
    if size != expected:
        return f"{path} has {size} bytes but its IDX header implies {expected}"
    return None


def _gz_summary(gz: Path) -> tuple[bytes, int]:
    """The first 16 decompressed bytes of ``gz`` and its uncompressed size from the gzip trailer (mod 2**32)."""
    with gzip.open(gz, "rb") as f:
        head = f.read(16)
    with open(gz, "rb") as f:
        f.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", f.read(4))
    return head, isize


def _is_current(plain: Path, gz: Path) -> bool:
    """Whether ``plain`` is a complete decompression of ``gz``: same IDX header, the trailer's size, no problem."""
    if idx_problem(plain) is not None:
        return False
    try:
        head, isize = _gz_summary(gz)
    except _GZIP_ERRORS:
        return True  # a damaged .gz next to a complete file: keep using the file
    with open(plain, "rb") as f:
        return f.read(16) == head and plain.stat().st_size % (1 << 32) == isize


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress ``src`` to ``dst`` through a temporary file and an atomic rename.

    Raises:
        DataFileError: naming ``src`` and what to do, if it is not a complete gzip file or holds a broken IDX file.
    """
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        try:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
        except _GZIP_ERRORS as err:
            if isinstance(err, OSError) and not isinstance(err, gzip.BadGzipFile) and err.errno is not None:
                raise  # a real I/O error (disk full, permissions), not a damaged file
            raise DataFileError(
                f"{src} is corrupt or truncated ({type(err).__name__}: {err}); {checksum_hint(src)}"
            ) from err
        problem = idx_problem(tmp)
        if problem is not None:
            raise DataFileError(f"{src} decompresses to a broken IDX file ({problem}); {checksum_hint(src)}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _scratch_root(raw: Path) -> Path:
    """A per-source scratch root under the temp dir, used when ``raw`` is read-only."""
    digest = hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "pdelightning" / f"mnist-{digest}"


def missing_files_message(data_dir: Path) -> str:
    """The error text for missing MNIST files: where we looked, what we expected, how to get them."""
    raw = data_dir / "MNIST" / "raw"
    expected = ", ".join(MNIST_FILES)
    return (
        f"MNIST not found in {raw}: expected the files {expected} (or the same names with .gz). "
        f"Either set download: true (fetches about 11 MB from torchvision's mirrors), or copy the four "
        f"*-ubyte.gz files to {raw}/ (data_dir={str(data_dir)!r} is the directory that contains MNIST/)."
    )


def prepare_mnist_root(data_dir: str | Path, download: bool = False) -> Path:
    """Make sure the four decompressed IDX files exist and return the ``root`` to give torchvision.

    Files already decompressed in ``<data_dir>/MNIST/raw`` are used as they are. ``.gz`` files are
    decompressed next to themselves if that directory is writable, else into a scratch root (see
    :func:`_scratch_root`), which is returned instead of ``data_dir``. Only when files are missing
    altogether and ``download`` is true does torchvision download them.

    Decompressed files are checked against their ``.gz`` (IDX header and size) and re-extracted when stale
    (e.g. left by an interrupted extraction, or older than a replaced ``.gz``).

    Raises:
        FileNotFoundError: if a file is missing in both forms and ``download`` is false.
        DataFileError: if a ``.gz`` is corrupt or truncated, or a decompressed file without its ``.gz`` is broken;
            the message names the file and what to do.
    """
    data_dir = Path(data_dir).expanduser()
    raw = data_dir / "MNIST" / "raw"
    plain = {name: raw / name for name in MNIST_FILES}
    stale = set()
    for name, p in plain.items():
        if not p.is_file():
            continue
        gz = p.with_name(f"{name}.gz")
        if gz.is_file():
            if not _is_current(p, gz):
                stale.add(name)
                log.warning("%s does not match %s: decompressing it again", p, gz.name)
        else:
            problem = idx_problem(p)
            if problem is not None:
                raise DataFileError(
                    f"{problem}; replace it with an intact copy, or delete it and put {name}.gz in {raw}"
                )
    if not stale and all(p.is_file() for p in plain.values()):
        return data_dir
    gz_missing = [name for name, p in plain.items() if not p.is_file() and not p.with_name(f"{name}.gz").is_file()]
    if gz_missing:
        if not download:
            raise FileNotFoundError(missing_files_message(data_dir))
        import torchvision  # lazy: heavy import, only needed to download

        for train in (True, False):
            torchvision.datasets.MNIST(root=str(data_dir), train=train, download=True)
        return data_dir
    if _is_writable_dir(raw):
        target_root, target_raw = data_dir, raw
    else:
        target_root = _scratch_root(raw)
        target_raw = target_root / "MNIST" / "raw"
        target_raw.mkdir(parents=True, exist_ok=True)
        log.info("%s is read-only: decompressing MNIST into %s", raw, target_raw)
    for name, src in plain.items():
        dst = target_raw / name
        gz = src.with_name(f"{name}.gz")
        if dst.is_file() and (not gz.is_file() or _is_current(dst, gz)):
            continue
        if dst != src and (dst.exists() or dst.is_symlink()):  # a stale scratch copy
            dst.unlink()
        if dst != src and src.is_file() and name not in stale:  # a good file in the read-only source: link it
            with contextlib.suppress(FileExistsError):  # another process linked it first
                os.symlink(src.resolve(), dst)
        else:
            _gunzip(gz, dst)
    return target_root


def load_mnist(data_dir: str | Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one MNIST split with torchvision: ``(images uint8 [N, 28, 28], labels int64 [N])``.

    Raises:
        FileNotFoundError: if the files are missing and ``download`` is false.
    """
    root = prepare_mnist_root(data_dir, download)
    import torchvision  # lazy: never imported at module level

    ds = torchvision.datasets.MNIST(root=str(root), train=train, download=False)
    return ds.data.numpy(), ds.targets.numpy().astype(np.int64)


class MNISTDataModule(ClassificationDataModule):
    """MNIST handwritten digits, 28x28 grayscale, 10 classes (60,000 train and 10,000 test images).

    Pixels are divided by 255, then normalised with ``MNIST_MEAN`` = 0.1307 and ``MNIST_STD`` = 0.3081
    (the usual training-set statistics). Batches: ``x`` float32 ``[B, 28, 28]``, ``y`` int64 ``[B]``.

    The official training set, optionally cut to ``train_subset`` random images first, is split into
    train and validation: ``ceil(val_fraction * n)`` images go to validation, stratified by label and
    deterministic given ``seed`` (54,000 / 6,000 with the defaults). The test set is the official one,
    optionally cut to ``test_subset`` random images.

    Files are read from ``<data_dir>/MNIST/raw/``; the original ``*-ubyte.gz`` files suffice with
    ``download=False`` (they are decompressed there, or into a temp scratch copy if that directory is
    read-only). Loading happens in ``prepare_data``/``setup``; nothing is read in ``__init__``.

    Args:
        data_dir: directory that contains ``MNIST/raw/`` (torchvision's ``root``).
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_fraction: share of the (subset of the) training set held out for validation, in (0, 1).
        train_subset: use only this many training images (drawn at random given ``seed``, before the
            train/val split); ``None`` uses all 60,000. Handy for CPU runs.
        test_subset: use only this many test images (drawn at random given ``seed``); ``None`` uses all.
        download: let torchvision download missing files. When false, the network is never used.
        seed: seed of the subsets and of the train/val split.

    Raises:
        ValueError: on a non-positive ``batch_size`` or subset size, a negative ``num_workers``, or
            ``val_fraction`` outside (0, 1).
        FileNotFoundError: from ``prepare_data``/``setup``, if the files are missing and ``download`` is
            false; the message names the directory, the expected files, and how to get them.

    Example::

        dm = MNISTDataModule(data_dir="data", train_subset=5000, batch_size=128)
        dm.prepare_data()
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [128, 28, 28] float32, y: [128] int64
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        train_subset: int | None = None,
        test_subset: int | None = None,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.data_dir = Path(data_dir).expanduser()
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.train_subset = check_optional_positive_int("train_subset", train_subset)
        self.test_subset = check_optional_positive_int("test_subset", test_subset)
        self.download = bool(download)
        self.num_classes = 10
        self.input_kind = "image"
        self.image_size = 28
        self.save_hyperparameters()

    @override
    def prepare_data(self) -> None:
        """Decompress (or, with ``download=True``, download) the files once, on one process per node."""
        prepare_mnist_root(self.data_dir, self.download)

    @override
    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train_x, train_y = load_mnist(self.data_dir, train=True, download=self.download)
        test_x, test_y = load_mnist(self.data_dir, train=False, download=self.download)
        pool = random_subset(len(train_y), self.train_subset, self.seed)
        train_x, train_y = train_x[pool], train_y[pool]
        keep = random_subset(len(test_y), self.test_subset, self.seed)
        test_x, test_y = test_x[keep], test_y[keep]
        tr, va = stratified_split(train_y, self.val_fraction, self.seed)
        return (
            image_dataset(train_x[tr], train_y[tr], 255.0, MNIST_MEAN, MNIST_STD),
            image_dataset(train_x[va], train_y[va], 255.0, MNIST_MEAN, MNIST_STD),
            image_dataset(test_x, test_y, 255.0, MNIST_MEAN, MNIST_STD),
        )
