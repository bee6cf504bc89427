"""What the analysis callbacks cost training, measured so that the machine's drift cancels: both arms at once.

``overhead.py`` alternates bare and with-callbacks runs. On a machine whose speed drifts from one run to the next
(a shared VM: bare runs of the same work differing by 15 % or more), its pair ratios scatter more than the 3 % they
are meant to resolve. Here each pair runs **at the same time**: the bare arm and the with-callbacks arm in two
processes, each pinned to its own core with one torch thread, their timed runs started together (a barrier after a
warm-up), so whatever slows the machine during the pair slows both. The arms swap cores from pair to pair. An arm
that finishes first keeps its core busy with untimed bare training until its partner is done, so the slower arm
never gets the machine to itself. The figure of merit is the median over pairs of ``time(with) / time(none)``, timed
as in ``overhead.py`` (``on_train_start`` to the return of ``fit``).

What it measures differs from ``overhead.py`` in one respect: one thread per process instead of torch's default
(the machine's cores are split between the arms). Both are reported in the README.

    python benchmarks/overhead_concurrent.py                                  # quickstart and MNIST, the six
    python benchmarks/overhead_concurrent.py --configs quickstart --pairs 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import CONFIGS, ROOT, run_once

RESULT = "RESULT "


def child(args: argparse.Namespace) -> None:
    """One arm: pinned to one core, one thread; warm up, meet the partner, time one run, then keep the core busy."""
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    spec = None if args.arm == "none" else args.callbacks
    run_once(args.config, 20, spec, args)  # imports, allocator, kernels
    sync = Path(args.sync)
    (sync / f"ready.{args.arm}").touch()
    while len(list(sync.glob("ready.*"))) < 2:
        time.sleep(0.01)
    print(RESULT + json.dumps(run_once(args.config, args.steps, spec, args)), flush=True)
    while True:  # untimed load until the parent stops this process
        run_once(args.config, args.steps, None, args)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    raise RuntimeError(f"an arm exited ({proc.wait()}) without a result; its stderr is above")


def pair(config: str, index: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Both arms of one pair at once, on swapped cores every other pair."""
    cores = (0, 1) if index % 2 == 0 else (1, 0)
    with tempfile.TemporaryDirectory() as sync:
        env = {**os.environ, "TMPDIR": sync}  # a killed arm's log directories go with this one
        common = ["--config", config, "--steps", str(args.steps), "--callbacks", args.callbacks, "--sync", sync,
                  "--mnist-dir", args.mnist_dir, "--accelerator", "cpu", "--precision", args.precision]  # fmt: skip
        procs = {
            arm: subprocess.Popen(
                [sys.executable, __file__, "--arm", arm, "--core", str(core), *common],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for arm, core in zip(("none", "with"), cores, strict=True)
        }
        try:
            return {arm: _result(proc) for arm, proc in procs.items()}
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()


def main() -> None:
    """Run the pairs and print one JSON line per configuration."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["quickstart", "mnist"], choices=sorted(CONFIGS))
    p.add_argument("--callbacks", default="paper", help="a plugin spec (default: paper, the six)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--mnist-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--precision", default="32-true")
    p.add_argument("--arm", choices=["none", "with"], help=argparse.SUPPRESS)
    p.add_argument("--core", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sync", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--accelerator", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm is not None:
        child(args)
        return
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit(f"needs 2 cores to run both arms at once; this process may use {os.sched_getaffinity(0)}")
    for config in args.configs:
        ratios, withs, bares = [], [], []
        for i in range(args.pairs):
            res = pair(config, i, args)
            ratios.append(res["with"]["seconds"] / res["none"]["seconds"])
            withs.append(res["with"])
            bares.append(res["none"]["seconds"])
            print(f"  {config} pair {i}: none {bares[-1]:.2f}s  with {withs[-1]['seconds']:.2f}s  "
                  f"ratio {ratios[-1]:.3f}  probes {withs[-1].get('probes')}", flush=True)  # fmt: skip
        print(json.dumps({
            "device": "cpu, one core and one thread per arm", "config": config, "callbacks": args.callbacks,
            "steps": args.steps, "pairs": args.pairs, "median_ratio": statistics.median(ratios),
            "ratios": [round(r, 4) for r in ratios], "probes": [w.get("probes") for w in withs],
            "fraction_logged": statistics.median(w.get("fraction_logged", float("nan")) for w in withs),
            "probe_cost_s": withs[-1].get("probe_cost"), "bare_seconds": statistics.median(bares),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
