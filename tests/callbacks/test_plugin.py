"""The opt-in plugin: PDELIGHTNING_CALLBACKS attaches the callbacks to a plain Lightning script."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as L
import pytest

from pdelightning.callbacks import GradientFlow, InformationFlow, PerturbationEval, StabilityMonitor
from pdelightning.plugin import CALLBACK_NAMES, ENV_VAR, LENS_NAMES, build_callbacks, callbacks_factory
from tests.helpers.configs import CONFIGS
from tests.helpers.tb import scalar_tags

ROOT = Path(__file__).resolve().parents[2]

PLAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    sys.path.insert(0, {root!r})
    from tests.helpers.models import our_task, image_loaders

    train, val = image_loaders()
    trainer = L.Trainer(max_epochs=1, logger=TensorBoardLogger({log_dir!r}), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(our_task("pde"), train, val)
    print("CALLBACKS", sorted(type(c).__name__ for c in trainer.callbacks))
    """
)


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert callbacks_factory() == []
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not any(type(c).__module__.startswith("pdelightning") for c in trainer.callbacks)


def test_names_all_and_yaml(tmp_path: Path) -> None:
    assert [type(c) for c in build_callbacks("gradient_flow, StabilityMonitor")] == [GradientFlow, StabilityMonitor]
    assert [type(c).__name__ for c in build_callbacks("all")] == list(CALLBACK_NAMES + LENS_NAMES)
    assert [type(c).__name__ for c in build_callbacks("paper")] == list(CALLBACK_NAMES)
    assert [type(c).__name__ for c in build_callbacks("lens,gradient_flow")] == [*LENS_NAMES, "GradientFlow"]
    bundle = build_callbacks(str(CONFIGS / "callbacks/all.yaml"))
    assert [type(c).__name__ for c in bundle] == list(CALLBACK_NAMES + LENS_NAMES)
    assert all(c.on_missing == "warn" for c in bundle)  # attached by the plugin: never kill the user's run
    cfg = tmp_path / "cbs.yaml"
    cfg.write_text(
        "- class_path: pdelightning.callbacks.PerturbationEval\n  init_args:\n    epsilons: [0.01, 0.1]\n"
        "- InformationFlow\n"
    )
    pe, inf = build_callbacks(str(cfg))
    assert isinstance(pe, PerturbationEval) and list(pe.epsilons) == [0.01, 0.1]
    assert isinstance(inf, InformationFlow)


def test_bad_spec_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown callback 'gradient_flw'.*gradient_flow"):
        build_callbacks("gradient_flw")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        build_callbacks(str(tmp_path / "missing.yaml"))


def test_env_var_attaches_callbacks_to_a_plain_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    log_dir = tmp_path / "logs"
    script.write_text(PLAIN_SCRIPT.format(root=str(ROOT), log_dir=str(log_dir)))
    env = {**os.environ, ENV_VAR: "gradient_flow,stability_monitor", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GradientFlow" in proc.stdout and "StabilityMonitor" in proc.stdout
    tags = scalar_tags(log_dir)
    assert any(t.startswith("analysis/gradient_flow/") for t in tags)
    assert any(t.startswith("analysis/stability_monitor/") for t in tags)


def test_the_entry_point_names_the_plugin() -> None:
    """pyproject's ``lightning.pytorch.callbacks_factory`` entry point resolves to this factory (a stale path would
    make every ``Trainer()`` of an installed pdelightning fail to import it)."""
    import importlib
    import re

    header = '[project.entry-points."lightning.pytorch.callbacks_factory"]'
    section = (ROOT / "pyproject.toml").read_text().split(header)
    assert len(section) == 2, "pyproject.toml has no lightning.pytorch.callbacks_factory entry point"
    entry = re.search(r'^pdelightning\s*=\s*"(?P<value>[^"]+)"', section[1], re.MULTILINE)
    assert entry is not None
    module, _, name = entry["value"].partition(":")
    assert getattr(importlib.import_module(module), name) is callbacks_factory
