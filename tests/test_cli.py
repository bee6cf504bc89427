"""Every experiment config runs through the CLI (``fast_dev_run``) on generated stand-in data."""

from __future__ import annotations

import gzip
import importlib
import inspect
import io
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from pdelightning.cli import build_cli
from pdelightning.models import PDEClassifier, TransformerClassifier
from tests.helpers.configs import CONFIGS as PACKAGED
from tests.helpers.configs import REPRO_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(PACKAGED.glob("*.yaml"))


def fake_mnist(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """``root/MNIST/raw`` with the four gzipped IDX files (random digits), as torchvision expects them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, magic, shape in (("images-idx3", 2051, (n, 28, 28)), ("labels-idx1", 2049, (n,))):
            arr = rng.integers(0, 10 if kind.startswith("labels") else 256, size=shape, dtype=np.uint8)
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in shape)
            with gzip.open(raw / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())
    return root


NEWSGROUPS = ("alt.atheism", "rec.autos", "sci.space")


def fake_newsgroups(root: Path, per_group: int = 8) -> Path:
    """A bydate-layout ``20news-bydate.tar.gz`` with a few short posts per group."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "20news-bydate.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for g, group in enumerate(NEWSGROUPS):
                for i in range(per_group):
                    body = f"From: a@b.c\nSubject: s\n\nword{g} topic{g} common text number{i}\n".encode("latin-1")
                    info = tarfile.TarInfo(f"20news-bydate-{split}/{group}/{1000 * g + i}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    return root


def test_every_config_is_listed() -> None:
    names = {p.name for p in CONFIGS}
    expected = {
        "quickstart.yaml",
        "mnist_transformer.yaml",
        "mnist_pde.yaml",
        "newsgroups_transformer.yaml",
        "newsgroups_pde.yaml",
        "mnist_transformer_no_residual.yaml",
        "mnist_transformer_no_layernorm.yaml",
        "newsgroups_transformer_no_residual.yaml",
        "newsgroups_transformer_no_layernorm.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs(config: Path, tmp_path: Path) -> None:
    data_cls = yaml.safe_load(config.read_text())["data"]["class_path"]
    args = ["fit", "-c", str(config), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]  # fmt: skip
    if data_cls.startswith("MNIST"):
        args.append(f"--data.init_args.data_dir={fake_mnist(tmp_path / 'mnist')}")
    elif data_cls.startswith("Newsgroups"):
        args += [f"--data.init_args.data_dir={fake_newsgroups(tmp_path / 'news')}", "--data.init_args.max_len=24",
                 "--data.init_args.vocab_size=64"]  # fmt: skip
    cli = build_cli(args)
    assert cli.trainer.state.finished
    model, data = cli.model.model, cli.datamodule
    assert model.num_classes == data.num_classes
    assert isinstance(model, (TransformerClassifier, PDEClassifier))
    if data.input_kind == "tokens":
        assert model.embed.n_tokens == data.max_len and model.embed.proj.num_embeddings == data.vocab_size
    else:
        assert model.embed.image_size == data.image_size


ALL_CONFIGS = CONFIGS + sorted(REPRO_CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_optimizer_gets_its_own_defaults_plus_what_the_config_says(config: Path) -> None:
    # jsonargparse #460: a default optimizer class's arguments leak into the class a config selects (an AdamW
    # default gave `class_path: torch.optim.Adam` weight_decay=0.01, which stopped 20 Newsgroups from learning).
    spec = yaml.safe_load(config.read_text())["model"]["optimizer"]
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    expected = {k: p.default for k, p in inspect.signature(cls).parameters.items() if k != "params"}
    expected.update(spec.get("init_args", {}))
    cli = build_cli(["-c", str(config), "--trainer.accelerator=cpu"], run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert type(optimizer) is cls
    got = optimizer.defaults
    for key in ("lr", "weight_decay", "betas", "eps"):
        if key in expected:
            assert got[key] == pytest.approx(expected[key]), f"{key}: {got[key]} != {expected[key]}"


def test_task_default_optimizer_is_adamw_with_its_defaults() -> None:
    from pdelightning.task import ClassificationTask

    task = ClassificationTask(TransformerClassifier(num_classes=10, d_model=16, n_heads=2, image_size=8))
    optimizer = task.configure_optimizers()
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["weight_decay"] == 0.01


def test_ablation_configs_switch_what_they_say() -> None:
    for name, key, value in (("no_residual", "residual", False), ("no_layernorm", "norm", "none")):
        for data in ("mnist", "newsgroups"):
            cfg = yaml.safe_load((PACKAGED / f"{data}_transformer_{name}.yaml").read_text())
            assert cfg["model"]["model"]["init_args"][key] == value


def test_missing_dataset_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        build_cli(["fit", "-c", str(PACKAGED / "mnist_pde.yaml"), "--trainer.fast_dev_run=1",
                   f"--data.init_args.data_dir={tmp_path / 'nowhere'}"])  # fmt: skip


def test_bad_choice_is_rejected_with_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_cli(["fit", "-c", str(PACKAGED / "quickstart.yaml"), "--model.model.init_args.norm=sideways"], run=False)
    err = capsys.readouterr().err
    assert "sideways" in err and "pre" in err and "post" in err


def test_print_config_and_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pdelightning", "fit", "-c", str(PACKAGED / "quickstart.yaml"), "--print_config"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    cfg = yaml.safe_load(out)
    assert cfg["model"]["model"]["class_path"] == "pdelightning.models.TransformerClassifier"
    assert cfg["data"]["class_path"] == "pdelightning.data.DigitsDataModule"


def _unstable_args(save_dir: Path) -> list[str]:
    return ["fit", "-c", str(PACKAGED / "quickstart.yaml"), "-c", str(PACKAGED / "callbacks/stability_monitor.yaml"),
            "--trainer.callbacks.action=stop", "--trainer.callbacks.check_every_n_steps=1",
            "--model.optimizer.init_args.lr=1e6", "--trainer.max_steps=8", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={save_dir}"]  # fmt: skip


def _assert_unstable_outcome(code: int, last_line: str, save_dir: Path) -> None:
    import torch

    from pdelightning.cli import EXIT_UNSTABLE

    assert code == EXIT_UNSTABLE
    assert last_line.startswith("error: training stopped at step ") and "as unstable: StabilityMonitor:" in last_line
    assert "non-finite" in last_line and "not saved" in last_line
    ckpts = list(save_dir.rglob("*.ckpt"))
    for ckpt in ckpts:  # whatever was written holds only finite tensors
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
    if not ckpts:  # lr=1e6 makes the weights non-finite at the first step: no finite state ever existed
        assert "no finite checkpoint was written before" in last_line


def test_unstable_run_exits_3_with_the_reason_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pdelightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(_unstable_args(tmp_path))
    out = capsys.readouterr()
    last = [line for line in (out.out + out.err).splitlines() if line.strip()][-1]
    _assert_unstable_outcome(exit_.value.code, last, tmp_path)


@pytest.mark.slow
def test_unstable_run_console_script(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pdelightning", *_unstable_args(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    _assert_unstable_outcome(proc.returncode, last, tmp_path)
