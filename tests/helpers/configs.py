"""Configs for tests that compose their own analysis callbacks with the quickstart's training set-up."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
#: the configs and callback bundles that ship inside the package, and the reproduction's experiment configs
CONFIGS = ROOT / "pdelightning" / "configs"
REPRO_CONFIGS = ROOT / "pdelightning_reproduce" / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


def bare_quickstart(directory: Path) -> Path:
    """``configs/quickstart.yaml`` without its analysis callbacks (its ModelCheckpoint kept), written into
    ``directory``: the quickstart attaches all nine, and a test that composes a bundle with it would run each twice.
    """
    config = yaml.safe_load(QUICKSTART.read_text())
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].startswith("pdelightning.")]
    assert len(config["trainer"]["callbacks"]) < len(callbacks), "the quickstart attaches no analysis any more"
    path = Path(directory) / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
