"""What the analysis callbacks cost training: bare runs against runs with the callbacks, side by side.

Runs alternate (none, with, with, none, ...) so drift in machine load hits both arms alike; the figure of merit is
the median over pairs of ``time(with) / time(none)``, timed from the first callback's ``on_train_start`` to the return
of ``trainer.fit`` (so the final probe is inside the timing; set-up and data loading are outside, and reported
separately as the whole-``fit`` ratio). The figures of the last probe are drawn by the figure worker process after
``fit`` returns: the script waits for them after each run, outside the timing (so they do not overlap the next run),
and reports how long they took as ``figures_after_fit_s``. ``fraction_logged`` is the budget's own account (analysis
seconds over training seconds, measured inside each run): unlike the ratio it is not moved by the machine's speed
drifting between runs, but it leaves out indirect costs. For each run with callbacks it also reports how many probes
the time budget gave and what one probe cost, per callback (the shared forward separately).

    python benchmarks/overhead.py                                   # defaults: quickstart and MNIST, the six callbacks
    python benchmarks/overhead.py --configs quickstart --steps 300 --pairs 5
    python benchmarks/overhead.py --callbacks all                   # all nine (the six and the PDE lens)
    python benchmarks/overhead.py --each                            # each callback alone, one run each
    python benchmarks/overhead.py --configs realistic --accelerator gpu --precision bf16-mixed   # d=512, 12 layers
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pdelightning.cli import build_cli
from pdelightning.plugin import build_callbacks

try:  # absent from versions before the shared probe (the script also times those, for the "before" column)
    from pdelightning.plugin import GROUPS
    from pdelightning.probing.hub import ProbeHub
except ImportError:
    GROUPS, ProbeHub = {"paper": "all"}, None  # type: ignore[assignment]
try:  # absent before the figure worker process
    from pdelightning.probing.figures import wait_for_figures
except ImportError:
    wait_for_figures = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pdelightning" / "configs"
CONFIGS = {
    "quickstart": ["-c", str(CONFIGS / "quickstart.yaml")],
    "mnist": ["-c", str(CONFIGS / "mnist_transformer.yaml")],
    # a realistic size for a GPU: d = 512, 12 layers, sequences of 256 tokens (synthetic)
    "realistic": [
        "-c", str(CONFIGS / "quickstart.yaml"),
        "--data=SyntheticTokenDataModule", "--data.init_args.max_len=256", "--data.init_args.batch_size=32",
        "--model.model.init_args.d_model=512", "--model.model.init_args.n_layers=12",
        "--model.model.init_args.n_heads=8", "--model.model.init_args.d_ff=2048",
    ],
}  # fmt: skip


class _Start(L.Callback):
    def __init__(self) -> None:
        self.t = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()


class _End(L.Callback):
    def __init__(self) -> None:
        self.t = 0.0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()


def run_once(config: str, steps: int, spec: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``config`` for ``steps`` steps with the callbacks of ``spec`` (``None``: none); seconds and probes."""
    extra = [f"--data.init_args.data_dir={args.mnist_dir}"] if config == "mnist" else []
    cli = build_cli([*CONFIGS[config], *extra, "--seed_everything=0"], run=False)
    start, end = _Start(), _End()
    if spec and ProbeHub is None and spec == "paper":
        spec = "all"  # before the shared probe, "all" meant the six
    callbacks = [start, *(build_callbacks(spec) if spec else []), end]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_steps=steps, max_epochs=-1, accelerator=args.accelerator, devices=1, precision=args.precision,
            logger=TensorBoardLogger(tmp), callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(cli.model, datamodule=cli.datamodule)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        fit_s = t1 - t0
        if wait_for_figures is not None:
            wait_for_figures()  # outside the timing: the worker draws after fit returns; not into the next run
        figures_s = time.perf_counter() - t1
    hub = ProbeHub._hubs.get(trainer) if ProbeHub is not None else None
    # to the end of fit: figures drained at teardown are part of what the user waits for
    out: dict[str, Any] = {"seconds": t1 - start.t, "loop_seconds": end.t - start.t, "fit_seconds": fit_s}
    if spec:
        out["figures_after_fit_s"] = figures_s
    if hub is not None and hub.history:
        out["probes"] = len(hub.history)
        out["probe_steps"] = [h["step"] for h in hub.history]
        keys = sorted({k for h in hub.history for k in h if k.startswith("seconds/")})
        # the mean cost of one probe after the first (the first pays one-off costs: copies, lazy imports)
        later = hub.history[1:] or hub.history
        out["probe_cost"] = {k[8:]: statistics.mean(h.get(k, 0.0) for h in later) for k in keys}
        out["first_probe_s"] = hub.history[0].get("seconds/total")
        if hub.schedule is not None:
            out["fraction_logged"] = hub.schedule.fraction()
    return out


def paired(config: str, spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Alternating bare / with-callbacks runs; the median ratio and what the callbacks did."""
    run_once(config, 20, spec, args)  # warm-up: imports, allocator, kernels
    ratios, rows = [], []
    for i in range(args.pairs):
        order = (None, spec) if i % 2 == 0 else (spec, None)
        res = {flag: run_once(config, args.steps, flag, args) for flag in order}
        ratios.append(res[spec]["seconds"] / res[None]["seconds"])
        rows.append(res)
        print(f"  {config} pair {i}: none {res[None]['seconds']:.2f}s  {spec} {res[spec]['seconds']:.2f}s  "
              f"ratio {ratios[-1]:.3f}  probes {res[spec].get('probes')}", flush=True)  # fmt: skip
    withs = [r[spec] for r in rows]
    return {
        "config": config, "callbacks": spec, "steps": args.steps, "pairs": args.pairs,
        "median_ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios],
        "median_loop_ratio": statistics.median(r[spec]["loop_seconds"] / r[None]["loop_seconds"] for r in rows),
        "median_fit_ratio": statistics.median(r[spec]["fit_seconds"] / r[None]["fit_seconds"] for r in rows),
        "probes": [w.get("probes") for w in withs], "probe_steps": withs[0].get("probe_steps"),
        "probe_cost_s": withs[-1].get("probe_cost"), "first_probe_s": withs[-1].get("first_probe_s"),
        "figures_after_fit_s": statistics.median(w.get("figures_after_fit_s", 0.0) for w in withs),
        # measured inside each run (analysis seconds over training seconds), so not moved by drift between runs
        "fraction_logged": statistics.median(w.get("fraction_logged", float("nan")) for w in withs),
        "bare_seconds": statistics.median(r[None]["seconds"] for r in rows),
    }  # fmt: skip


def main() -> None:
    """Run the benchmark and print one JSON line per configuration."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["quickstart", "mnist"], choices=sorted(CONFIGS))
    p.add_argument(
        "--callbacks", default="paper", help=f"a plugin spec: {', '.join(GROUPS)} or names (default: paper, the six)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--each", action="store_true", help="also each callback alone (one pair each)")
    p.add_argument("--mnist-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    args = p.parse_args()
    device = torch.cuda.get_device_name() if args.accelerator in ("gpu", "cuda") else f"cpu x{torch.get_num_threads()}"
    for config in args.configs:
        print(json.dumps({"device": device, **paired(config, args.callbacks, args)}), flush=True)
        if args.each:
            saved = args.pairs
            args.pairs = 1
            for name in [n for n in GROUPS.get(args.callbacks, args.callbacks.split(","))]:
                print(json.dumps({"device": device, **paired(config, name, args)}), flush=True)
            args.pairs = saved


if __name__ == "__main__":
    main()
