"""Every Lightning private name pdelightning uses (pdelightning.compat) still exists in the installed Lightning.

An upgrade that renames one fails here, by name, instead of silently disabling an override or a fallback in a run.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from pdelightning import compat
from pdelightning.cli import PDELightningCLI

ROOT = Path(__file__).resolve().parents[1]


def _instances(tmp_path: Path) -> dict[str, Callable[[], Any]]:
    """How to build each ``X()`` owner of the table (an attribute set in ``__init__`` needs an instance)."""
    return {
        "lightning.pytorch.LightningModule()": L.LightningModule,
        "lightning.pytorch.Trainer()": lambda: L.Trainer(logger=False, enable_progress_bar=False, max_steps=1),
        "lightning.pytorch.loggers.TensorBoardLogger()": lambda: TensorBoardLogger(str(tmp_path)),
    }


def _owner(path: str, tmp_path: Path) -> Any:
    instances = _instances(tmp_path)
    if "()" in path:
        head, _, rest = path.partition("()")
        assert f"{head}()" in instances, f"tests/test_compat.py has no way to build {head}() for {path!r}"
        obj = instances[f"{head}()"]()
        for attr in filter(None, rest.split(".")):
            obj = getattr(obj, attr)
        return obj
    module, _, name = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("owner", "name"), compat.PRIVATE_NAMES, ids=[f"{o}:{n}" for o, n in compat.PRIVATE_NAMES])
def test_private_name_exists(owner: str, name: str, tmp_path: Path) -> None:
    if owner.endswith(" source"):
        source = inspect.getsource(importlib.import_module(owner.removesuffix(" source")))
        assert f'"{name}"' in source, f"{owner.removesuffix(' source')} no longer uses the key {name!r}"
        return
    assert hasattr(_owner(owner, tmp_path), name), f"Lightning has no {owner}.{name} any more: see pdelightning.compat"


def test_the_cli_overrides_exactly_the_listed_private_methods() -> None:
    """An override of a private LightningCLI method missing from the table would escape the check above."""
    ours = {name for name in vars(PDELightningCLI) if name.startswith("_") and not name.startswith("__")}
    assert {name for name in ours if hasattr(LightningCLI, name)} == set(compat.CLI_PRIVATE_OVERRIDES)


def test_no_lightning_private_name_outside_compat() -> None:
    """Only compat imports ``_``-names from lightning (the CLI's overrides are declared there and checked above)."""
    offenders = []
    for path in sorted((ROOT / "pdelightning").rglob("*.py")):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning":
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(part.startswith("_") for part in (node.module or "").split(".")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {private}")
    assert not offenders, "\n".join(offenders)


def test_fallbacks_when_a_private_name_is_gone(tmp_path: Path) -> None:
    """Each function does what its docstring promises on an object without the private name."""

    class Bare:
        pass

    bare = Bare()
    hparams = {"model": {"class_path": "a.B", "init_args": {"d": 2}}, "lr": 0.1}
    assert compat.should_update_logs(bare) is True
    assert compat.module_trainer(bare) is None
    assert compat.set_batches_that_stepped(bare, 3) is False
    compat.disable_default_hp_metric(bare)  # nothing to set, no error
    assert not hasattr(bare, "_default_hp_metric")
    assert compat.lightning_class_path({"_class_path": "a.B"}) == "a.B" and compat.lightning_class_path(None) is None
    (tmp_path / "last.ckpt").touch()
    (tmp_path / "last-v1.ckpt").touch()
    (tmp_path / "epoch=0.ckpt").touch()
    bare.dirpath = str(tmp_path)  # type: ignore[attr-defined]
    assert compat.last_checkpoints(bare, None) == {str(tmp_path / "last.ckpt"), str(tmp_path / "last-v1.ckpt")}
    assert compat._flatten(hparams) == {"model/class_path": "a.B", "model/init_args/d": 2, "lr": 0.1}


def test_the_private_names_do_what_compat_says(tmp_path: Path) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, max_steps=1)
    assert compat.set_batches_that_stepped(trainer, 7) is True
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 7
    logger = TensorBoardLogger(str(tmp_path))
    compat.disable_default_hp_metric(logger)
    assert logger._default_hp_metric is False
    module = L.LightningModule()
    assert compat.module_trainer(module) is None
    module.trainer = trainer
    assert compat.module_trainer(module) is trainer
    assert compat.cli_hyperparameters() is None  # outside LightningCLI's instantiation
