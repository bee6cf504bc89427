"""Integrity of data files: errors that name a corrupt file, its expected checksum and what to do.

A data folder may carry a ``SHA256SUMS`` file (``sha256sum`` format, paths relative to its folder), as the
workspace's ``shared/data`` does; when one lists a broken file, the message quotes the expected digest and
the command that checks it. Otherwise the digests of the original public files below are used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pdelightning.utils import InputError

KNOWN_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "20news-bydate.tar.gz": "8f1b2514ca22a5ade8fbb9cfa5727df95fa587f4c87b786e15c759fa66d95610",
}
"""SHA-256 of the original public files: MNIST as on torchvision's mirrors (their MD5s are in
``torchvision.datasets.MNIST``), 20 Newsgroups as scikit-learn downloads it (``ARCHIVE.checksum``; a repack
differs, and is covered by the ``SHA256SUMS`` shipped with it)."""


class DataFileError(InputError):
    """A data file exists but is corrupt, truncated or inconsistent."""


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Example::

        >>> import tempfile, os
        >>> with tempfile.NamedTemporaryFile(delete=False) as f:
        ...     _ = f.write(b"abc")
        >>> sha256(f.name)
        'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
        >>> os.unlink(f.name)
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _listed_sha256(path: Path, levels: int = 3) -> tuple[Path, str] | None:
    """``(SHA256SUMS file, expected digest)`` for ``path`` from a ``SHA256SUMS`` in its folder or a parent."""
    path = path.resolve()
    folder = path.parent
    for _ in range(levels):
        sums = folder / "SHA256SUMS"
        if sums.is_file():
            rel = path.relative_to(folder).as_posix()
            for line in sums.read_text(errors="replace").splitlines():
                parts = line.split(maxsplit=1)
                if len(parts) == 2 and parts[1].lstrip("*").strip() == rel:
                    return sums, parts[0].lower()
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def checksum_hint(path: str | Path) -> str:
    """What to do about a broken ``path``: its expected SHA-256 (and the check command when a list has it)."""
    path = Path(path)
    listed = _listed_sha256(path)
    try:
        actual = sha256(path)
    except OSError:
        actual = None
    if listed is not None:
        sums, expected = listed
        state = "matches" if actual == expected else f"is {actual}" if actual else "cannot be read"
        return (
            f"replace it with an intact copy: {sums} expects SHA-256 {expected} (this file's {state}); "
            f"check with: cd {sums.parent} && sha256sum -c SHA256SUMS"
        )
    expected = KNOWN_SHA256.get(path.name)
    if expected is not None:
        state = "matches" if actual == expected else f"is {actual}" if actual else "cannot be read"
        return f"replace it with an intact copy (the original has SHA-256 {expected}; this file's {state})"
    return "replace it with an intact copy (or delete it and set download: true where the data module offers it)"
