"""Corrupt, truncated and stale data files: named in the error with what to do, or repaired."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pdelightning.data import MNISTDataModule, NewsgroupsDataModule
from pdelightning.data.files import KNOWN_SHA256, DataFileError, checksum_hint, sha256
from pdelightning.data.mnist import idx_expected_size, idx_problem, load_mnist, prepare_mnist_root
from pdelightning.data.newsgroups import read_tarball

RAW = ("MNIST", "raw")


@pytest.fixture(autouse=True)
def _scratch_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))


def test_idx_expected_size_from_the_header() -> None:
    assert idx_expected_size(struct.pack(">IIII", 2051, 60000, 28, 28)) == 16 + 60000 * 784  # 47,040,016 (README)
    assert idx_expected_size(struct.pack(">II", 2049, 10000)) == 8 + 10000
    assert idx_expected_size(struct.pack(">II", 1234, 5)) is None


def test_sha256_and_checksum_hint_from_a_sums_file(tmp_path: Path) -> None:
    f = tmp_path / "data" / "MNIST" / "raw" / "x.gz"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"abc")
    assert sha256(f) == hashlib.sha256(b"abc").hexdigest()
    (tmp_path / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  MNIST/raw/x.gz\n")
    hint = checksum_hint(f)
    assert f"expects SHA-256 {'0' * 64}" in hint and f"is {hashlib.sha256(b'abc').hexdigest()}" in hint
    assert f"cd {(tmp_path / 'data').resolve()} && sha256sum -c SHA256SUMS" in hint


def test_truncated_gz_names_the_file_and_the_original_checksum(mnist_gz_dir: Path) -> None:
    gz = mnist_gz_dir.joinpath(*RAW, "train-images-idx3-ubyte.gz")
    gz.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(DataFileError) as err:
        MNISTDataModule(data_dir=mnist_gz_dir).setup("fit")
    msg = str(err.value)
    assert str(gz) in msg and "corrupt or truncated" in msg
    assert KNOWN_SHA256["train-images-idx3-ubyte.gz"] in msg and "replace it with an intact copy" in msg
    assert not gz.with_suffix("").exists()  # nothing half-extracted
    assert not any(".tmp" in p.name for p in gz.parent.iterdir())


def test_gz_of_a_truncated_idx_file_is_refused(mnist_gz_dir: Path) -> None:
    gz = mnist_gz_dir.joinpath(*RAW, "t10k-labels-idx1-ubyte.gz")
    with gzip.open(gz, "rb") as f:
        content = f.read()
    with gzip.open(gz, "wb") as f:  # a valid gzip of a cut IDX file
        f.write(content[:-5])
    with pytest.raises(DataFileError, match=r"decompresses to a broken IDX file .* has 23 bytes but its IDX header"):
        prepare_mnist_root(mnist_gz_dir)


def test_stale_decompressed_file_is_extracted_again(mnist_gz_dir: Path) -> None:
    raw = mnist_gz_dir.joinpath(*RAW)
    prepare_mnist_root(mnist_gz_dir)
    plain = raw / "train-images-idx3-ubyte"
    good = plain.read_bytes()
    plain.write_bytes(good[: len(good) // 2])  # an interrupted extraction
    x, _ = load_mnist(mnist_gz_dir, train=True)
    assert plain.read_bytes() == good and x.shape == (50, 28, 28)
    # a complete file of another .gz (the .gz was replaced since): 51 images, consistent with its own header
    other = bytearray(good)
    other[4:8] = struct.pack(">I", 51)
    other += bytes(784)
    plain.write_bytes(bytes(other))
    assert idx_problem(plain) is None  # consistent on its own, but not the decompression of its .gz
    prepare_mnist_root(mnist_gz_dir)
    assert plain.read_bytes() == good


def test_stale_file_in_a_read_only_source_goes_to_scratch(mnist_gz_dir: Path, tmp_path: Path) -> None:
    raw = mnist_gz_dir.joinpath(*RAW)
    prepare_mnist_root(mnist_gz_dir)
    plain = raw / "train-labels-idx1-ubyte"
    good = plain.read_bytes()
    plain.write_bytes(good[:20])
    mode = raw.stat().st_mode
    raw.chmod(0o555)
    try:
        root = prepare_mnist_root(mnist_gz_dir)
        _, y = load_mnist(mnist_gz_dir, train=True)
    finally:
        raw.chmod(mode)
    assert root.is_relative_to(tmp_path / "scratch")
    assert root.joinpath(*RAW, "train-labels-idx1-ubyte").read_bytes() == good and len(y) == 50
    assert plain.read_bytes() == good[:20]  # the read-only source is untouched


def test_broken_plain_file_without_gz_is_named(mnist_gz_dir: Path) -> None:
    raw = mnist_gz_dir.joinpath(*RAW)
    prepare_mnist_root(mnist_gz_dir)
    for gz in raw.glob("*.gz"):
        gz.unlink()
    plain = raw / "t10k-images-idx3-ubyte"
    plain.write_bytes(plain.read_bytes()[:100])
    with pytest.raises(DataFileError, match=rf"{plain} has 100 bytes but its IDX header implies 15696; replace it"):
        prepare_mnist_root(mnist_gz_dir)


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b[:10] + bytes(len(b) - 10), lambda b: b"not a tarball at all"],
    ids=["truncated", "zeroed", "not-gzip"],
)
def test_corrupt_newsgroups_tarball_is_named(news_tarball: Path, damage) -> None:
    news_tarball.write_bytes(damage(news_tarball.read_bytes()))
    with pytest.raises(DataFileError) as err:
        NewsgroupsDataModule(data_dir=news_tarball.parent, max_len=8, vocab_size=16).setup("fit")
    msg = str(err.value)
    assert str(news_tarball) in msg and "corrupt or truncated" in msg
    assert KNOWN_SHA256["20news-bydate.tar.gz"] in msg  # scikit-learn's original, since no SHA256SUMS is nearby


def test_corrupt_tarball_with_a_sums_file_points_at_it(news_tarball: Path) -> None:
    data = news_tarball.read_bytes()
    expected = hashlib.sha256(data).hexdigest()
    (news_tarball.parent / "SHA256SUMS").write_text(f"{expected}  {news_tarball.name}\n")
    news_tarball.write_bytes(data[:-100])
    with pytest.raises(DataFileError, match=rf"expects SHA-256 {expected} .*sha256sum -c SHA256SUMS"):
        read_tarball(news_tarball)


def test_intact_tarball_still_reads(tmp_path: Path) -> None:
    body = b"hello world"
    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("20news-bydate-train/sci.space/1")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    assert read_tarball(path) == {"train": [("sci.space", "hello world")], "test": []}


def test_mnist_arrays_unchanged_after_repair(mnist_gz_dir: Path) -> None:
    x1, y1 = load_mnist(mnist_gz_dir, train=False)
    plain = mnist_gz_dir.joinpath(*RAW, "t10k-images-idx3-ubyte")
    plain.write_bytes(plain.read_bytes()[:-1])
    x2, y2 = load_mnist(mnist_gz_dir, train=False)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
