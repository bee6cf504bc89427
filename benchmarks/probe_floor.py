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
averaged (the first pays one-off costs); the table gives the ratio of the mean cost to the mean floor, the spread
(lowest and highest) of the per-probe ratios, and ``pass`` where the ratio meets the goal of at most 2x (``OVER``
where not). Run it on a quiet machine and read the ratios, not the seconds; ``--threads 1`` steadies a shared one.

    python benchmarks/probe_floor.py                       # quickstart and MNIST, the six callbacks at their defaults
    python benchmarks/probe_floor.py --configs mnist --probes 4 --callbacks all --json
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


GOAL = 2.0
"""Issue 22's goal: a probe costs at most twice the forwards it cannot avoid."""


Row = dict[str, Any]


def _ratios(
    rows: list[Row],
    shared: Callable[[Row], float],
    extra: Callable[[Row], float],
    own: Callable[[Row], float],
    forwards: Callable[[Row], float],
) -> dict[str, Any]:
    """The ratio of the mean cost to the mean floor over the probes, and the spread of the per-probe ratios."""
    cost = [shared(r) + own(r) + extra(r) for r in rows]  # the extra models run inside the hub's shared forward
    floor = [shared(r) + forwards(r) for r in rows]
    each = [c / max(f, 1e-12) for c, f in zip(cost, floor, strict=True)]
    ratio = statistics.mean(cost) / max(statistics.mean(floor), 1e-12)
    return {"ratio": round(ratio, 3), "min": round(min(each), 3), "max": round(max(each), 3)}


def measure(config: str, spec: str, probes: int, every: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``config`` with ``spec``'s callbacks for ``probes`` probes: the ratios of the probes after the first."""
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
        max_steps=every * probes,
        max_epochs=-1,
        accelerator=args.accelerator,
        devices=1,
        logger=_Discard(),  # a logger: with logger=False the plugin's callbacks step aside
        callbacks=[*callbacks, snap],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(cli.model, datamodule=cli.datamodule)
    if not snap.rows:
        raise SystemExit(f"{config}: no probe ran in {every * probes} steps (did the callbacks step aside?)")
    rows = snap.rows[1:] or snap.rows  # the first probe pays one-off costs
    extras = snap.extras
    all_extra = {k for ks in extras.values() for k in ks}

    def fwd(r: dict[str, Any], key: str) -> float:
        return r["forwards"].get(key, 0.0)

    def shared(r: dict[str, Any]) -> float:
        return fwd(r, "shared")

    per: dict[str, dict[str, Any]] = {}
    for c in callbacks:
        name, keys = c.name, extras[c.name]
        per[name] = _ratios(
            rows,
            shared,
            extra=lambda r, keys=keys: sum(fwd(r, k) for k in keys),
            own=lambda r, name=name: r["hub"].get(f"seconds/{name}", 0.0),
            forwards=lambda r, name=name, keys=keys: fwd(r, name) + sum(fwd(r, k) for k in keys),
        )
    names = [c.name for c in callbacks]
    total = _ratios(
        rows,
        shared,
        extra=lambda r: sum(v for k, v in r["forwards"].items() if k in all_extra),
        own=lambda r: sum(r["hub"].get(f"seconds/{n}", 0.0) for n in names),
        forwards=lambda r: sum(fwd(r, n) for n in names) + sum(fwd(r, k) for k in all_extra),
    )
    probe_total = statistics.mean(r["hub"].get("seconds/total", float("nan")) for r in rows)
    floor = statistics.mean(shared(r) + sum(fwd(r, n) for n in names) + sum(fwd(r, k) for k in all_extra) for r in rows)
    return {
        "config": config,
        "callbacks": spec,
        "probes_averaged": len(rows),
        "per_callback": per,
        "total": total,
        "probe_total_over_floor": round(probe_total / floor, 3),
        "shared_forward_s": round(statistics.mean(shared(r) for r in rows), 4),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def table(result: dict[str, Any]) -> str:
    """The per-callback ratios as a text table, each marked against the goal (``pass`` at most 2x, else ``over``)."""
    head = f"{result['config']}: {result['probes_averaged']} probes averaged, load average {result['load_avg_1min']}"
    lines = [head, f"  {'callback':<26} {'ratio':>6}  {'spread over probes':<18}  goal <= {GOAL:g}x"]
    rows = [*result["per_callback"].items(), ("(whole probe)", result["total"])]
    for name, r in rows:
        verdict = "pass" if r["ratio"] <= GOAL else "OVER"
        lines.append(f"  {name:<26} {r['ratio']:>6.2f}  {r['min']:.2f} - {r['max']:.2f}{'':<7}  {verdict}")
    return "\n".join(lines)


def main() -> None:
    """Print one table (and, with ``--json``, one JSON line) per configuration."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["quickstart", "mnist"], choices=sorted(CONFIGS))
    p.add_argument("--callbacks", default="paper", help="a plugin spec (default: paper, the six)")
    p.add_argument("--probes", type=int, default=6, help="probes per run (the first is not averaged)")
    p.add_argument("--every", type=int, default=10, help="steps between probes")
    p.add_argument("--mnist-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", action="store_true", help="also print each result as one JSON line")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for config in args.configs:
        result = measure(config, args.callbacks, args.probes, args.every, args)
        print(table(result), flush=True)
        if args.json:
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
