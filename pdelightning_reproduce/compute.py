"""What the reproduction cost and how the two machines agree: ``docs/reproduction/compute.json`` for the report.

* CPU time of the background jobs, from the log of ``scripts/cpu_sampler.sh`` (one line per process and minute:
  ``time pid elapsed cputime``): per process the last (largest) CPU time seen, and their sum (a process that ran
  less than a minute may be missed: the sum is a lower bound by at most a minute per process).
* Parity of the two machines: every value the GPU call analysed (``units/*/summary.csv`` of its published results)
  against the same value analysed here on the CPU from the same weights, as the largest relative difference per
  quantity. It checks the imported weights, the regenerated step-0 weights and the analysis code at once.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pdelightning_reproduce.summary import COMPUTE_NAME, SUMMARY_NAME, read_summary, unit_files


def parse_duration(text: str) -> float:
    """Seconds of a ``ps`` time, ``[[dd-]hh:]mm:ss``.

    Example::

        >>> parse_duration("01:02:03"), parse_duration("1-00:00:10"), parse_duration("04:05")
        (3723.0, 86410.0, 245.0)
    """
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    h, m, s = parts
    return (float(days) if days else 0.0) * 86400 + h * 3600 + m * 60 + s


def cpu_seconds(sampler_log: Path) -> dict[str, float]:
    """``{pid: largest CPU seconds seen}`` from a ``cpu_sampler.sh`` log."""
    out: dict[str, float] = {}
    for line in Path(sampler_log).read_text().splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        pid, cpu = parts[1], parse_duration(parts[3])
        out[pid] = max(out.get(pid, 0.0), cpu)
    return out


def job_wall_seconds(log: Path) -> dict[str, float]:
    r"""Wall seconds of each run of a ``scripts/cpu_reproduce.sh`` job log (``== <time> <cmd> (pid ...)`` to
    ``== <time> <cmd> exit <rc>``), summed per command; a run without its exit line is not counted.

    Example::

        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "train.log"
        >>> _ = p.write_text("== 2026-11-27T18:00:00Z train (pid 1)\nx\n== 2026-11-27T19:30:00Z train exit 0\n")
        >>> job_wall_seconds(p)
        {'train': 5400.0}
    """
    from datetime import datetime

    out: dict[str, float] = {}
    start: tuple[str, datetime] | None = None
    for line in Path(log).read_text().splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "==":
            continue
        when = datetime.fromisoformat(parts[1].replace("Z", "+00:00"))
        if len(parts) >= 4 and parts[3] == "exit" and start is not None:
            out[start[0]] = out.get(start[0], 0.0) + (when - start[1]).total_seconds()
            start = None
        elif parts[3:4] != ["exit"]:
            start = (parts[2], when)
    return out


def parity(gpu_units: Path, cpu_units: Path) -> dict[str, Any]:
    """The largest relative difference per quantity between the GPU call's analysis and ours of the same units.

    Only values both computed are compared (same unit, stage, step, quantity, layer); relative to ``max(|gpu|,
    1e-9)``.
    """
    frames = []
    for part in unit_files(Path(gpu_units), SUMMARY_NAME):
        rel = part.parent.relative_to(gpu_units)
        mine = Path(cpu_units) / rel / SUMMARY_NAME
        if not mine.is_file():
            continue
        keys = ["setting", "seed", "stage", "step", "quantity", "layer"]
        m = read_summary(part).merge(read_summary(mine), on=keys, suffixes=("_gpu", "_cpu"))
        m["unit"] = str(rel)
        frames.append(m)
    if not frames:
        return {"units": 0, "values": 0}
    df = pd.concat(frames, ignore_index=True)
    df = df[df["value_gpu"].notna() & df["value_cpu"].notna()]
    rel = (df["value_cpu"] - df["value_gpu"]).abs() / df["value_gpu"].abs().clip(lower=1e-9)
    worst = rel.groupby(df["quantity"]).max()
    return {
        "units": sorted(set(df["unit"])),
        "values": len(df),
        "max_relative_difference": float(rel.max()) if len(rel) else math.nan,
        "per_quantity": {k: float(v) for k, v in worst.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pdelightning_reproduce.compute``: write ``compute.json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sampler", type=Path, required=True, help="cpu_sampler.log")
    p.add_argument("--job-logs", type=Path, nargs="*", default=[], help="cpu_reproduce.sh job logs")
    p.add_argument("--gpu-units", type=Path, default=None, help="units/ published by the GPU call")
    p.add_argument("--cpu-units", type=Path, default=None, help="units/ published by the CPU analysis")
    p.add_argument("--out", type=Path, required=True, help="folder receiving compute.json")
    args = p.parse_args(argv)
    cpu = cpu_seconds(args.sampler)
    result: dict[str, Any] = {"cpu_seconds_by_process": cpu, "cpu_seconds_total": sum(cpu.values())}
    wall: dict[str, float] = {}
    for log in args.job_logs:
        for cmd, sec in job_wall_seconds(log).items():
            wall[cmd] = wall.get(cmd, 0.0) + sec
    result["wall_seconds_by_job"] = wall
    if args.gpu_units is not None and args.cpu_units is not None:
        result["gpu_cpu_parity"] = parity(args.gpu_units, args.cpu_units)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / COMPUTE_NAME).write_text(json.dumps(result, indent=1))
    print(f"[compute] {args.out / COMPUTE_NAME}: {result['cpu_seconds_total'] / 3600:.2f} CPU hours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
