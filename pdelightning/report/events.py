"""Read a finished run back: its scalars and figures from the TensorBoard event files, its settings from config.yaml.

:func:`resolve_run_dir` finds the directory that holds a run's events (a logger's ``version_N`` directory, or the
newest version under a logger's ``name`` directory); :func:`read_run` reads every event file in it with
TensorBoard's own ``EventAccumulator`` (also the figure worker's file and any per-run sub-directories; a sub-run's
tags get its name as their last component, so a run per layer reads like ``<quantity>/<layer>``);
:func:`callback_settings` reads the thresholds the callbacks were configured with, so findings state them.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdelightning.probing.planner import DEFAULT_BUDGET
from pdelightning.report.tags import CALLBACKS

EVENT_GLOB = "events.out.tfevents.*"


class RunNotFoundError(Exception):
    """The directory named does not exist or holds no TensorBoard events (the message names it)."""


@dataclass
class RunData:
    """What the report reads from one run.

    Attributes:
        log_dir: the run directory.
        scalars: ``tag -> [(step, value), ...]`` sorted by step (the last value when a step repeats).
        images: ``tag -> (step, PNG bytes)`` of the last image of each tag.
        settings: ``class name -> init_args`` of the callbacks in the run's ``config.yaml`` (empty without one).
        note: a line saying which directory was read, when it is not the one named.
    """

    log_dir: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""


def _version_number(path: Path) -> int:
    m = re.fullmatch(r"version_(\d+)", path.name)
    return int(m.group(1)) if m else -1


def resolve_run_dir(path: str | Path) -> tuple[Path, str]:
    """The directory whose event files make the run, and a note when it is a version below ``path``.

    Raises:
        RunNotFoundError: ``path`` does not exist, is not a directory, or has no event file in it or a version
            below it.
    """
    root = Path(path).expanduser()
    hint = "give a run's log directory, e.g. logs/quickstart/version_0"
    if not root.exists():
        raise RunNotFoundError(f"{root} does not exist ({hint})")
    if not root.is_dir():
        raise RunNotFoundError(f"{root} is not a directory ({hint})")
    if any(root.glob(EVENT_GLOB)):
        return root, ""
    versions = sorted((p for p in root.iterdir() if p.is_dir() and any(p.rglob(EVENT_GLOB))), key=_version_number)
    if versions:
        chosen = versions[-1]
        return chosen, f"reading {chosen} (the newest of {len(versions)} runs under {root})"
    if any(root.rglob(EVENT_GLOB)):
        return root, ""
    raise RunNotFoundError(f"{root} holds no TensorBoard event files ({EVENT_GLOB}); is it a run's log directory?")


def read_run(path: str | Path, images: bool = True) -> RunData:
    """Read the scalars (and the last image of each tag) of the run at ``path`` (see :func:`resolve_run_dir`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, note = resolve_run_dir(path)
    data = RunData(run_dir, note=note)
    points: dict[str, dict[int, tuple[float, float]]] = {}
    guidance = {"scalars": 0, "images": 1 if images else 0, "histograms": 1, "tensors": 1, "audio": 1}
    for file in sorted(run_dir.rglob(EVENT_GLOB)):
        if "checkpoints" in file.relative_to(run_dir).parts:
            continue
        sub = file.parent.relative_to(run_dir).as_posix()
        suffix = "" if sub == "." else "/" + sub.replace("/", ".")
        acc = EventAccumulator(str(file), size_guidance=guidance)
        try:
            acc.Reload()
        except Exception:  # a truncated file (a run killed mid-write): read what the other files hold
            continue
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            into = points.setdefault(tag + suffix, {})
            for e in acc.Scalars(tag):
                if e.step not in into or e.wall_time >= into[e.step][0]:
                    into[e.step] = (e.wall_time, float(e.value))
        for tag in tags.get("images", []) if images else []:
            shown = acc.Images(tag)
            if shown:
                e = shown[-1]
                have = data.images.get(tag + suffix)
                if have is None or e.step >= have[0]:
                    data.images[tag + suffix] = (e.step, e.encoded_image_string)
    data.scalars = {t: [(s, v) for s, (_, v) in sorted(p.items())] for t, p in sorted(points.items())}
    data.settings = callback_settings(run_dir / "config.yaml")
    return data


def callback_settings(config: Path) -> dict[str, dict[str, Any]]:
    """``{class name: init_args}`` of the callbacks in a LightningCLI ``config.yaml`` (the first of each class)."""
    if not config.is_file():
        return {}
    try:
        import yaml

        loaded = yaml.safe_load(config.read_text())
    except Exception:
        return {}
    trainer = loaded.get("trainer") if isinstance(loaded, Mapping) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, Mapping) else None
    out: dict[str, dict[str, Any]] = {}
    for cb in callbacks if isinstance(callbacks, list) else []:
        if isinstance(cb, Mapping) and isinstance(cb.get("class_path"), str):
            args = cb.get("init_args")
            out.setdefault(cb["class_path"].rsplit(".", 1)[-1], dict(args) if isinstance(args, Mapping) else {})
    return out


def _default(cls_name: str, arg: str, fallback: Any) -> Any:
    try:
        import pdelightning.callbacks as callbacks

        param = inspect.signature(getattr(callbacks, cls_name)).parameters[arg]
        return fallback if param.default is inspect.Parameter.empty else param.default
    except Exception:
        return fallback


def rule_settings(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Keyword arguments of the finding rules (by rule name) from the callbacks' settings, else their defaults.

    The thresholds the callbacks flagged with are the thresholds the findings state: GradientFlow's
    ``vanishing_threshold``/``exploding_threshold``, StabilityMonitor's ``spike_factor``, LayerMutualInformation's
    ``saturation_tol``, and the smallest ``budget`` of any callback (the hub runs to the strictest one).
    """

    def get(cls: str, arg: str, fallback: Any) -> Any:
        value = settings.get(cls, {}).get(arg)
        return value if value is not None else _default(cls, arg, fallback)

    budgets = [b for c, a in settings.items() if c in CALLBACKS.values() and (b := _budget_of(a)) is not None]
    budget = min(budgets) if budgets else _DEFAULT_BUDGET
    out: dict[str, dict[str, Any]] = {
        "gradients_vanish": {"threshold": float(get("GradientFlow", "vanishing_threshold", 1e-7))},
        "gradients_explode": {"threshold": float(get("GradientFlow", "exploding_threshold", 1e3))},
        "mi_at_ceiling": {"tol": float(get("LayerMutualInformation", "saturation_tol", 0.1))},
        "overhead_above_budget": {"budget": float(budget)},
    }
    factor = get("StabilityMonitor", "spike_factor", 3.0)
    out["loss_spikes"] = {"spike_factor": float(factor) if factor is not None else math.nan}
    return out


_DEFAULT_BUDGET = DEFAULT_BUDGET


def _budget_of(args: Mapping[str, Any]) -> float | None:
    """The budget a probe callback resolves from its init_args (``"auto"``: the default unless a cadence is set)."""
    budget = args.get("budget", "auto")
    if budget == "auto":
        fixed = args.get("every_n_steps") is not None or args.get("every_n_epochs") is not None
        return None if fixed else _DEFAULT_BUDGET
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None
