"""Every callback bundle in callbacks/ composes with an experiment config and runs; paper configs instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import pdelightning.callbacks
from pdelightning.cli import build_cli
from pdelightning.plugin import CALLBACK_NAMES, GROUPS, LENS_NAMES
from tests.helpers.configs import CONFIGS, REPRO_CONFIGS, bare_quickstart
from tests.test_cli import fake_mnist, fake_newsgroups

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted((CONFIGS / "callbacks").glob("*.yaml"))
PAPER = sorted(REPRO_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.stem)
def test_bundle_appends_and_runs(bundle: Path, tmp_path: Path) -> None:
    content = yaml.safe_load(bundle.read_text())
    assert list(content["trainer"]) == ["callbacks+"], "bundles must append (callbacks+), never replace"
    cli = build_cli([
        "fit", "-c", str(bare_quickstart(tmp_path)), "-c", str(bundle), "--trainer.fast_dev_run=2",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--model.model.init_args.n_layers=2",
    ])  # fmt: skip
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    expected = [e["class_path"].rsplit(".", 1)[1] for e in content["trainer"]["callbacks+"]]
    assert all(n in names for n in expected)
    assert "ModelCheckpoint" in names  # the config's own callback was kept
    assert cli.trainer.state.finished


def test_all_bundle_holds_every_callback() -> None:
    content = yaml.safe_load((CONFIGS / "callbacks/all.yaml").read_text())
    names = [e["class_path"].rsplit(".", 1)[1] for e in content["trainer"]["callbacks+"]]
    assert names == list(CALLBACK_NAMES + LENS_NAMES) == list(GROUPS["all"])
    assert set(names) == set(pdelightning.callbacks.__all__) - {"TargetNotFoundError", "ProbeCallback"}


@pytest.mark.parametrize("config", PAPER, ids=lambda p: p.stem)
def test_paper_config_instantiates(config: Path, tmp_path: Path) -> None:
    data = fake_mnist(tmp_path / "m") if config.stem.startswith("mnist") else fake_newsgroups(tmp_path / "n")
    cli = build_cli(["-c", str(config), f"--data.init_args.data_dir={data}"], run=False)
    assert cli.model.model.num_classes == cli.datamodule.num_classes
    assert any(type(c).__module__.startswith("pdelightning.callbacks") for c in cli.trainer.callbacks)
