"""How close each probe is to its floor: the probe's cost against the model forwards it cannot avoid.

A probe must run the model over the probe set once (the *shared forward*, with the captures every callback asked
for); PerturbationEval must run its perturbed (ε) batches, and AttentionSimilarity / InformationFlow their
reference and null models. Everything else (hooks, statistics, estimators, gathers, logging) is overhead on top.
For each callback this script reports

    ratio = (shared forward + the callback's own time) / (shared forward + the forwards the callback must run)

(the cost of a probe with that callback alone, over the forwards it cannot avoid), and for the whole probe
``(shared forwards + every callback's time) / (every unavoidable forward)``. Forward time is measured by timing
every model call of the probe (``call_model``): the shared forward's, the extra models' (charged to the callbacks
that asked for them) and those made inside a callback's ``consume`` (its own forwards). A backward a callback runs
(PerturbationEval's gradient direction) is not a forward and counts as overhead. Probes after the first are
averaged (the first pays one-off costs); run it on a quiet machine and read the ratios, not the seconds.

    python benchmarks/probe_floor.py                       # quickstart and MNIST, the six callbacks at their defaults
    python benchmarks/probe_floor.py --configs mnist --probes 4 --callbacks all
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import Logger

import pdelightning.probing.session as session_module
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.cli import build_cli
from pdelightning.plugin import build_callbacks
from pdelightning.probing.hub import ProbeHub

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pdelightning" / "configs"
CONFIGS = {
    "quickstart": ["-c", str(CONFIGS / "quickstart.yaml")],
    "mnist": ["-c", str(CONFIGS / "mnist_transformer.yaml")],
}


class ForwardClock:
    """Times every model call of a probe, by who made it: ``shared`` (the model in the shared forward), ``extra:<id>``
    (a reference or null model), or the name of the callback whose ``consume``/``finish`` is running."""

    def __init__(self) -> None:
        self.current = "shared"
        self.seconds: dict[str, float] = defaultdict(float)
        self._call = session_module.call_model

    def install(self, pl_module: torch.nn.Module) -> None:
        clock, call = self, self._call

        def timed(module: torch.nn.Module, batch: Any) -> Any:
            who = clock.current
            if who == "shared" and module is not pl_module:
                who = f"extra:{id(module)}"
            t = time.perf_counter()
            out = call(module, batch)
            clock.seconds[who] += time.perf_counter() - t
            return out

        session_module.call_model = timed  # forward_batch and ProbeBatch.forward look it up in this module

    def wrap(self, callback: ProbeCallback) -> None:
        clock = self
        for hook in ("consume", "finish"):
            fn: Callable[..., Any] = getattr(callback, hook)

            def wrapped(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
                clock.current = callback.name
                try:
                    return _fn(*args, **kwargs)
                finally:
                    clock.current = "shared"

            setattr(callback, hook, wrapped)


class Snapshot(L.Callback):
    """After each probe step: the clock's seconds since the last probe, beside the hub's timings of that probe."""

    def __init__(self, clock: ForwardClock, callbacks: list[ProbeCallback]) -> None:
        self.clock, self.callbacks, self.rows, self._n = clock, callbacks, [], 0
        self.extras: dict[str, list[str]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        hub = ProbeHub._hubs.get(trainer)
        if hub is not None and len(hub.history) > self._n:
            self._n = len(hub.history)
            self.rows.append({"hub": dict(hub.history[-1]), "forwards": dict(self.clock.seconds)})
            self.clock.seconds.clear()
            # which callback asked for which reference / null model (charged their forwards)
            self.extras = {
                c.name: [f"extra:{id(m)}" for m, _ in c.extra_models(pl_module).values()] for c in self.callbacks
            }


class _Discard(Logger):
    """A logger that keeps nothing: with ``logger=False`` the plugin's callbacks would step aside."""

    name, version = "discard", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def measure(config: str, spec: str, probes: int, every: int, args: argparse.Namespace) -> dict[str, Any]:
    extra = [f"--data.init_args.data_dir={args.mnist_dir}"] if config == "mnist" else []
    cli = build_cli([*CONFIGS[config], *extra, "--seed_everything=0"], run=False)
    callbacks = [c for c in build_callbacks(spec) if isinstance(c, ProbeCallback)]
    for c in callbacks:  # the defaults, at a fixed cadence: enough probes in a short run
        c.every_n_steps, c.budget, c.probe_at_start = every, None, False
    clock = ForwardClock()
    clock.install(cli.model)
    for c in callbacks:
        clock.wrap(c)
    snap = Snapshot(clock, callbacks)
    trainer = L.Trainer(
        max_steps=every * probes, max_epochs=-1, accelerator=args.accelerator, devices=1, logger=_Discard(),
        callbacks=[*callbacks, snap], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(cli.model, datamodule=cli.datamodule)
    rows = snap.rows[1:] or snap.rows  # the first probe pays one-off costs
    extras = snap.extras
    mean = lambda f: statistics.mean(f(r) for r in rows)  # noqa: E731
    shared = mean(lambda r: r["forwards"].get("shared", 0.0))
    per: dict[str, dict[str, float]] = {}
    total_cost, total_floor = shared, shared
    for c in callbacks:
        own = mean(lambda r, c=c: r["hub"].get(f"seconds/{c.name}", 0.0))
        forwards = mean(
            lambda r, c=c: r["forwards"].get(c.name, 0.0) + sum(r["forwards"].get(k, 0.0) for k in extras[c.name])
        )
        extra_s = mean(lambda r, c=c: sum(r["forwards"].get(k, 0.0) for k in extras[c.name]))
        cost = shared + own + extra_s  # the extra models run inside the hub's shared forward
        floor = shared + forwards
        per[c.name] = {
            "ratio": round(cost / floor, 3),
            "own_forwards_share": round(forwards / max(cost - shared, 1e-12), 3),
        }
        total_cost += own
        total_floor += mean(lambda r, c=c: r["forwards"].get(c.name, 0.0))
    all_extra = {k for ks in extras.values() for k in ks}
    extra_total = mean(lambda r: sum(v for k, v in r["forwards"].items() if k in all_extra))
    total_cost += extra_total
    total_floor += extra_total
    probe_total = mean(lambda r: r["hub"].get("seconds/total", float("nan")))
    return {
        "config": config, "callbacks": spec, "probes_averaged": len(rows), "per_callback": per,
        "total_ratio": round(total_cost / total_floor, 3),
        "probe_total_over_floor": round(probe_total / total_floor, 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def main() -> None:
    """Print one JSON line per configuration."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["quickstart", "mnist"], choices=sorted(CONFIGS))
    p.add_argument("--callbacks", default="paper", help="a plugin spec (default: paper, the six)")
    p.add_argument("--probes", type=int, default=4, help="probes per run (the first is not averaged)")
    p.add_argument("--every", type=int, default=10, help="steps between probes")
    p.add_argument("--mnist-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args()
    for config in args.configs:
        print(json.dumps(measure(config, args.callbacks, args.probes, args.every, args)), flush=True)


if __name__ == "__main__":
    main()
