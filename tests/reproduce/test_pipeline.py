"""The reproduction pipeline end to end on generated data: paper configs -> runs -> report (with a missing run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pdelightning.reproduce.run import CONFIG_DIR, SETTINGS, command, main
from tests.helpers.tb import scalar_tags
from tests.test_cli import fake_mnist, fake_newsgroups


def test_every_setting_has_a_config_and_references_come_first() -> None:
    names = [s.name for s in SETTINGS]
    for s in SETTINGS:
        cfg = yaml.safe_load((CONFIG_DIR / s.config).read_text())
        assert cfg["trainer"]["logger"]["init_args"]["name"] == s.name
        if s.reference is not None:
            assert names.index(s.reference) < names.index(s.name)


def test_reference_callbacks_are_appended_with_the_same_seed_checkpoint(tmp_path: Path) -> None:
    pde = next(s for s in SETTINGS if s.name == "mnist_pde")
    cmd = command(pde, 2, tmp_path, tmp_path / "data", quick=False, extra=[])
    ckpt = tmp_path / "mnist_transformer" / "seed2" / "checkpoints" / "last.ckpt"
    assert cmd.count(f"--trainer.callbacks.reference_checkpoint={ckpt}") == 2
    assert "--trainer.callbacks+=pdelightning.callbacks.AttentionSimilarity" in cmd


def test_quick_pipeline_names_missing_runs(tmp_path: Path) -> None:
    mnist, news = fake_mnist(tmp_path / "mnist", n_train=96), fake_newsgroups(tmp_path / "news", per_group=40)
    out = tmp_path / "runs"
    code = main([
        "--out", str(out), "--mnist-dir", str(mnist), "--newsgroups-dir", str(news), "--seeds", "0", "--quick",
        "--settings", "mnist_transformer", "mnist_pde", "newsgroups_pde",
        "--", "--model.model.init_args.n_layers=2",
    ])  # fmt: skip
    assert code == 0
    for name in ("mnist_transformer", "mnist_pde", "newsgroups_pde"):
        meta = json.loads((out / name / "seed0" / "run.json").read_text())
        assert meta["completed"], (out / name / "seed0" / "train.log").read_text()[-3000:]
    # the PDE run compared itself with the Transformer checkpoint of the same seed
    tags = scalar_tags(out / "mnist_pde" / "seed0")
    assert "analysis/attention_similarity/cosine/mean" in tags
    assert "analysis/information_flow/pearson_vs_reference/blocks.0" in tags
    assert "analysis/layer_mutual_information/I_TY/blocks.0" in scalar_tags(out / "newsgroups_pde" / "seed0")
    report = (out / "report" / "REPRODUCTION.md").read_text()
    assert "newsgroups_transformer" in report and "missing" in report.lower()
    for png in (out / "report" / "figures").glob("*.png"):
        assert png.stat().st_size <= 200_000


@pytest.mark.parametrize("bad", [["--settings", "mnist_tranformer"], ["--seeds", "x"]])
def test_bad_arguments_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(bad)
    assert "invalid" in capsys.readouterr().err
