"""An argument typo in a callback's YAML names the full set of arguments the class takes: its own, and those of the
base class its ``**kwargs`` go to (``ProbeCallback``), with the closest as a suggestion; on the plugin and the CLI."""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

from pdelightning.__main__ import main
from pdelightning.callbacks import PDEFit
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.plugin import build_callbacks
from pdelightning.trust import check_kwargs, init_arguments
from pdelightning.utils import InputError
from tests.helpers.configs import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
PDE_FIT_OWN = ["diffusion", "dt", "dx", "boundary"]  # PDEFit.__init__'s own, in order; the rest go to ProbeCallback
PROBE_BASE = [
    "every_n_steps",
    "every_n_epochs",
    "budget",
    "probe_at_start",
    "probe_size",
    "probe_batch_size",
    "layers",
    "attention",
    "embedding",
    "seed",
    "figure_every_n_probes",
    "on_missing",
    "on_error",
]


class OpenKwargs(Callback):
    """A user's callback that keeps its ``**kwargs`` itself: any keyword is valid, none may be refused."""

    def __init__(self, scale: float = 1.0, **kwargs: Any) -> None:
        self.scale, self.options = scale, kwargs


def test_arguments_follow_kwargs_to_the_base_class() -> None:
    assert list(inspect.signature(ProbeCallback).parameters) == PROBE_BASE  # the hand-written list is current
    assert init_arguments(PDEFit) == PDE_FIT_OWN + PROBE_BASE
    assert init_arguments(OpenKwargs) is None  # **kwargs that reach no closed __init__: not checkable


def test_plugin_yaml_typo_lists_every_argument(tmp_path: Path) -> None:
    cfg = tmp_path / "cbs.yaml"
    cfg.write_text("- class_path: pdelightning.callbacks.PDEFit\n  init_args: {threshold: 3}\n")
    with pytest.raises(InputError) as err:
        build_callbacks(str(cfg))
    assert str(err.value) == (
        f"PDELIGHTNING_CALLBACKS={cfg}: PDEFit has no argument 'threshold'; its arguments: "
        + ", ".join(PDE_FIT_OWN + PROBE_BASE)
    )
    cfg.write_text("- class_path: pdelightning.callbacks.PDEFit\n  init_args: {every_n_step: 3}\n")
    with pytest.raises(InputError, match=r"PDEFit has no argument 'every_n_step'; did you mean 'every_n_steps'"):
        build_callbacks(str(cfg))
    cfg.write_text("- class_path: pdelightning.callbacks.PDEFit\n  init_args: {probe_size: 16, dx: 0.5}\n")
    (fit,) = build_callbacks(str(cfg))  # a base argument through **kwargs is valid
    assert isinstance(fit, PDEFit) and fit.probe_size == 16 and fit.dx == 0.5
    check_kwargs(OpenKwargs, {"anything": 1}, "test")  # not refused


def test_cli_yaml_typo_lists_every_argument(tmp_path: Path) -> None:
    bundle = tmp_path / "cb.yaml"
    bundle.write_text(
        "trainer:\n  callbacks+:\n    - class_path: pdelightning.callbacks.PDEFit\n      init_args: {threshold: 3}\n"
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(CONFIGS / "quickstart.yaml"), "-c", str(bundle), "--trainer.logger=false"])
        sys.exit(0)
    assert done.value.code == 2
    assert err.getvalue().strip().splitlines()[-1] == (
        "error: trainer.callbacks: PDEFit has no argument 'threshold'; its arguments: "
        + ", ".join(PDE_FIT_OWN + PROBE_BASE)
    )
