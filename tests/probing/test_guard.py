"""The error guard: a callback that raises (``on_error="warn"``) is reported once and switched off; training goes on.

A failure is planted (a method replaced by one that raises from a given step on) in each of the nine callbacks'
probe or hook, in a run with all nine attached as the plugin attaches them; then in a two-process DDP run where
only one rank fails; then in a plain user script run under ``PDELIGHTNING_CALLBACKS=all``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch

from pdelightning.adapters.registry import TargetNotFoundError
from pdelightning.callbacks import (
    AttentionRollout,
    AttentionSimilarity,
    GradientFlow,
    InformationFlow,
    JacobianStability,
    LayerMutualInformation,
    PDEFit,
    PerturbationEval,
    StabilityMonitor,
)
from pdelightning.plugin import ENV_VAR, build_callbacks
from pdelightning.probing import session as session_module
from pdelightning.probing.guard import CallbackFailedWarning
from tests.helpers.configs import CONFIGS
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
FAIL_AT = 2  # probes at steps 0 (start), 2 and 4 (the end); GradientFlow reads at 0 and 2
PREFIX = {
    AttentionSimilarity: "attention_similarity",
    InformationFlow: "information_flow",
    LayerMutualInformation: "layer_mutual_information",
    PerturbationEval: "perturbation_eval",
    StabilityMonitor: "stability_monitor",
    GradientFlow: "gradient_flow",
    PDEFit: "pde_fit",
    JacobianStability: "jacobian_stability",
    AttentionRollout: "attention_rollout",
}


def nine(on_error: str = "warn", probe_size: int = 8) -> list[L.Callback]:
    """The nine callbacks as the plugin builds them (``on_missing``/``on_error`` = ``"warn"``), on a fixed cadence."""
    kw: dict[str, Any] = dict(every_n_steps=2, probe_size=probe_size, probe_batch_size=4, on_missing="warn")
    return [
        AttentionSimilarity(**kw, on_error=on_error),
        InformationFlow(**kw, on_error=on_error),
        LayerMutualInformation(**kw, on_error=on_error),
        PerturbationEval(**kw, on_error=on_error),
        StabilityMonitor(**kw, check_every_n_steps=1, on_error=on_error),
        GradientFlow(every_n_steps=2, histogram_every_n_steps=None, on_missing="warn", on_error=on_error),
        PDEFit(**kw, on_error=on_error),
        JacobianStability(**kw, max_samples=1, n_iter=2, block=1, lyapunov=False, on_error=on_error),
        AttentionRollout(**kw, on_error=on_error),
    ]


class PlantedError(RuntimeError):
    """The planted failure."""


def plant(cls: type, method: str, state: dict[str, Any], rank: int | None = None) -> Any:
    """``cls.method`` that raises :class:`PlantedError` from step ``FAIL_AT`` on (on ``rank`` only, if given)."""
    original = getattr(cls, method)

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = state["trainer"]
        if trainer.global_step >= FAIL_AT and (rank is None or trainer.global_rank == rank):
            state["raised"] = state.get("raised", 0) + 1
            raise PlantedError(f"planted failure in {cls.__name__}.{method}")
        return original(self, *args, **kwargs)

    return failing


def steps_logged(logger: MemoryLogger, prefix: str) -> set[int]:
    """The steps at which a key ``analysis/<prefix>/...`` was logged."""
    return {s for s, m in logger.records if any(k.startswith(f"analysis/{prefix}/") for k in m)}


def final_values(logger: MemoryLogger) -> dict[str, float]:
    """The analysis values logged at the last step (the end-of-training probe)."""
    return {
        k: v
        for s, m in logger.records
        if s == MAX_STEPS
        for k, v in m.items()
        if k.startswith("analysis/") and not k.startswith("analysis/overhead/")
    }


@pytest.fixture(scope="module")
def baseline() -> dict[str, float]:
    """The last probe's values of a run where nothing fails."""
    return final_values(fit(nine(), {})[1])


def fit(callbacks: list[L.Callback], state: dict[str, Any]) -> tuple[L.Trainer, MemoryLogger]:
    torch.manual_seed(0)  # the same model and batches in every run
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=MAX_STEPS,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    state["trainer"] = trainer
    trainer.fit(our_task("pde", image_size=4, bottleneck_dim=None), *image_loaders(n=32, image_size=4, batch_size=4))
    return trainer, logger


# (callback, method, where the report says it failed); consume: the probe's rank-local part; finish: its
# collective part; _read / _check_losses: a hook outside the probe hub
CASES = [(cls, "consume", "consume") for cls in PREFIX if cls is not GradientFlow] + [
    (GradientFlow, "_read", "reading the gradients"),
    (PDEFit, "finish", "finish"),
    (StabilityMonitor, "_check_losses", "on_train_batch_end"),
]


@pytest.mark.parametrize(("cls", "method", "where"), CASES, ids=[f"{c.__name__}.{m}" for c, m, _ in CASES])
def test_a_failing_callback_is_reported_once_and_switched_off(
    monkeypatch: pytest.MonkeyPatch, baseline: dict[str, float], cls: type, method: str, where: str
) -> None:
    state: dict[str, Any] = {}
    monkeypatch.setattr(cls, method, plant(cls, method, state))
    callbacks = nine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, logger = fit(callbacks, state)
    assert trainer.global_step == MAX_STEPS  # training went on to the end
    assert state["raised"] >= 1
    reports = [str(w.message) for w in caught if issubclass(w.category, CallbackFailedWarning)]
    assert len(reports) == 1, reports
    (report,) = reports
    assert report.startswith(f"pdelightning: {cls.__name__} failed in {where}")
    assert f"PlantedError: planted failure in {cls.__name__}.{method}" in report
    assert "test_guard.py:" in report and "in failing" in report  # the error's last frame
    assert "How to report it" in report and f"{cls.__name__}(on_error='raise')" in report
    failed = next(c for c in callbacks if type(c) is cls)
    assert failed.failed and failed.disabled is not None
    # the failed callback logged before the failure and nothing from then on; every other one still logs at the end
    logged = steps_logged(logger, PREFIX[cls])
    last_ok = FAIL_AT if where == "on_train_batch_end" else FAIL_AT - 1  # that hook runs after the step's probe
    assert 0 in logged and max(logged) <= last_ok, logged
    assert not any(other.failed for other in callbacks if other is not failed)
    if cls is not GradientFlow:
        assert FAIL_AT in steps_logged(logger, "gradient_flow")  # GradientFlow reads at 0 and 2
    # every other callback logs at the end what it logs in a run where nothing fails, value for value
    values = final_values(logger)
    expected = {k: v for k, v in baseline.items() if not k.startswith(f"analysis/{PREFIX[cls]}/")}
    assert len(expected) > 50 and set(values) == set(expected)
    for k, v in expected.items():
        assert (v != v and values[k] != values[k]) or values[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_a_failing_probe_forward_switches_off_the_probe_callbacks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    state: dict[str, Any] = {}
    original = session_module.call_model

    def failing(module: Any, batch: Any) -> Any:
        if state["trainer"].global_step >= FAIL_AT:
            raise PlantedError("planted failure in the forward")
        return original(module, batch)

    monkeypatch.setattr(session_module, "call_model", failing)
    callbacks = nine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, logger = fit(callbacks, state)
    assert trainer.global_step == MAX_STEPS
    reports = [str(w.message) for w in caught if issubclass(w.category, CallbackFailedWarning)]
    probe_callbacks = [c for c in callbacks if type(c) is not GradientFlow]
    assert sorted(r.split()[1] for r in reports) == sorted(type(c).__name__ for c in probe_callbacks)
    assert all("failed in the probe forward" in r and "planted failure in the forward" in r for r in reports)
    assert all(c.failed for c in probe_callbacks) and not callbacks[5].failed
    assert FAIL_AT in steps_logged(logger, "gradient_flow")  # not a probe callback: untouched


@pytest.mark.parametrize("cls", [InformationFlow, GradientFlow])
def test_explicitly_attached_callbacks_still_raise(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    state: dict[str, Any] = {}
    method = "_read" if cls is GradientFlow else "consume"
    monkeypatch.setattr(cls, method, plant(cls, method, state))
    callbacks = nine()
    for i, c in enumerate(callbacks):  # the failing one attached by hand (default on_error), the others warn
        if type(c) is cls:
            callbacks[i] = cls(every_n_steps=2, **({} if cls is GradientFlow else {"probe_size": 8}))
            assert callbacks[i].on_error == "raise"
    with pytest.raises(PlantedError, match=f"planted failure in {cls.__name__}.{method}"):
        fit(callbacks, state)


def test_on_error_is_checked_and_the_plugin_sets_warn() -> None:
    with pytest.raises(ValueError, match=r"on_error='ignore' is not one of \('raise', 'warn'\)"):
        PDEFit(on_error="ignore")
    with pytest.raises(ValueError, match=r"on_error='skip' is not one of \('raise', 'warn'\)"):
        GradientFlow(on_error="skip")
    assert all(c.on_error == "warn" for c in build_callbacks("all"))
    assert all(c.on_error == "warn" for c in build_callbacks(str(CONFIGS / "callbacks/all.yaml")))
    assert PDEFit().on_error == "raise" and GradientFlow().on_error == "raise"


@pytest.mark.parametrize("cls", [PDEFit, GradientFlow])
def test_on_missing_raise_still_raises_under_on_error_warn(cls: type) -> None:
    callback = cls(layers="nope.*", every_n_steps=1, on_error="warn")  # on_missing="raise" (default)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(TargetNotFoundError, match=r"layers='nope\.\*' matched no module"):
        trainer.fit(our_task("pde", image_size=4), *image_loaders(n=8, image_size=4, batch_size=4))


_DDP_SCRIPT = """
import json, sys, warnings
import lightning.pytorch as L, torch
sys.path.insert(0, {root!r})
from pdelightning.callbacks import GradientFlow, InformationFlow, PDEFit
from pdelightning.probing.guard import CallbackFailedWarning
from tests.probing import test_guard as t

state = {{}}
InformationFlow.consume = t.plant(InformationFlow, "consume", state, rank=1)  # rank 0 then gathers in finish
GradientFlow._read = t.plant(GradientFlow, "_read", state, rank=0)  # rank zero's own reads
PDEFit.log_scalars = t.plant(PDEFit, "log_scalars", state, rank=0)  # after PDEFit's collectives, rank 0 only
torch.manual_seed(0)
callbacks = t.nine(probe_size=5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    logger = t.MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=t.MAX_STEPS, callbacks=callbacks,
                        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
    state["trainer"] = trainer
    task = t.our_task("pde", image_size=4, bottleneck_dim=None)
    trainer.fit(task, *t.image_loaders(n=32, image_size=4, batch_size=4))
out = {{
    "rank": trainer.global_rank, "step": trainer.global_step,
    "failed": sorted(type(c).__name__ for c in callbacks if c.failed),
    "reports": [str(w.message) for w in caught if issubclass(w.category, CallbackFailedWarning)],
    "logged": {{p: sorted(t.steps_logged(logger, p)) for p in t.PREFIX.values()}},
}}
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.ddp
def test_a_failure_on_one_rank_switches_the_callback_off_on_both(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )  # a hang (a collective left waiting) ends here
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == MAX_STEPS
    assert r0["failed"] == r1["failed"] == ["GradientFlow", "InformationFlow", "PDEFit"]  # agreed on both ranks
    # each failure reported once, by the rank where it happened
    assert sorted(r.split()[1] for r in r0["reports"]) == ["GradientFlow", "PDEFit"]
    assert [r.split()[1] for r in r1["reports"]] == ["InformationFlow"]
    assert "failed in consume on rank 1" in r1["reports"][0]
    logged = r0["logged"]  # rank zero logs
    assert logged["information_flow"] == logged["pde_fit"] == logged["gradient_flow"] == [0]
    for prefix in ("attention_similarity", "layer_mutual_information", "stability_monitor", "attention_rollout"):
        assert MAX_STEPS in logged[prefix], prefix


_USER_SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger
    sys.path.insert(0, {root!r})
    from pdelightning.callbacks import AttentionRollout
    from tests.helpers.models import our_task, image_loaders

    def broken(self, pb):  # stands in for a model family the callback gets wrong
        raise IndexError("planted: index 3 is out of bounds for dimension 0 with size 3")

    AttentionRollout.consume = broken
    trainer = L.Trainer(max_steps=3, logger=CSVLogger("logs"), enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(our_task("pde", image_size=4, bottleneck_dim=None), *image_loaders(n=16, image_size=4, batch_size=4))
    print("STEPS", trainer.global_step)
    """
)


def test_the_plugin_keeps_a_users_run_alive(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_USER_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, ENV_VAR: "all", "OMP_NUM_THREADS": "1"}
    # a logger: with logger=False the plugin's callbacks step aside before they could fail
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS 3" in proc.stdout
    assert proc.stderr.count("AttentionRollout failed in consume") == 1
    assert "IndexError: planted: index 3 is out of bounds" in proc.stderr
    assert "failed in" not in proc.stderr.replace("AttentionRollout failed in consume", "")
