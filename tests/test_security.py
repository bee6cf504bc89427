"""Data is never code: a malicious checkpoint or class_path, through every entry point, creates nothing.

Each attack would create a marker file if any of its code ran: a pickle whose ``__reduce__`` calls ``os.system``
(``touch MARKER``), and a ``class_path: subprocess.Popen`` whose ``init_args`` run ``touch MARKER``. Every test
asserts the marker does not exist afterwards and that the refusal names the global or class (exit 2 with one
``error:`` line on the command line, a clear exception in Python). As a control, the same pickle loaded with the
explicit ``trust`` switch does create the marker, so the marker is a real detector.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from pdelightning.callbacks._reference import load_reference
from pdelightning.checkpointing import AtomicCheckpointIO, CorruptCheckpointError, load_checkpoint_file, readable
from pdelightning.cli import EXIT_BAD_INPUT, main
from pdelightning.plugin import ENV_VAR, build_callbacks
from pdelightning.trust import UntrustedClassError, UntrustedFileError, blocked_global, load_data_file
from tests.helpers.configs import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(CONFIGS / "quickstart.yaml")


class _Evil:
    """Pickles to ``os.system("touch <marker>")``: loading it with ``weights_only=False`` creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path, **extra: object) -> Path:
    """A Lightning-looking checkpoint (``state_dict``, ``global_step``) with a code-running object inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {}, **extra, "x": _Evil(marker)}, path)
    return path


@pytest.fixture
def attack(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return evil_checkpoint(tmp_path / "evil" / "last.ckpt", marker), marker


def _popen_yaml(marker: Path) -> str:
    return f"class_path: subprocess.Popen\ninit_args:\n  args: [touch, {marker}]\n"


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def _quick(tmp: Path, *extra: str) -> list[str]:
    logs = f"--trainer.logger.init_args.save_dir={tmp / 'logs'}"
    return ["fit", "-c", QUICK, *extra, "--trainer.max_steps=1", "--trainer.limit_val_batches=1", logs]


# ---- the detector works --------------------------------------------------------------------------------------------
def test_marker_detects_code_execution_when_trusted(attack: tuple[Path, Path]) -> None:
    path, marker = attack
    load_data_file(path, trust=True)  # the explicit opt-in runs the pickle: proves the marker is a real detector
    assert marker.exists()


# ---- malicious checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_loader_refuses_naming_the_global(attack: tuple[Path, Path]) -> None:
    path, marker = attack
    for load in (
        lambda: load_data_file(path),
        lambda: load_checkpoint_file(path),
        lambda: load_checkpoint_file(path, weights_only=None, mmap=True),
        lambda: AtomicCheckpointIO().load_checkpoint(path),
    ):
        with pytest.raises(
            UntrustedFileError, match=r"contains a non-allowed object posix\.system.*weights_only false"
        ):
            load()
    assert readable(path) == (False, None)  # never offered as the checkpoint to resume from
    assert not marker.exists()


def test_corrupt_is_still_called_corrupt_and_a_foreign_file_is_not_offered(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}, "global_step": 5}, tmp_path / "epoch=0-step=5.ckpt")
    os.utime(tmp_path / "epoch=0-step=5.ckpt", (1, 1))  # older than the foreign file
    evil_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "MARKER")
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptCheckpointError, match=r"truncated or corrupt.*--ckpt_path .*epoch=0-step=5\.ckpt"):
        load_checkpoint_file(path)
    assert not (tmp_path / "MARKER").exists()


def test_cli_ckpt_path_exits_2_and_names_the_global(
    attack: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = attack
    code, last = _run_cli(_quick(tmp_path, f"--ckpt_path={path}"), capsys)
    assert code == EXIT_BAD_INPUT, last
    assert last.startswith("error:") and "contains a non-allowed object posix.system" in last, last
    assert "--weights_only false" in last and "truncated" not in last
    assert not marker.exists()
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("version_*"))


@pytest.mark.parametrize("with_config", [False, True], ids=["checkpoint-only", "config+checkpoint"])
def test_reference_checkpoint_refused(attack: tuple[Path, Path], tmp_path: Path, with_config: bool) -> None:
    path, marker = attack
    config = None
    if with_config:
        config = tmp_path / "ref.yaml"
        config.write_text("model:\n  class_path: torch.nn.Linear\n  init_args: {in_features: 2, out_features: 2}\n")
    with pytest.raises(UntrustedFileError, match=r"posix\.system.*trust_checkpoint=True"):
        load_reference(nn.Linear(2, 2), str(config) if config else None, str(path), None, "AttentionSimilarity")
    assert not marker.exists()


def test_reference_checkpoint_through_the_cli(
    attack: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = attack
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        "trainer:\n  callbacks+:\n    - class_path: pdelightning.callbacks.InformationFlow\n"
        f"      init_args: {{reference_checkpoint: {path}, probe_size: 16}}\n"
    )
    code, last = _run_cli(_quick(tmp_path, "-c", str(bundle)), capsys)
    assert code == EXIT_BAD_INPUT, last
    assert "contains a non-allowed object posix.system" in last and "trust_checkpoint=True" in last, last
    assert not marker.exists()
    assert not any((tmp_path / "logs").rglob("version_*"))


def test_reproduction_loaders_refuse(tmp_path: Path) -> None:
    from pdelightning_reproduce.analyze import checkpoints
    from pdelightning_reproduce.recorder import CKPT_DIR, FINAL, load_model, read_payload

    marker = tmp_path / "MARKER"
    final = evil_checkpoint(tmp_path / "run" / CKPT_DIR / FINAL, marker, step=3)
    for load in (lambda: read_payload(final), lambda: load_model(final), lambda: checkpoints(tmp_path / "run")):
        with pytest.raises(UntrustedFileError, match=r"posix\.system"):
            load()
    assert not marker.exists()


def test_reproduction_model_class_is_type_checked(tmp_path: Path) -> None:
    from pdelightning_reproduce.recorder import load_model

    marker = tmp_path / "MARKER"
    path = tmp_path / "final.pt"
    payload = {"step": 1, "epoch": 0, "model_class": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}
    torch.save({**payload, "state_dict": {}}, path)  # plain data: weights_only loads it; the class is the attack
    with pytest.raises(UntrustedClassError, match=r"'subprocess\.Popen' is not a Module subclass"):
        load_model(path)
    assert not marker.exists()


def test_blocked_global_reads_both_torch_wordings() -> None:
    import pickle

    assert blocked_global(pickle.UnpicklingError("Unsupported global: GLOBAL subprocess.Popen was not an allowed")) == (
        "subprocess.Popen"
    )
    assert blocked_global(pickle.UnpicklingError("Trying to load unsupported GLOBAL posix.system whose module")) == (
        "posix.system"
    )
    assert blocked_global(pickle.UnpicklingError("invalid load key, 'x'.")) is None


# ---- malicious class paths -----------------------------------------------------------------------------------------
def test_plugin_yaml_popen_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "MARKER"
    cfg = tmp_path / "cbs.yaml"
    cfg.write_text("- " + _popen_yaml(marker).replace("\n", "\n  ").rstrip() + "\n")
    with pytest.raises(UntrustedClassError, match=r"'subprocess\.Popen' is not a Callback subclass.*without calling"):
        build_callbacks(str(cfg))
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        f"trainer:\n  callbacks+:\n    - class_path: subprocess.Popen\n      init_args: {{args: [touch, {marker}]}}\n"
    )
    monkeypatch.setenv(ENV_VAR, str(bundle))
    import lightning.pytorch as L

    with pytest.raises(UntrustedClassError, match=r"subprocess\.Popen"):  # through Lightning's entry point
        L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not marker.exists()


def test_plugin_yaml_non_class_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "cbs.yaml"
    cfg.write_text(f"- class_path: os.system\n  init_args: {{command: touch {tmp_path / 'MARKER'}}}\n")
    with pytest.raises(UntrustedClassError, match=r"'os\.system' is not a Callback subclass \(it is a builtin"):
        build_callbacks(str(cfg))
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("where", ["top", "nested", "reference_class"])
def test_reference_config_popen_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "MARKER"
    config = tmp_path / "ref.yaml"
    class_path = None
    if where == "top":
        config.write_text("model:\n  " + _popen_yaml(marker).replace("\n", "\n  "))
    elif where == "nested":
        config.write_text("model:\n  model:\n    " + _popen_yaml(marker).replace("\n", "\n    "))
    else:
        config.write_text("model:\n  args: [touch, " + str(marker) + "]\n")
        class_path = "subprocess.Popen"
    with pytest.raises(UntrustedClassError, match=r"'subprocess\.Popen' is not a Module subclass"):
        load_reference(nn.Linear(2, 2), str(config), None, class_path, "AttentionSimilarity")
    assert not marker.exists()


def test_information_flow_reference_class_refused_at_init(tmp_path: Path) -> None:
    from pdelightning.callbacks import InformationFlow

    with pytest.raises(UntrustedClassError, match=r"'subprocess\.Popen' is not a LightningModule subclass"):
        InformationFlow(reference_checkpoint=str(tmp_path / "x.ckpt"), reference_class="subprocess.Popen")


def test_cli_bundle_popen_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The typed ``-c`` path already refused it; checked here so that every path agrees."""
    marker = tmp_path / "MARKER"
    bundle = tmp_path / "bundle.yaml"
    bundle.write_text(
        f"trainer:\n  callbacks+:\n    - class_path: subprocess.Popen\n      init_args: {{args: [touch, {marker}]}}\n"
    )
    code, last = _run_cli(_quick(tmp_path, "-c", str(bundle)), capsys)
    assert code == EXIT_BAD_INPUT and "subprocess.Popen" in last, last
    assert not marker.exists()


def test_own_checkpoints_still_load(tmp_path: Path) -> None:
    """The allow-list is enough for a checkpoint pdelightning writes (paths and namespaces in hyperparameters)."""
    import argparse

    path = tmp_path / "ok.ckpt"
    state = {"w": torch.arange(3.0)}
    torch.save({"state_dict": state, "hyper_parameters": {"dir": Path("/data"), "ns": argparse.Namespace(a=1)}}, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["state_dict"]["w"], state["w"]) and loaded["hyper_parameters"]["dir"] == Path("/data")
    assert loaded["hyper_parameters"]["ns"].a == 1


def test_cli_opt_in_is_what_the_message_says(
    attack: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The way out the refusal names (``--weights_only false``) is real: with it the pickle does run."""
    path, marker = attack
    _run_cli(_quick(tmp_path, f"--ckpt_path={path}", "--weights_only=false"), capsys)
    assert marker.exists()


def test_a_class_named_in_a_reference_checkpoint_is_type_checked(tmp_path: Path) -> None:
    """The checkpoint names the class that rebuilds it (pdelightning.trust.CHECKPOINT_CLASS_KEY): a class that is no
    LightningModule is refused before anything of it is called; with no class anywhere the message says what to give.
    """
    from pdelightning.callbacks._reference import load_reference_checkpoint
    from pdelightning.trust import CHECKPOINT_CLASS_KEY

    marker = tmp_path / "MARKER"
    path = tmp_path / "named.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"args": ["touch", str(marker)]},
            CHECKPOINT_CLASS_KEY: "subprocess.Popen",
        },
        path,
    )
    with pytest.raises(
        UntrustedClassError, match=r"reference_checkpoint's class='subprocess\.Popen' is not a LightningModule"
    ):
        load_reference(nn.Linear(2, 2), None, str(path), None, "AttentionSimilarity")
    assert not marker.exists()
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, plain)
    with pytest.raises(TypeError, match=r"does not name the LightningModule class.*give reference_class"):
        load_reference_checkpoint(plain, None, hint="")
