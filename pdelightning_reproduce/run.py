"""``pdelightning-reproduce``: train every setting x seed, analyse the saved weights, merge the summaries.

    pdelightning-reproduce train --out runs/paper --mnist-dir DATA --newsgroups-dir DATA/20newsgroups
    pdelightning-reproduce analyze --out runs/paper
    pdelightning-reproduce all --out runs/paper ... --workers 8 --publish results/   # both, analysing as runs finish
    pdelightning-reproduce all ... --quick      # the same pipeline on tiny budgets: checks it end to end
    pdelightning-reproduce report results/ --out docs     # the report, from the merged summary (no training)

The settings, seeds, grids and checkpoint steps are in :mod:`pdelightning_reproduce.settings`; the quantities and
verdict rules in :mod:`pdelightning_reproduce.rules`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdelightning_reproduce.budget import BUDGETS
from pdelightning_reproduce.settings import QUICK_SEEDS, SEEDS, SETTING_NAMES, Plan

COMMANDS = ("train", "analyze", "all")


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``pdelightning-reproduce``."""
    p = argparse.ArgumentParser(
        prog="pdelightning-reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=COMMANDS, help="train, analyze, or all (both, pipelined)")
    p.add_argument("--out", type=Path, default=Path("runs/paper"), help="root of the run folders")
    p.add_argument("--mnist-dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    p.add_argument("--newsgroups-dir", type=Path, default=Path("data"), help="20news-bydate.tar.gz or its folder")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help=f"default {list(SEEDS)} ({list(QUICK_SEEDS)} with --quick)"
    )
    p.add_argument(
        "--sweep-seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the sweep settings (default: the budget's; with --seeds and no budget, --seeds)",
    )
    p.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="full",
        help="seeds, sweep cells and cuts (pdelightning_reproduce/budget.py); default full",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        default=list(SETTING_NAMES),
        choices=SETTING_NAMES,
        metavar="SETTING",
        help=f"subset of {', '.join(SETTING_NAMES)}",
    )
    p.add_argument(
        "--cells",
        nargs="+",
        default=None,
        metavar="SETTING:CELL",
        help="train only these cells of the sweep settings named (others of those settings are skipped)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="folder receiving summaries as units finish (default <out>/_published)",
    )
    p.add_argument(
        "--stop-training-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="launch no training run after this many seconds (analyses continue)",
    )
    p.add_argument("--quick", action="store_true", help="tiny budgets: a pipeline check, numbers mean nothing")
    p.add_argument("--no-skip-existing", action="store_true", help="redo finished runs and analyses")
    p.add_argument("extra", nargs="*", help="extra arguments for every `pdelightning fit` (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 when no unit failed."""
    args = parser().parse_args(argv)
    if args.workers < 1:
        parser().error(f"--workers {args.workers}: must be at least 1")
    from pdelightning_reproduce.pipeline import run_pipeline

    b = BUDGETS[args.budget]
    seeds = tuple(args.seeds) if args.seeds else (QUICK_SEEDS if args.quick else b.main_seeds)
    if args.sweep_seeds:
        sweep_seeds: tuple[int, ...] | None = tuple(args.sweep_seeds)
    elif args.quick or args.seeds:
        sweep_seeds = None
    else:
        sweep_seeds = b.sweep_seeds
    cells: dict[str, tuple[str, ...]] = {} if args.cells else dict(b.cells)
    for item in args.cells or []:
        name, sep, cell = item.partition(":")
        if not sep or name not in SETTING_NAMES:
            parser().error(f"--cells {item!r}: expected SETTING:CELL with SETTING one of {', '.join(SETTING_NAMES)}")
        cells[name] = (*cells.get(name, ()), cell)
    plan = Plan(
        settings=tuple(args.settings),
        seeds=seeds,
        quick=args.quick,
        cells=cells,
        sweep_seeds=sweep_seeds,
        budget=args.budget,
    )
    status = run_pipeline(
        plan,
        args.out,
        {"mnist": args.mnist_dir, "newsgroups": args.newsgroups_dir},
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        train=args.command in ("train", "all"),
        analyze=args.command in ("analyze", "all"),
        publish_to=args.publish,
        stop_training_after_s=args.stop_training_after,
        skip_existing=not args.no_skip_existing,
        extra=args.extra,
    )
    if status["failed"]:
        print(f"[reproduce] failed: {', '.join(status['failed'])}", file=sys.stderr)
    return 1 if status["failed"] else 0
