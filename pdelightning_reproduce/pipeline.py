"""Train and analyse in K worker processes, analysing runs as they finish and publishing summaries incrementally.

The scheduler keeps a priority queue of tasks: analyses first (they free results for publishing), then training
runs in the plan's order (main settings first, then the sweeps seed-major). A run's analysis is queued as soon as
it has trained; a pair's as soon as both its runs have. After every analysis the unit's ``summary.csv`` and
``run.json`` are copied under ``<publish>/units/`` and ``<publish>/summary.csv.gz`` and ``runs.csv`` are re-merged,
so a process killed at any moment leaves every finished unit's results behind. ``progress.log`` gets one line per
event. ``stop_training_after_s`` stops launching training runs after that many seconds (analyses go on).
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pdelightning_reproduce.settings import PairSpec, Plan, RunSpec, setting
from pdelightning_reproduce.summary import SUMMARY_NAME, merge


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _train_task(spec: RunSpec, out: str, data_dir: str, quick: bool, extra: list[str], budget_name: str) -> dict:
    from pdelightning_reproduce.train import train_run

    return train_run(spec, Path(out), Path(data_dir), quick, extra, budget_name)


def _analyze_task(unit: RunSpec | PairSpec, out: str) -> int:
    from pdelightning_reproduce.analyze import analyze_run
    from pdelightning_reproduce.pairs import analyze_pair
    from pdelightning_reproduce.train import redirected

    out_path = Path(out)
    udir = unit.path(out_path) if isinstance(unit, RunSpec) else out_path / unit.id
    udir.mkdir(parents=True, exist_ok=True)
    with redirected(udir / "analyze.log"):
        if isinstance(unit, RunSpec):
            return analyze_run(unit, out_path, _device())
        return analyze_pair(unit, out_path, _device())


@dataclass(order=True)
class _Task:
    priority: tuple[int, int]
    kind: str = field(compare=False)
    unit: Any = field(compare=False)


class Progress:
    """Appends timestamped lines to ``progress.log`` (and prints them)."""

    def __init__(self, path: Path | None, t0: float) -> None:
        self.path, self.t0 = path, t0

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:8.1f} s] {msg}"
        print(line, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def publish(out: Path, dest: Path, unit_dir: Path) -> None:
    """Copy one unit's ``summary.csv`` and ``run.json`` / ``pair.json`` under ``dest/units/`` and re-merge.

    A file the unit no longer has is removed from ``dest`` too (a redone run that failed keeps no summary of the
    attempt before it).
    """
    rel = unit_dir.relative_to(out)
    target = dest / "units" / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_NAME, "run.json", "pair.json"):
        if (unit_dir / name).is_file():
            shutil.copy2(unit_dir / name, target / name)
        else:
            (target / name).unlink(missing_ok=True)
    merge(dest / "units", dest)


def _done(out: Path, spec: RunSpec) -> bool:
    p = spec.path(out) / "run.json"
    return p.is_file() and json.loads(p.read_text()).get("status") in ("complete", "diverged")


def run_pipeline(
    plan: Plan,
    out: Path,
    data_dirs: dict[str, Path],
    workers: int = 1,
    threads_per_worker: int = 1,
    train: bool = True,
    analyze: bool = True,
    publish_to: Path | None = None,
    stop_training_after_s: float | None = None,
    skip_existing: bool = True,
    extra: list[str] | None = None,
) -> dict[str, list[str]]:
    """Train and/or analyse every unit of ``plan``; returns the ids of the units that ``failed``, ``skipped``, ``done``.

    Args:
        plan: settings, seeds, quick flag.
        out: root of the run folders.
        data_dirs: ``{"mnist": dir, "newsgroups": dir}``.
        workers: parallel worker processes (spawned; each trains or analyses one unit at a time).
        threads_per_worker: torch CPU threads per worker.
        train: train the runs (else only analyse existing ones).
        analyze: analyse runs and pairs.
        publish_to: folder that receives the summaries incrementally (``None``: ``out/_published``).
        stop_training_after_s: launch no training run after this many seconds.
        skip_existing: keep finished runs (``run.json`` complete or diverged) and analysed units.
        extra: extra ``pdelightning fit`` arguments for every run.
    """
    out = Path(out)
    t0 = time.perf_counter()
    dest = Path(publish_to) if publish_to is not None else out / "_published"
    log = Progress(dest / "progress.log", t0)
    runs = plan.runs()
    pairs = plan.pairs() if analyze else []
    status: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    queue: list[_Task] = []
    trained: set[RunSpec] = set()
    queued_pairs: set[PairSpec] = set()
    order = 0

    def push(kind: str, unit: Any, prio: int) -> None:
        nonlocal order
        order += 1
        heapq.heappush(queue, _Task((prio, order), kind, unit))

    def analysed(unit_dir: Path) -> bool:
        return skip_existing and (unit_dir / SUMMARY_NAME).is_file()

    def after_trained(spec: RunSpec) -> None:
        trained.add(spec)
        if analyze and not analysed(spec.path(out)):
            push("analyze", spec, 0)
        for p in pairs:
            if p not in queued_pairs and all(m in trained for m in p.members()):
                queued_pairs.add(p)
                if not analysed(out / p.id):
                    push("analyze", p, 0)

    for spec in runs:
        if (skip_existing and _done(out, spec)) or not train:
            if _done(out, spec):
                after_trained(spec)
            else:
                status["skipped"].append(spec.id)
            continue
        push("train", spec, 1)
    log(f"plan: {len(runs)} runs, {len(pairs)} pairs, {workers} workers; {len(queue)} tasks queued")
    ctx = get_context("spawn")
    running: dict[Future, _Task] = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads_per_worker,)) as ex:
        while queue or running:
            while queue and len(running) < workers:
                task = heapq.heappop(queue)
                if task.kind == "train":
                    if stop_training_after_s is not None and time.perf_counter() - t0 > stop_training_after_s:
                        status["skipped"].append(task.unit.id)
                        log(f"skip {task.unit.id}: past the training deadline")
                        continue
                    s = setting(task.unit.setting)
                    fut = ex.submit(
                        _train_task, task.unit, str(out), str(data_dirs[s.data]), plan.quick, extra or [], plan.budget
                    )
                else:
                    fut = ex.submit(_analyze_task, task.unit, str(out))
                running[fut] = task
                log(f"start {task.kind} {task.unit.id}")
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                task = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # a crashed task: record it, publish what the unit has, go on
                    status["failed"].append(task.unit.id)
                    log(f"FAILED {task.kind} {task.unit.id}: {type(e).__name__}: {e}")
                    unit_dir = task.unit.path(out) if isinstance(task.unit, RunSpec) else out / task.unit.id
                    if unit_dir.is_dir():
                        publish(out, dest, unit_dir)
                    continue
                if task.kind == "train":
                    ok = result.get("status") in ("complete", "diverged")
                    log(
                        f"trained {task.unit.id}: {result.get('status')} in {result.get('wall_s')} s, "
                        f"step {result.get('final_step')}, val/acc {result.get('val_acc')}"
                    )
                    if ok:
                        after_trained(task.unit)
                    else:
                        status["failed"].append(task.unit.id)
                        publish(out, dest, task.unit.path(out))
                else:
                    udir = task.unit.path(out) if isinstance(task.unit, RunSpec) else out / task.unit.id
                    publish(out, dest, udir)
                    status["done"].append(task.unit.id)
                    log(f"analysed {task.unit.id}: {result} rows; published")
    if analyze:
        merge(dest / "units", dest) if (dest / "units").is_dir() else None
    log(f"end: {len(status['done'])} analysed, {len(status['failed'])} failed, {len(status['skipped'])} skipped")
    (dest / "pipeline_status.json").write_text(json.dumps(status, indent=1))
    return status
