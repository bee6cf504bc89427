from __future__ import annotations

import codecs
import io
import os
import pickle
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pdelightning.data.newsgroups as ng
from pdelightning.data import NewsgroupsDataModule
from pdelightning.data.newsgroups import NEWSGROUPS, build_vocab, strip_text, tokenize

GROUPS = ["alt.atheism", "rec.autos", "sci.space"]  # the groups in conftest's tiny tarball
Docs = dict[str, dict[str, dict[str, str]]]


def make(data_dir: Path, **kwargs: object) -> NewsgroupsDataModule:
    kwargs = {"categories": GROUPS, "max_len": 16, "vocab_size": 100, "val_fraction": 1 / 6, **kwargs}
    dm = NewsgroupsDataModule(data_dir=data_dir, **kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def words(dm: NewsgroupsDataModule, row: torch.Tensor) -> list[str]:
    inv = {i: w for w, i in dm.vocab.items()}
    return [inv[i] for i in row.tolist() if i != dm.pad_id]


def test_tokenize_known_answer() -> None:
    expected = ["don't", "panic", "it's", "42", "snake", "case", "café"]
    assert tokenize("Don't PANIC: it's 42!  snake_case Café\n") == expected
    assert tokenize("  -- \n") == []


def test_build_vocab_known_answer() -> None:
    vocab = build_vocab([["b", "a", "c", "a"], ["c", "d", "b"]], vocab_size=5)
    # counts: a 2, b 2, c 2, d 1 -> ties broken alphabetically; only 3 words fit
    assert vocab == {"<pad>": 0, "<unk>": 1, "a": 2, "b": 3, "c": 4}


def test_strip_text_uses_sklearn_rules() -> None:
    text = "From: x\nSubject: hi\n\nbody line\n> quoted line\nJoe writes:\nmore body\n\n--\nsignature"
    assert strip_text(text, ()) == text
    assert strip_text(text, ("headers",)).startswith("body line")
    assert "signature" not in strip_text(text, ("footers",))
    no_quotes = strip_text(text, ("quotes",))
    assert "quoted line" not in no_quotes and "writes:" not in no_quotes and "more body" in no_quotes


def test_batches_and_known_rows(news_tarball: Path) -> None:
    dm = make(news_tarball.parent, remove=["headers"], batch_size=4)
    assert dm.num_classes == 3 and dm.vocab_size == 100 and dm.max_len == 16
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert y.shape == (4,) and y.dtype == torch.int64
    assert dm.vocab["common"] == 2  # the most frequent train word
    # test posts in (group, file) order: 900 "zebraquux god", 901 empty, 910 "car" x 50, 920 "orbit zebraquux"
    xt, yt = dm.test_dataset.tensors
    assert yt.tolist() == [0, 0, 1, 2]
    god, car, orbit = dm.vocab["god"], dm.vocab["car"], dm.vocab["orbit"]
    assert xt[0].tolist() == [1, god] + [0] * 14  # zebraquux (test only) -> <unk>
    assert xt[1].tolist() == [1] + [0] * 15  # empty post -> the single <unk>
    assert xt[2].tolist() == [car] * 16  # truncated to max_len, no padding
    assert xt[3].tolist() == [orbit, 1] + [0] * 14
    assert "zebraquux" not in dm.vocab
    assert "café" in dm.vocab  # latin-1 decoded


def test_token_invariants(news_tarball: Path) -> None:
    dm = make(news_tarball.parent, vocab_size=20)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        x, y = ds.tensors
        pad = x == dm.pad_id
        assert not pad[:, 0].any()  # at least one non-pad token
        assert torch.all(pad[:, 1:] >= pad[:, :-1])  # padding only at the end
        assert x.min() >= 0 and x.max() < dm.vocab_size
        assert y.min() >= 0 and y.max() < dm.num_classes
    assert len(dm.vocab) == 20


def test_header_removal_removes_header_lines(news_tarball: Path) -> None:
    with_headers = make(news_tarball.parent, vocab_size=1000)
    without = make(news_tarball.parent, vocab_size=1000, remove=("headers",))
    for w in ("headeronlyword", "subject", "organization", "from", "newsgroups"):
        assert w in with_headers.vocab
        assert w not in without.vocab
    # the empty test post 901 keeps its header tokens when headers are kept
    assert words(with_headers, with_headers.test_dataset.tensors[0][1])[:4] == ["from", "<unk>", "example", "org"]


def test_vocab_from_train_split_only(news_tarball: Path) -> None:
    dm = make(news_tarball.parent, vocab_size=1000, remove=("headers",))
    train_ids = {w for row in dm.train_dataset.tensors[0] for w in words(dm, row) if w.startswith("id")}
    assert len(train_ids) == 15
    # the validation posts' unique words were never seen by the vocabulary: they are <unk>
    for row in dm.val_dataset.tensors[0]:
        assert not any(w.startswith("id") for w in words(dm, row))
        assert "<unk>" in words(dm, row)
    assert "zebraquux" not in dm.vocab


def test_splits_disjoint_stratified_deterministic(news_tarball: Path, news_docs: Docs) -> None:
    def train_post_ids(dm: NewsgroupsDataModule) -> set[str]:
        return {w for row in dm.train_dataset.tensors[0] for w in words(dm, row) if re.fullmatch(r"id\d+", w)}

    dm = make(news_tarball.parent, vocab_size=1000, remove=("headers",))
    all_ids = {f"id{i}" for group in news_docs["train"].values() for i in group}
    train_ids = train_post_ids(dm)
    assert len(train_ids) == 15 and train_ids < all_ids  # the other 3 posts are the validation set
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (15, 3)
    assert sorted(dm.val_dataset.tensors[1].tolist()) == [0, 1, 2]  # stratified: one post per group
    again = make(news_tarball.parent, vocab_size=1000, remove=("headers",))
    assert train_post_ids(again) == train_ids
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        assert torch.equal(getattr(again, split).tensors[0], getattr(dm, split).tensors[0])
    others = [train_post_ids(make(news_tarball.parent, vocab_size=1000, remove=("headers",), seed=s)) for s in (1, 2)]
    assert any(o != train_ids for o in others)


def test_subsets(news_tarball: Path) -> None:
    dm = make(news_tarball.parent, train_subset=12, test_subset=2, val_fraction=0.25)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (9, 3, 2)


def test_all_groups_label_convention(news_tarball: Path) -> None:
    dm = make(news_tarball.parent, categories=None)
    assert dm.num_classes == 20
    assert dm.test_dataset.tensors[1].tolist() == [0, 0, 7, 14]  # indices into the sorted 20 names
    assert [NEWSGROUPS[i] for i in (0, 7, 14)] == GROUPS


def test_tarball_locations(news_tarball: Path, tmp_path: Path) -> None:
    expected = make(news_tarball.parent).test_dataset.tensors[0]
    assert torch.equal(make(news_tarball).test_dataset.tensors[0], expected)  # the file itself
    sub = tmp_path / "root" / "20newsgroups"
    sub.mkdir(parents=True)
    shutil.copy(news_tarball, sub / news_tarball.name)
    assert torch.equal(make(tmp_path / "root", source="tarball").test_dataset.tensors[0], expected)


def _write_sklearn_cache(tarball: Path, home: Path, tmp_path: Path) -> None:
    """Build scikit-learn's ``20news-bydate_py3.pkz`` from a tarball, as ``_download_20newsgroups`` does."""
    from sklearn.datasets import load_files
    from sklearn.datasets._base import _pkl_filepath

    extracted = tmp_path / "extracted"
    with tarfile.open(tarball) as tar:
        tar.extractall(extracted, filter="data")
    cache = {split: load_files(extracted / f"20news-bydate-{split}", encoding="latin1") for split in ("train", "test")}
    home.mkdir(parents=True, exist_ok=True)
    Path(_pkl_filepath(str(home), "20news-bydate.pkz")).write_bytes(codecs.encode(pickle.dumps(cache), "zlib_codec"))


def test_sklearn_source_matches_tarball(news_tarball: Path, tmp_path: Path) -> None:
    home = tmp_path / "skl"
    _write_sklearn_cache(news_tarball, home, tmp_path)
    assert (home / "20news-bydate_py3.pkz").is_file()
    a = make(news_tarball.parent, remove=("headers", "footers", "quotes"))
    b = make(tmp_path / "empty", source="sklearn", sklearn_data_home=str(home), remove=("headers", "footers", "quotes"))
    c = make(tmp_path / "empty", source="auto", sklearn_data_home=str(home), remove=("headers", "footers", "quotes"))
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        for other in (b, c):
            x1, y1 = getattr(a, split).tensors
            x2, y2 = getattr(other, split).tensors
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.vocab == b.vocab


def test_missing_tarball_error(tmp_path: Path) -> None:
    dm = NewsgroupsDataModule(data_dir=tmp_path / "nothing", source="tarball")
    where = re.escape(str(tmp_path / "nothing" / "20news-bydate.tar.gz"))
    with pytest.raises(FileNotFoundError, match=rf"20news-bydate.tar.gz not found; looked at .*{where}"):
        dm.setup("fit")


def test_missing_sklearn_cache_error(tmp_path: Path) -> None:
    home = tmp_path / "skl_home"
    dm = NewsgroupsDataModule(source="sklearn", sklearn_data_home=str(home))
    with pytest.raises(FileNotFoundError, match=rf"not found in data_home={re.escape(str(home))}.*download: true"):
        dm.setup("fit")


def test_missing_everything_error_names_both_places(tmp_path: Path) -> None:
    home = tmp_path / "skl_home"
    dm = NewsgroupsDataModule(data_dir=tmp_path / "nothing", sklearn_data_home=str(home))
    match = rf"{re.escape(str(tmp_path / 'nothing'))}.*{re.escape(str(home / '20news-bydate_py3.pkz'))}.*download: true"
    with pytest.raises(FileNotFoundError, match=match):
        dm.setup("fit")
    dm.prepare_data()  # download=False: nothing to do, and no network


def test_prepare_data_with_tarball_does_not_call_sklearn(news_tarball: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("scikit-learn fetch called")

    monkeypatch.setattr(ng, "read_sklearn", fail)
    dm = NewsgroupsDataModule(data_dir=news_tarball, download=True, categories=GROUPS)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.test_dataset) == 4


def test_unknown_group_in_tarball(tmp_path: Path, make_news_tarball: Callable[..., Path]) -> None:
    path = make_news_tarball(tmp_path / "bad.tar.gz", {"train": {"sci.spaceships": {"1": "x"}}, "test": {}})
    with pytest.raises(ValueError, match=r"unknown newsgroups \['sci.spaceships'\]"):
        NewsgroupsDataModule(data_dir=path).setup("fit")


def test_tarball_without_bydate_files(tmp_path: Path) -> None:
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="holds no 20news-bydate"):
        NewsgroupsDataModule(data_dir=path).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "web"}, r"source='web' is not one of \('auto', 'tarball', 'sklearn'\)"),
        ({"remove": ["signature"]}, r"remove entry='signature' is not one of \('headers', 'footers', 'quotes'\)"),
        ({"categories": ["sci.spaec"]}, r"category='sci.spaec' is not one of \('alt.atheism', "),
        ({"categories": []}, r"categories=\[\] must be a non-empty list"),
        ({"vocab_size": 2}, r"vocab_size=2 must be an integer >= 3"),
        ({"max_len": 0}, r"max_len=0 must be a positive integer"),
        ({"train_subset": 0}, r"train_subset=0 must be a positive integer"),
    ],
)
def test_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NewsgroupsDataModule(**kwargs)


def test_remove_accepts_a_single_string() -> None:
    assert NewsgroupsDataModule(remove="headers").remove == ("headers",)  # type: ignore[arg-type]


def test_no_files_read_in_init(tmp_path: Path) -> None:
    NewsgroupsDataModule(data_dir=tmp_path / "nothing", source="sklearn", sklearn_data_home=str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
