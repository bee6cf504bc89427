"""Fixtures for the data tests: no network, a tiny MNIST in IDX ``.gz`` form, a tiny 20 Newsgroups tarball."""

from __future__ import annotations

import gzip
import io
import socket
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

MNIST_N_TRAIN = 50  # test_mnist.py relies on these sizes and on `mnist_arrays`
MNIST_N_TEST = 20

# Tiny bydate layout: {split: {group: {file id: body}}}. Every post gets a header (see `news_post`).
# "common" is the most frequent train word by far; "zebraquux" occurs only in test; "café" checks latin-1;
# each train body has a unique word "id<file id>", to tell the posts apart after tokenization.
NEWS_GROUPS = ("alt.atheism", "rec.autos", "sci.space")
NEWS_DOCS: dict[str, dict[str, dict[str, str]]] = {
    "train": {
        "alt.atheism": {f"{100 + i}": f"common common common god belief id{100 + i} café" for i in range(6)},
        "rec.autos": {f"{200 + i}": f"common common common car engine wheel id{200 + i}" for i in range(6)},
        "sci.space": {f"{300 + i}": f"common common common orbit rocket launch id{300 + i}" for i in range(6)},
    },
    "test": {
        "alt.atheism": {"900": "zebraquux god", "901": ""},  # 901 has an empty body
        "rec.autos": {"910": "car " * 50},  # longer than max_len=16 used in the tests
        "sci.space": {"920": "orbit zebraquux"},
    },
}


def news_post(group: str, doc_id: str, body: str) -> str:
    """A news post: header lines (with the unique word "headeronlyword"), a blank line, then the body."""
    return (
        f"From: someone{doc_id}@example.org\n"
        f"Subject: headeronlyword post {doc_id}\n"
        f"Organization: Example\n"
        f"Newsgroups: {group}\n"
        f"\n"
        f"{body}\n"
    )


def write_idx_gz(path: Path, array: np.ndarray, magic: int) -> None:
    """Write ``array`` (uint8) as a gzipped big-endian IDX file with the given magic number."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def mnist_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel [0, 0] is their index (plus ``offset``) and labels ``index % 10``."""
    idx = np.arange(n) + offset
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = idx
    images[:, 5:10, 5:10] = 255
    return images, (idx % 10).astype(np.uint8)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to resolve or connect: the data modules must work offline."""

    def blocked(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"network access attempted in a data test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)


@pytest.fixture
def mnist_gz_dir(tmp_path: Path) -> Path:
    """A ``data_dir`` whose ``MNIST/raw`` holds only the four ``.gz`` IDX files (50 train, 20 test images)."""
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = mnist_arrays(MNIST_N_TRAIN, 0)
    test_x, test_y = mnist_arrays(MNIST_N_TEST, 100)
    write_idx_gz(raw / "train-images-idx3-ubyte.gz", train_x, 2051)
    write_idx_gz(raw / "train-labels-idx1-ubyte.gz", train_y, 2049)
    write_idx_gz(raw / "t10k-images-idx3-ubyte.gz", test_x, 2051)
    write_idx_gz(raw / "t10k-labels-idx1-ubyte.gz", test_y, 2049)
    return tmp_path / "mnist"


def write_news_tarball(path: Path, docs: dict[str, dict[str, dict[str, str]]] = NEWS_DOCS) -> Path:
    """Write a bydate-layout ``.tar.gz`` of latin-1 posts (members added in reverse order, to test sorting)."""
    members = [
        (f"20news-bydate-{split}/{group}/{doc_id}", news_post(group, doc_id, body).encode("latin-1"))
        for split, groups in docs.items()
        for group, files in groups.items()
        for doc_id, body in files.items()
    ]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in reversed(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def news_docs() -> dict[str, dict[str, dict[str, str]]]:
    """The bodies written into `news_tarball`, ``{split: {group: {id: body}}}``."""
    return NEWS_DOCS


@pytest.fixture
def make_news_tarball() -> Callable[..., Path]:
    """``make_news_tarball(path, docs)`` writes a bydate tarball of ``docs`` (default: `news_docs`)."""
    return write_news_tarball


@pytest.fixture
def news_tarball(tmp_path: Path) -> Path:
    """Path of a tiny ``20news-bydate.tar.gz`` (3 groups, 18 train and 4 test posts)."""
    (tmp_path / "news").mkdir()
    return write_news_tarball(tmp_path / "news" / "20news-bydate.tar.gz")
