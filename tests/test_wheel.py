"""The wheel works away from the source tree: its YAML, both console commands and the plugin's entry point.

The wheel is built from a copy of the sources and unpacked into a folder that comes first on ``PYTHONPATH``, so
every import and every packaged file below comes from the wheel, not from this checkout; each command runs from a
directory that holds no configs.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.configs import CONFIGS, REPRO_CONFIGS, ROOT

USER_SCRIPT = """
import lightning.pytorch as L, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 6, 16, generator=g), torch.randint(0, 3, (64,), generator=g))
trainer = L.Trainer(max_steps=4, accelerator="cpu", val_check_interval=2, limit_val_batches=2,
                    enable_progress_bar=False, default_root_dir="out")
trainer.fit(Model(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
print("ATTACHED", sorted(type(c).__name__ for c in trainer.callbacks if type(c).__module__.startswith("pdelightning")))
"""


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources and unpacked into a folder (a stand-in for site-packages)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("pdelightning", "pdelightning_reproduce"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(work)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = work.glob("pdelightning-*.whl")
    site = work / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def _run(args: list[str], site: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(site), "PDELIGHTNING_CALLBACKS": "", **env}
    return subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_the_yaml_and_both_packages(wheel_site):
    shipped = {
        p.relative_to(wheel_site / "pdelightning" / "configs")
        for p in (wheel_site / "pdelightning" / "configs").rglob("*.yaml")
    }
    in_tree = {p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml")}
    assert shipped == in_tree and Path("quickstart.yaml") in shipped and Path("callbacks/all.yaml") in shipped
    repro = {p.name for p in (wheel_site / "pdelightning_reproduce" / "configs").glob("*.yaml")}
    assert repro == {p.name for p in REPRO_CONFIGS.glob("*.yaml")} and repro
    assert not (wheel_site / "tests").exists()
    (info,) = wheel_site.glob("pdelightning-*.dist-info")
    entry_points = configparser.ConfigParser()
    entry_points.read(info / "entry_points.txt")
    assert set(entry_points["console_scripts"]) == {"pdelightning", "pdelightning-reproduce"}
    assert "pdelightning" in entry_points["lightning.pytorch.callbacks_factory"]


def test_quickstart_with_analysis_runs_from_the_wheel_in_another_directory(wheel_site, tmp_path):
    done = _run(
        [
            sys.executable,
            "-m",
            "pdelightning",
            "fit",
            "-c",
            "configs/quickstart.yaml",
            "-c",
            "callbacks:gradient_flow",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=2",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ],
        wheel_site,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pdelightning" in (done.stdout + done.stderr)
    events = list((tmp_path / "logs" / "quickstart").rglob("events.out.tfevents.*"))
    assert events, "the packaged quickstart logs under ./logs of the directory it runs in"
    imported = _run([sys.executable, "-c", "import pdelightning; print(pdelightning.__file__)"], wheel_site, tmp_path)
    assert imported.stdout.strip().startswith(str(wheel_site)), imported.stdout


def test_the_plugin_attaches_to_a_user_script_from_the_wheel(wheel_site, tmp_path):
    (tmp_path / "train.py").write_text(USER_SCRIPT)
    done = _run([sys.executable, "train.py"], wheel_site, tmp_path, PDELIGHTNING_CALLBACKS="callbacks:all")
    assert done.returncode == 0, done.stderr[-3000:]
    attached = next(line for line in done.stdout.splitlines() if line.startswith("ATTACHED"))
    for name in ("AttentionSimilarity", "GradientFlow", "StabilityMonitor", "PDEFit", "RunReport"):
        assert name in attached, attached


def test_the_reproduction_command_runs_from_the_wheel(wheel_site, tmp_path):
    done = _run([sys.executable, "-m", "pdelightning_reproduce", "--help"], wheel_site, tmp_path)
    assert done.returncode == 0 and "train" in done.stdout, done.stderr[-2000:]
    moved = _run([sys.executable, "-m", "pdelightning", "reproduce", "all"], wheel_site, tmp_path)
    assert moved.returncode == 2 and "pdelightning-reproduce all" in moved.stderr
