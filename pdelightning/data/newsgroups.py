"""20 Newsgroups ("bydate" train/test split) as padded token id sequences.

Two sources, tried in this order by ``source="auto"``:

1. the tarball ``20news-bydate.tar.gz``, parsed directly with :mod:`tarfile` (documents decoded as
   latin-1, like scikit-learn does). It is looked for at ``data_dir`` itself (a file path), then at
   ``data_dir/20news-bydate.tar.gz``, ``data_dir/20newsgroups/20news-bydate.tar.gz`` and
   ``data_dir/20news_home/20news-bydate.tar.gz``. Any repack with the bydate layout
   ``20news-bydate-{train,test}/<group>/<id>`` works; no checksum is required.
2. scikit-learn's cache: ``fetch_20newsgroups(data_home=sklearn_data_home, download_if_missing=download)``,
   i.e. ``<data_home>/20news-bydate_py3.pkz``. With ``download=True`` scikit-learn fetches it when missing.

Both sources give the same documents in the same order (group, then file name, as ``load_files`` sorts them).
"""

from __future__ import annotations

import gzip
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from typing_extensions import override

from pdelightning.data.base import (
    PAD_ID,
    UNK_ID,
    ClassificationDataModule,
    check_choice,
    check_fraction,
    check_optional_positive_int,
    check_positive_int,
    pad_sequences,
    random_subset,
    stratified_split,
)
from pdelightning.data.files import DataFileError, checksum_hint

Source = Literal["auto", "tarball", "sklearn"]
RemoveKind = Literal["headers", "footers", "quotes"]
SOURCES = ("auto", "tarball", "sklearn")
REMOVE_KINDS = ("headers", "footers", "quotes")
TARBALL_NAME = "20news-bydate.tar.gz"
SKLEARN_CACHE_NAME = "20news-bydate_py3.pkz"
"""scikit-learn's cache file in its ``data_home`` (``CACHE_NAME`` plus the ``_py3`` suffix of ``_pkl_filepath``)."""
NEWSGROUPS = (
    "alt.atheism",
    "comp.graphics",
    "comp.os.ms-windows.misc",
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "comp.windows.x",
    "misc.forsale",
    "rec.autos",
    "rec.motorcycles",
    "rec.sport.baseball",
    "rec.sport.hockey",
    "sci.crypt",
    "sci.electronics",
    "sci.med",
    "sci.space",
    "soc.religion.christian",
    "talk.politics.guns",
    "talk.politics.mideast",
    "talk.politics.misc",
    "talk.religion.misc",
)
"""The 20 group names, sorted: a label is an index into this tuple (or into sorted ``categories``)."""
SPECIALS = ("<pad>", "<unk>")

_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

Documents = dict[str, list[tuple[str, str]]]
"""``{"train": [(group, text), ...], "test": [...]}``."""


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and return its words: runs of letters and digits, with inner apostrophes kept.

    Example::

        tokenize("Don't PANIC: it's 42!")  # ["don't", "panic", "it's", "42"]
    """
    return _WORD_RE.findall(text.lower())


def build_vocab(token_lists: Iterable[Sequence[str]], vocab_size: int) -> dict[str, int]:
    """Map words to ids: ``<pad>`` = 0, ``<unk>`` = 1, then the ``vocab_size - 2`` most frequent words.

    Ties in frequency are broken alphabetically, so the result is deterministic.
    """
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        counts.update(tokens)
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - len(SPECIALS)]
    vocab = {w: i for i, w in enumerate(SPECIALS)}
    vocab.update({w: i + len(SPECIALS) for i, (w, _) in enumerate(words)})
    return vocab


def encode(tokens: Sequence[str], vocab: dict[str, int]) -> list[int]:
    """Token ids of ``tokens``; unknown words map to ``<unk>`` = 1."""
    return [vocab.get(t, UNK_ID) for t in tokens]


def strip_text(text: str, remove: Sequence[str]) -> str:
    """Apply scikit-learn's own ``strip_newsgroup_{header,footer,quoting}`` in ``fetch_20newsgroups``'s order."""
    from sklearn.datasets._twenty_newsgroups import (
        strip_newsgroup_footer,
        strip_newsgroup_header,
        strip_newsgroup_quoting,
    )

    if "headers" in remove:
        text = strip_newsgroup_header(text)
    if "footers" in remove:
        text = strip_newsgroup_footer(text)
    if "quotes" in remove:
        text = strip_newsgroup_quoting(text)
    return text


def find_tarball(data_dir: str | Path) -> Path | None:
    """The first existing candidate among ``data_dir`` (a file) and the tarball names under it, or ``None``."""
    for path in tarball_candidates(data_dir):
        if path.is_file():
            return path
    return None


def tarball_candidates(data_dir: str | Path) -> list[Path]:
    """Where :func:`find_tarball` looks, in order."""
    d = Path(data_dir).expanduser()
    return [d, d / TARBALL_NAME, d / "20newsgroups" / TARBALL_NAME, d / "20news_home" / TARBALL_NAME]


def read_tarball(path: str | Path) -> Documents:
    """Read every document of a bydate tarball, decoded as latin-1, sorted by (group, file name).

    Raises:
        ValueError: if the archive holds no ``20news-bydate-{train,test}/<group>/<id>`` files.
        DataFileError: if the file is not a readable (gzipped) tar archive: corrupt or truncated. The message
            names it, its expected checksum when a ``SHA256SUMS`` lists it, and what to do.
    """
    docs: dict[str, list[tuple[str, str, str]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                if len(parts) != 3 or parts[0] not in ("20news-bydate-train", "20news-bydate-test"):
                    continue
                split = parts[0].rsplit("-", 1)[1]
                f = tar.extractfile(member)
                if f is None:
                    continue
                docs[split].append((parts[1], parts[2], f.read().decode("latin-1")))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataFileError(
            f"{path} is not a readable 20 Newsgroups tarball, it is corrupt or truncated "
            f"({type(err).__name__}: {err}); {checksum_hint(path)}"
        ) from err
    if not docs["train"] and not docs["test"]:
        raise ValueError(f"{path} holds no 20news-bydate-{{train,test}}/<group>/<id> files")
    return {split: [(g, text) for g, _, text in sorted(items, key=lambda t: t[:2])] for split, items in docs.items()}


def sklearn_cache_path(data_home: str | Path | None) -> Path:
    """Where scikit-learn keeps its 20 Newsgroups cache, resolved like ``get_data_home`` but creating nothing."""
    home = data_home if data_home is not None else os.environ.get("SCIKIT_LEARN_DATA", "~/scikit_learn_data")
    return Path(home).expanduser() / SKLEARN_CACHE_NAME


def read_sklearn(data_home: str | Path | None, download: bool) -> Documents:
    """Read both splits from scikit-learn's 20 Newsgroups cache (downloading only if ``download``).

    Raises:
        FileNotFoundError: if the cache is missing and ``download`` is false.
    """
    cache = sklearn_cache_path(data_home)
    if not download and not cache.is_file():
        raise FileNotFoundError(
            f"scikit-learn's 20 Newsgroups cache not found in data_home={cache.parent} (expected {cache}); set "
            f"download: true to let scikit-learn fetch it, or use source: tarball with a {TARBALL_NAME}"
        )
    from sklearn.datasets import fetch_20newsgroups

    docs: Documents = {}
    for split in ("train", "test"):
        bunch = fetch_20newsgroups(
            data_home=data_home, subset=split, shuffle=False, download_if_missing=download, remove=()
        )
        names = list(bunch.target_names)
        # the cache is in load_files' shuffled order: restore the (group, file name) order of read_tarball
        items = [
            (names[t], Path(f).name, text) for t, f, text in zip(bunch.target, bunch.filenames, bunch.data, strict=True)
        ]
        docs[split] = [(g, text) for g, _, text in sorted(items, key=lambda t: t[:2])]
    return docs


class NewsgroupsDataModule(ClassificationDataModule):
    """20 Newsgroups "bydate" (11,314 train and 7,532 test posts, 20 groups) as token id sequences.

    Each post is decoded as latin-1, optionally stripped of headers/footers/quotes with scikit-learn's
    own functions, lowercased and split into words (:func:`tokenize`). The vocabulary is built on the
    training split only (after the validation posts are held out, over whole posts): ``<pad>`` = 0,
    ``<unk>`` = 1, then the ``vocab_size - 2`` most frequent words, so ``vocab_size`` is exactly the
    embedding size. Other words, including every word seen only in validation or test, map to ``<unk>``.
    Sequences are cut to the first ``max_len`` tokens and padded with 0 at the end; an empty post becomes
    the single ``<unk>``.
    Batches: ``x`` int64 ``[B, max_len]``, ``y`` int64 ``[B]``.

    Labels index the alphabetically sorted group names (scikit-learn's ``target_names``), i.e.
    :data:`NEWSGROUPS`, or the sorted ``categories`` when given.

    The official training set, optionally cut to ``train_subset`` random posts first, is split into
    train and validation with ``ceil(val_fraction * n)`` posts in validation, stratified by label and
    deterministic given ``seed`` (10,182 / 1,132 with the defaults). The test set is the official one,
    optionally cut to ``test_subset`` posts.

    Args:
        data_dir: the tarball itself or a directory holding it (see the module docstring for where it looks).
        source: ``"tarball"``, ``"sklearn"`` (scikit-learn's cache at ``sklearn_data_home``), or ``"auto"``:
            the tarball if found, else scikit-learn's cache.
        sklearn_data_home: scikit-learn's ``data_home``; ``None`` uses its default (``~/scikit_learn_data``
            or ``$SCIKIT_LEARN_DATA``).
        download: let scikit-learn download the data when its cache is missing. When false, the network is
            never used.
        remove: parts of each post to strip, any of ``"headers"``, ``"footers"``, ``"quotes"``.
        categories: keep only these groups (labels then index their sorted list); ``None`` keeps all 20.
        vocab_size: embedding size including ``<pad>`` and ``<unk>``, at least 3.
        max_len: tokens per sequence.
        batch_size: examples per batch.
        num_workers: ``DataLoader`` worker processes.
        val_fraction: share of the (subset of the) training set held out for validation, in (0, 1).
        train_subset: use only this many training posts (drawn at random given ``seed``, before the
            train/val split); ``None`` uses all.
        test_subset: use only this many test posts (drawn at random given ``seed``); ``None`` uses all.
        seed: seed of the subsets and of the train/val split.

    Raises:
        ValueError: on an unknown ``source``, ``remove`` entry or category, ``vocab_size`` < 3, or another
            out-of-range number.
        FileNotFoundError: from ``prepare_data``/``setup``, if no source has the data; the message lists
            where it looked and how to get the files.

    Example::

        dm = NewsgroupsDataModule(data_dir="data/20newsgroups", remove=["headers"], max_len=128)
        dm.setup("fit")
        x, y = next(iter(dm.train_dataloader()))  # x: [64, 128] int64, y: [64] int64
        padding_mask = x == dm.pad_id
    """

    def __init__(
        self,
        data_dir: str | Path = "data",
        source: Source = "auto",
        sklearn_data_home: str | None = None,
        download: bool = False,
        remove: Sequence[RemoveKind] = (),
        categories: list[str] | None = None,
        vocab_size: int = 20000,
        max_len: int = 256,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.data_dir = Path(data_dir).expanduser()
        self.source = check_choice("source", source, SOURCES)
        self.sklearn_data_home = sklearn_data_home
        self.download = bool(download)
        remove_list = [remove] if isinstance(remove, str) else list(remove)
        self.remove = tuple(check_choice("remove entry", r, REMOVE_KINDS) for r in remove_list)
        if categories is not None:
            if isinstance(categories, str) or not categories:
                raise ValueError(f"categories={categories!r} must be a non-empty list of group names or None")
            for c in categories:
                check_choice("category", c, NEWSGROUPS)
            self.categories: tuple[str, ...] = tuple(sorted(set(categories)))
        else:
            self.categories = NEWSGROUPS
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(SPECIALS) + 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be an integer >= 3 (<pad>, <unk> and one word)")
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.train_subset = check_optional_positive_int("train_subset", train_subset)
        self.test_subset = check_optional_positive_int("test_subset", test_subset)
        self.num_classes = len(self.categories)
        self.input_kind = "tokens"
        self.vocab_size = vocab_size
        self.max_len = check_positive_int("max_len", max_len)
        self.vocab: dict[str, int] = {}
        self.save_hyperparameters()

    def _missing_message(self) -> str:
        looked = ", ".join(str(p) for p in tarball_candidates(self.data_dir))
        return (
            f"20 Newsgroups not found (source={self.source!r}): no {TARBALL_NAME} at {looked}, and no "
            f"scikit-learn cache {sklearn_cache_path(self.sklearn_data_home)}. Put the tarball at data_dir "
            f"(or data_dir/{TARBALL_NAME}), point sklearn_data_home at a scikit-learn cache, "
            f"or set download: true to let scikit-learn fetch it."
        )

    def load_documents(self) -> Documents:
        """Read ``{"train": [(group, text), ...], "test": [...]}`` from the configured source (raw text).

        Raises:
            FileNotFoundError: if the chosen source (or, for ``"auto"``, every source) lacks the data.
        """
        if self.source in ("auto", "tarball"):
            tarball = find_tarball(self.data_dir)
            if tarball is not None:
                return read_tarball(tarball)
            if self.source == "tarball":
                looked = ", ".join(str(p) for p in tarball_candidates(self.data_dir))
                raise FileNotFoundError(
                    f"{TARBALL_NAME} not found; looked at {looked}. Copy the 20 Newsgroups bydate tarball "
                    f"there, or use source: sklearn (with download: true to fetch it)."
                )
        try:
            return read_sklearn(self.sklearn_data_home, self.download)
        except FileNotFoundError as err:
            if self.source == "auto":
                raise FileNotFoundError(self._missing_message()) from err
            raise

    @override
    def prepare_data(self) -> None:
        """With ``download=True`` and no tarball, let scikit-learn download its cache (once per node)."""
        if self.download and not (self.source != "sklearn" and find_tarball(self.data_dir) is not None):
            read_sklearn(self.sklearn_data_home, download=True)

    @override
    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        docs = self.load_documents()
        label_of = {g: i for i, g in enumerate(self.categories)}
        splits: dict[str, tuple[list[list[str]], np.ndarray]] = {}
        for split, subset_size in (("train", self.train_subset), ("test", self.test_subset)):
            unknown = sorted({g for g, _ in docs[split]} - set(NEWSGROUPS))
            if unknown:
                raise ValueError(f"unknown newsgroups {unknown} in the {split} data; expected names from {NEWSGROUPS}")
            items = [(label_of[g], text) for g, text in docs[split] if g in label_of]
            if not items:
                raise ValueError(f"no {split} documents for categories {self.categories}")
            keep = random_subset(len(items), subset_size, self.seed)
            labels = np.array([items[i][0] for i in keep], dtype=np.int64)
            tokens = [tokenize(strip_text(items[i][1], self.remove)) for i in keep]
            splits[split] = (tokens, labels)
        train_tokens, train_labels = splits["train"]
        tr, va = stratified_split(train_labels, self.val_fraction, self.seed)
        self.vocab = build_vocab((train_tokens[i] for i in tr), self.vocab_size)

        def dataset(tokens: Sequence[Sequence[str]], labels: np.ndarray) -> TensorDataset:
            x = pad_sequences([encode(t[: self.max_len], self.vocab) for t in tokens], self.max_len, PAD_ID)
            return TensorDataset(x, torch.as_tensor(labels, dtype=torch.long))

        test_tokens, test_labels = splits["test"]
        return (
            dataset([train_tokens[i] for i in tr], train_labels[tr]),
            dataset([train_tokens[i] for i in va], train_labels[va]),
            dataset(test_tokens, test_labels),
        )
