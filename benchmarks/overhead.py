"""Overhead of the analysis callbacks: the quickstart model trained with none vs all six, side by side.

Runs alternate (none, all, all, none, ...) so drift in machine load hits both arms alike; the figure
of merit is the median over pairs of ``time(all) / time(none)``, timed from the first to the last
training batch (probes at train start and at their cadence included; set-up and data loading excluded).
Peak memory: CUDA ``max_memory_allocated`` on a GPU, the process's peak RSS growth on the CPU.

    python benchmarks/overhead.py --steps 600 --pairs 5
    python benchmarks/overhead.py --steps 600 --pairs 5 --every-n-steps 300   # another cadence
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pdelightning.callbacks.plugin import CALLBACK_NAMES, _resolve_class
from pdelightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def _callbacks(every_n_steps: int | None, probe_at_start: bool = True) -> list[L.Callback]:
    """The six callbacks, at their defaults or all at ``every_n_steps`` (epochs off)."""
    out = []
    for name in CALLBACK_NAMES:
        cls = _resolve_class(name)
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {}
        if every_n_steps:
            kwargs["every_n_steps"] = every_n_steps
            if "every_n_epochs" in params or "kwargs" in params:
                kwargs["every_n_epochs"] = None
        if not probe_at_start and ("probe_at_start" in params or "kwargs" in params):
            kwargs["probe_at_start"] = False
        out.append(cls(**kwargs))
    return out


def run_once(
    steps: int, with_callbacks: bool, every_n_steps: int | None, accelerator: str, probe_at_start: bool = True
) -> dict[str, Any]:
    """Train the quickstart model for ``steps`` steps; return seconds and peak memory."""
    cli = build_cli(["-c", str(ROOT / "configs/quickstart.yaml"), "--seed_everything=0"], run=False)
    timer = _Timer()
    callbacks: list[L.Callback] = [timer] + (_callbacks(every_n_steps, probe_at_start) if with_callbacks else [])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1, logger=TensorBoardLogger(tmp),
            callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=10, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(cli.model, datamodule=cli.datamodule)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    return {"seconds": timer.end - timer.start, "peak_mib": peak}


def main() -> None:
    """Run the paired benchmark and print one JSON line of results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--every-n-steps", type=int, default=None, help="override every callback's cadence")
    p.add_argument("--accelerator", default="auto")
    p.add_argument(
        "--no-probe-at-start",
        action="store_true",
        help="no probe before step 0 (with a large --every-n-steps: the "
        "cost of the callbacks on steps that do not probe, i.e. the hot path)",
    )
    args = p.parse_args()
    run_once(
        20, True, args.every_n_steps, args.accelerator, not args.no_probe_at_start
    )  # warm-up: imports, allocator, first compile of kernels
    ratios, rows = [], []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        res = {
            flag: run_once(args.steps, flag, args.every_n_steps, args.accelerator, not args.no_probe_at_start)
            for flag in order
        }
        ratios.append(res[True]["seconds"] / res[False]["seconds"])
        rows.append(res)
        print(f"pair {i}: none {res[False]['seconds']:.2f}s  all {res[True]['seconds']:.2f}s  ratio {ratios[-1]:.3f}")
    print(json.dumps({
        "steps": args.steps, "pairs": args.pairs, "every_n_steps": args.every_n_steps,
        "probe_at_start": not args.no_probe_at_start,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "median_ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios],
        "peak_mib_none": max(r[False]["peak_mib"] for r in rows),
        "peak_mib_all": max(r[True]["peak_mib"] for r in rows),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
