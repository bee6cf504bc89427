"""``pdelightning-reproduce train``: one run = one ``pdelightning fit`` of a setting's config, plus its record.

:func:`train_run` builds the run with the same LightningCLI as ``pdelightning fit`` (the setting's config,
``pdelightning_reproduce/configs/<setting>.yaml``, and the run's overrides: seed, output folder, data folder, the
cell's grid values, and for the PDE sweeps the Δt that puts eq. (21) at initialisation on its target), adds
:class:`~pdelightning_reproduce.recorder.RunRecorder`, fits, and writes ``run.json``: config, overrides, seed,
device, wall time, final accuracies, the training loss series, first non-finite loss step, divergence step, stop
reason, and whether the plateau criterion was met and at which epoch.

Divergence: runs of the ``v3`` budget stop only on a non-finite training loss and are judged afterwards from their
loss series by :func:`~pdelightning_reproduce.divergence.divergence_of_record` (``training_divergence``,
``divergence_reason``, ``divergence_at``; ``diverged`` is that verdict, ``None`` when it cannot say); the older
budgets keep v2's stop at ``DIVERGENCE_LOSS_FACTOR x ln C`` so that their runs can be repeated. Every run also
records :func:`~pdelightning_reproduce.divergence.under_trained` (main runs only; a sweep has no plateau criterion).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdelightning._checks import LINKED_MODEL_ARGS as LINKED
from pdelightning_reproduce.budget import budget
from pdelightning_reproduce.divergence import divergence_of_record, under_trained
from pdelightning_reproduce.recorder import RunRecorder
from pdelightning_reproduce.rules import DIVERGENCE_LOSS_FACTOR
from pdelightning_reproduce.settings import CHECKPOINT_STEPS, RunSpec, quick_overrides, setting
from pdelightning_reproduce.summary import EARLIER_ATTEMPT
from pdelightning_reproduce.summary import EARLIER_ATTEMPT_MOVING as _MOVING

#: Budgets whose runs stop only on a non-finite loss and are judged by :mod:`.divergence` afterwards.
JUDGED_AFTERWARDS = ("v3",)


def config_record(name: str) -> str:
    """How ``run.json`` names a run's config: ``pdelightning_reproduce/configs/<name>`` (the package's own file;
    :func:`~pdelightning_reproduce.probe.data_spec` reads it back by its file name).
    """
    return f"pdelightning_reproduce/configs/{name}"


def device_name() -> str:
    """``cuda: <GPU name>`` or ``cpu: <processor>, <n> cores``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def fit_args(
    spec: RunSpec,
    out: Path,
    data_dir: Path,
    quick: bool,
    extra: list[str],
    dt: float | None = None,
    budget_name: str = "full",
) -> list[str]:
    """The ``pdelightning fit`` arguments of one run (without the ``fit`` subcommand), the budget's cuts included."""
    s = setting(spec.setting)
    rdir = spec.path(out)
    args = [
        "-c",
        str(s.config_path),
        f"--seed_everything={spec.seed}",
        f"--trainer.logger.init_args.save_dir={rdir.parent}",
        "--trainer.logger.init_args.name=",
        f"--trainer.logger.init_args.version={rdir.name}",
        f"--trainer.default_root_dir={rdir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--data.init_args.data_dir={data_dir}",
        *spec.get_cell().overrides,
        *budget(budget_name).overrides_for(spec.setting),
    ]
    if quick:
        args += quick_overrides(spec)
    if dt is not None:
        args.append(f"--model.model.init_args.dt={dt!r}")
    return args + list(extra)


def _model_spec(cli: Any) -> tuple[str, dict[str, Any]]:
    """Import path and constructor arguments of the CLI's model, linked data attributes included."""
    model = cli.model.model
    cfg = cli.config.as_dict() if hasattr(cli.config, "as_dict") else dict(cli.config)
    init_args = dict(cfg["model"]["model"].get("init_args", {}))
    for attr in LINKED:
        if hasattr(cli.datamodule, attr):
            init_args[attr] = getattr(cli.datamodule, attr)
    return f"{type(model).__module__}.{type(model).__name__}", init_args


def choose_dt(args: list[str], target: float) -> tuple[float, float]:
    """Δt that puts eq. (21) at initialisation (maximum over steps) at ``target``, for this run's seed.

    The model is built exactly as training builds it (same CLI, same seed), so its initial weights are the run's.

    Returns:
        ``(dt, coefficient)`` with ``coefficient = max_l (2 D_l / Δx² + |α_l| ||W^O_l||_2)``.
    """
    from pdelightning.cli import build_cli
    from pdelightning_reproduce.measures import eq21_coefficient

    cli = build_cli([*args, "--model.model.init_args.dt=1.0", "--trainer.accelerator=cpu"], run=False)
    c = eq21_coefficient(cli.model.model)
    return target / c, c


@contextlib.contextmanager
def redirected(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (Python and C level) to ``log`` while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def set_aside_earlier_attempt(rdir: Path) -> None:
    """Move what an earlier attempt left in the run folder ``rdir`` into ``rdir/earlier_attempt/``.

    The earlier attempt is an unfinished one (stopped, killed, failed) or a finished one redone with
    ``--no-skip-existing``. Nothing of it is then read as this attempt's: the analysis reads every
    ``ckpt/step*.pt``, and an attempt stopped after step 500 would otherwise lend its step-500 weights to a new
    attempt that diverges at step 300. The files go to a temporary folder first, which then replaces the
    ``earlier_attempt/`` of the attempt before (the only thing deleted), so a kill midway loses nothing.

    Raises:
        OSError: when the files cannot be moved (``train_run`` records it as a failed run).
    """
    left = [p for p in rdir.iterdir() if p.name not in (EARLIER_ATTEMPT, _MOVING)] if rdir.is_dir() else []
    moving = rdir / _MOVING
    if not left and not moving.is_dir():
        return
    moving.mkdir(exist_ok=True)
    for p in left:
        p.rename(moving / p.name)
    shutil.rmtree(rdir / EARLIER_ATTEMPT, ignore_errors=True)
    moving.rename(rdir / EARLIER_ATTEMPT)


def train_run(
    spec: RunSpec,
    out: Path,
    data_dir: Path,
    quick: bool = False,
    extra: list[str] | None = None,
    budget_name: str = "full",
) -> dict:
    """Train one run under the budget ``budget_name`` and write its ``run.json``; a failure of the run is recorded
    as ``status: failed``, not raised.

    Raises:
        OSError: only when an earlier attempt's files cannot be set aside (:func:`set_aside_earlier_attempt`).
    """
    import json

    s, cell = setting(spec.setting), spec.get_cell()
    rdir = spec.path(out)
    set_aside_earlier_attempt(rdir)
    rdir.mkdir(parents=True, exist_ok=True)
    extra = list(extra or [])
    meta: dict[str, Any] = {
        "setting": spec.setting,
        "cell": spec.cell,
        "seed": spec.seed,
        "config": config_record(s.config),
        "role": s.role,
        "data": s.data,
        "data_dir": str(data_dir),
        "device": device_name(),
        "quick": quick,
        "status": "running",
        "eq21_target": cell.eq21_target,
        "n_layers": cell.depth,
        "lr": cell.lr,
        "budget": budget_name,
        "cuts": budget(budget_name).cut_for(spec.setting),
    }
    meta["gpu"] = meta["device"].startswith("cuda")
    start = time.perf_counter()
    with redirected(rdir / "train.log"):
        try:
            from pdelightning.cli import build_cli

            args = fit_args(spec, out, data_dir, quick, extra, budget_name=budget_name)
            if cell.eq21_target is not None:
                dt, coefficient = choose_dt(args, cell.eq21_target)
                meta.update(dt=dt, eq21_coefficient=coefficient)
                args = fit_args(spec, out, data_dir, quick, extra, dt=dt, budget_name=budget_name)
            meta["overrides"] = args[2:]
            cli = build_cli(args, run=False)
            model_class, init_args = _model_spec(cli)
            meta["model_class"], meta["init_args"] = model_class, init_args
            meta.setdefault("dt", init_args.get("dt"))
            meta["n_layers"] = init_args.get("n_layers")
            meta["lr"] = meta["lr"] or _lr(cli)
            bound = stop_loss(budget_name, cli.datamodule.num_classes)
            recorder = RunRecorder(rdir, CHECKPOINT_STEPS, model_class, init_args, divergence_loss=bound)
            cli.trainer.callbacks.append(recorder)
            meta["divergence_loss"] = bound
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            meta.update(recorder.record)
            meta.update(judge_record(meta, judged_afterwards=bound is None))
        except Exception as e:  # recorded, not raised: one failed run must not stop the others
            traceback.print_exc()
            meta.update(status="failed", error=f"{type(e).__name__}: {e}")
    meta["wall_s"] = round(time.perf_counter() - start, 2)
    (rdir / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


def stop_loss(budget_name: str, num_classes: int) -> float | None:
    """The loss that stops a run during training: ``None`` (only a non-finite loss stops it) for the budgets judged
    afterwards (:data:`JUDGED_AFTERWARDS`), else v2's ``DIVERGENCE_LOSS_FACTOR x ln C``.
    """
    return None if budget_name in JUDGED_AFTERWARDS else DIVERGENCE_LOSS_FACTOR * math.log(num_classes)


def judge_record(meta: dict[str, Any], judged_afterwards: bool) -> dict[str, Any]:
    """The fields a finished run adds to its ``run.json``: final / best validation accuracy, the divergence verdict of
    :func:`~pdelightning_reproduce.divergence.divergence_of_record` on its loss series, ``diverged``, ``status`` and
    ``under_trained``.

    Args:
        meta: the run's record so far (with the recorder's ``losses``, ``loss_steps``, ``val_acc``, ...).
        judged_afterwards: the run stopped only on a non-finite loss; ``diverged`` is then the verdict of
            :mod:`.divergence` (``None`` when it cannot say), else v2's stop (``divergence_step`` set).

    Example::

        >>> rec = {"losses": [2.3, 1.0], "loss_steps": [1, 2], "val_acc": [0.5], "divergence_step": None,
        ...        "role": "main", "plateau_met": False, "stop_reason": "max_epochs"}
        >>> out = judge_record(rec, judged_afterwards=True)
        >>> out["training_divergence"], out["diverged"], out["status"], out["under_trained"]
        ('trained', False, 'complete', True)
    """
    val = meta.get("val_acc") or []
    div = divergence_of_record(meta)
    diverged = div.diverged if judged_afterwards else meta.get("divergence_step") is not None
    return {
        "val_acc": val[-1] if val else None,
        "best_val_acc": max(val) if val else None,
        "training_divergence": div.status,
        "divergence_reason": div.reason,
        "divergence_at": div.step,
        "diverged": diverged,
        "status": "diverged" if diverged else "complete",
        "under_trained": meta.get("role") == "main" and not diverged and under_trained(meta),
    }


def _lr(cli: Any) -> float | None:
    cfg = cli.config.as_dict() if hasattr(cli.config, "as_dict") else dict(cli.config)
    return (cfg.get("model", {}).get("optimizer") or {}).get("init_args", {}).get("lr")
