"""The compact per-run results that ``analyze`` writes and ``report`` reads (committed in ``docs/reproduction/``).

Two tables:

* ``summary.csv`` (one per analysis unit; merged into ``summary.csv.gz``), long format with the columns
  :data:`COLUMNS`: ``setting`` (a setting name, or ``pair_<name>`` for a model-vs-reference unit), ``cell`` (grid
  point of a sweep, else empty), ``seed`` (the model's seed), ``step`` (the training step of the checkpoint),
  ``stage`` (``init`` for step 0, ``final`` for the last checkpoint, empty in between), ``quantity``, ``layer``
  (``blocks.i``, ``embedding``, ``eps=…``, or empty) and ``value``.
* ``runs.csv``: one row per run with :data:`RUN_FIELDS` (from each run's ``run.json``).
* ``compute.json`` (optional): the compute the background jobs used (CPU seconds per phase), for the report.

:class:`Results` reads them for the report's sections.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pdelightning_reproduce.divergence import divergence_of_record, under_trained

COLUMNS: tuple[str, ...] = ("setting", "cell", "seed", "step", "stage", "quantity", "layer", "value")
RUN_FIELDS: tuple[str, ...] = (
    "setting",
    "cell",
    "seed",
    "status",
    "device",
    "gpu",
    "wall_s",
    "final_step",
    "epochs",
    "stop_reason",
    "plateau_met",
    "plateau_epoch",
    "val_acc",
    "best_val_acc",
    "diverged",
    "divergence_step",
    "first_nonfinite_step",
    "max_train_loss",
    "training_divergence",
    "divergence_reason",
    "divergence_at",
    "under_trained",
    "dt",
    "eq21_target",
    "n_layers",
    "lr",
    "quick",
    "budget",
    "cuts",
    "imported",
    "init_regenerated",
)
SUMMARY_NAME = "summary.csv"
MERGED_NAME = "summary.csv.gz"
RUNS_NAME = "runs.csv"
COMPUTE_NAME = "compute.json"


@dataclass(frozen=True)
class Row:
    """One long-format value."""

    setting: str
    cell: str
    seed: int
    step: int
    stage: str
    quantity: str
    layer: str
    value: float


def _fmt_value(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{float(v):.7g}"


def write_rows(path: Path, rows: Iterable[Row]) -> int:
    """Write ``rows`` to a CSV at ``path`` (gzip if it ends in ``.gz``); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    n = 0
    for r in rows:
        w.writerow((r.setting, r.cell, r.seed, r.step, r.stage, r.quantity, r.layer, _fmt_value(r.value)))
        n += 1
    data = buf.getvalue().encode()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    tmp.replace(path)
    return n


def _read_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(
        path,
        dtype={"setting": str, "cell": str, "stage": str, "quantity": str, "layer": str},
        keep_default_na=False,
        na_values={"value": ["nan"]},
    )
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df


def read_summary(source: Path) -> pd.DataFrame:
    """The long-format summary from a ``summary.csv[.gz]`` file, a folder holding ``summary.csv.gz``, or a runs root
    (every ``**/summary.csv`` under it, concatenated).

    Raises:
        FileNotFoundError: when nothing is found, naming where it looked.
    """
    source = Path(source)
    if source.is_file():
        return _read_csv(source)
    if (source / MERGED_NAME).is_file():
        return _read_csv(source / MERGED_NAME)
    parts = unit_files(source, SUMMARY_NAME)
    if not parts:
        raise FileNotFoundError(f"no {MERGED_NAME} in {source} and no {SUMMARY_NAME} under it")
    return pd.concat([_read_csv(p) for p in parts], ignore_index=True)


#: The folder inside a run's folder where ``train.train_run`` keeps what its earlier attempt left (an unfinished one,
#: or a finished one redone with ``--no-skip-existing``), and the folder the files gather in on their way there.
EARLIER_ATTEMPT = "earlier_attempt"
EARLIER_ATTEMPT_MOVING = ".earlier_attempt.moving"


def unit_files(root: Path, name: str) -> list[Path]:
    """Every file called ``name`` under ``root`` (sorted), except those of an earlier attempt of a run (in
    ``earlier_attempt/`` or on their way there).
    """
    aside = {EARLIER_ATTEMPT, EARLIER_ATTEMPT_MOVING}
    return sorted(p for p in Path(root).rglob(name) if not aside & set(p.relative_to(root).parts))


def run_row(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``runs.csv`` row of one ``run.json``.

    A record with a loss series but no divergence verdict (trained before ``train.py`` judged its runs) is judged
    here by :func:`~pdelightning_reproduce.divergence.divergence_of_record`, and a main run's ``under_trained`` is
    filled in the same way; a record without a loss series (v2's) keeps both empty: not measured.
    """
    row = {k: meta.get(k) for k in RUN_FIELDS}
    if row["training_divergence"] is None and "losses" in meta and "loss_steps" in meta:
        d = divergence_of_record(meta)
        row.update(training_divergence=d.status, divergence_reason=d.reason, divergence_at=d.step)
    if row["under_trained"] is None and meta.get("role") == "main" and meta.get("status") == "complete":
        row["under_trained"] = under_trained(meta)
    return row


def write_runs(path: Path, metas: Iterable[dict[str, Any]]) -> int:
    """Write the run table (sorted by setting, cell, seed)."""
    rows = sorted((run_row(m) for m in metas), key=lambda r: (str(r["setting"]), str(r["cell"] or ""), r["seed"]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(RUN_FIELDS)).to_csv(path, index=False)
    return len(rows)


def read_runs(source: Path) -> pd.DataFrame:
    """The run table from a ``runs.csv``, a folder holding one, or a runs root (every ``**/run.json``)."""
    source = Path(source)
    path = source if source.is_file() else source / RUNS_NAME
    if path.is_file():
        df = pd.read_csv(path, keep_default_na=False, na_values={c: [""] for c in RUN_FIELDS if c != "cell"})
        df["cell"] = df["cell"].astype(str) if "cell" in df else ""
        return df
    metas = [json.loads(p.read_text()) for p in unit_files(source, "run.json")]
    return pd.DataFrame([run_row(m) for m in metas], columns=list(RUN_FIELDS)).fillna({"cell": ""})


def merge(root: Path, dest: Path) -> tuple[int, int]:
    """Merge every unit's ``summary.csv`` and ``run.json`` under ``root`` into ``dest/summary.csv.gz`` and
    ``dest/runs.csv``; returns the numbers of summary rows and runs.
    """
    root, dest = Path(root), Path(dest)
    parts = unit_files(root, SUMMARY_NAME)
    frames = [_read_csv(p) for p in parts]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    df = df.sort_values(list(COLUMNS[:7]), kind="stable")
    rows = (Row(*r) for r in df[list(COLUMNS)].itertuples(index=False, name=None))
    n = write_rows(dest / MERGED_NAME, rows)
    metas = [json.loads(p.read_text()) for p in unit_files(root, "run.json")]
    write_runs(dest / RUNS_NAME, metas)
    return n, len(metas)


class Results:
    """Read access to a summary and its run table, for the report's sections.

    ``stage`` selects ``"final"`` or ``"init"`` values; :meth:`trajectory` gives every step.
    """

    def __init__(
        self, summary: pd.DataFrame, runs: pd.DataFrame | None = None, compute: dict[str, Any] | None = None
    ) -> None:
        self.compute = dict(compute or {})
        self.df = summary.copy()
        for col in ("cell", "stage", "layer"):
            self.df[col] = self.df[col].fillna("").astype(str)
        runs = runs if runs is not None else pd.DataFrame()
        if not runs.empty and (missing := [c for c in ("setting", "seed") if c not in runs]):
            raise ValueError(f"the run table has no {', '.join(missing)} column; its columns: {list(runs.columns)}")
        # every field of a run record is a column, so a table from an older or partial record reads as missing values
        self.runs = runs.reindex(columns=[*RUN_FIELDS, *(c for c in runs.columns if c not in RUN_FIELDS)])
        self.runs["cell"] = self.runs["cell"].fillna("").astype(str)
        self._by_key = {k: g for k, g in self.df.groupby(["setting", "quantity"], sort=False)}

    @classmethod
    def load(cls, source: Path) -> Results:
        """From a folder with ``summary.csv.gz`` and ``runs.csv`` (and optionally ``compute.json``), or a runs root."""
        source = Path(source)
        folder = source if source.is_dir() else source.parent
        compute = json.loads((folder / COMPUTE_NAME).read_text()) if (folder / COMPUTE_NAME).is_file() else None
        return cls(read_summary(source), read_runs(folder), compute)

    def has(self, setting: str, quantity: str) -> bool:
        """Whether any value of ``quantity`` exists for ``setting``."""
        return (setting, quantity) in self._by_key

    def _select(self, setting: str, quantity: str, cell: str = "", stage: str | None = "final") -> pd.DataFrame:
        g = self._by_key.get((setting, quantity))
        if g is None:
            return self.df.iloc[0:0]
        g = g[g["cell"] == cell]
        return g if stage is None else g[g["stage"] == stage]

    def per_seed(
        self, setting: str, quantity: str, layer: str = "", cell: str = "", stage: str = "final"
    ) -> dict[int, float]:
        """``seed -> value`` of one quantity at one layer."""
        g = self._select(setting, quantity, cell, stage)
        g = g[g["layer"] == layer]
        return {int(s): float(v) for s, v in zip(g["seed"], g["value"], strict=True)}

    def values(self, setting: str, quantity: str, layer: str = "", cell: str = "", stage: str = "final") -> np.ndarray:
        """The per-seed values as an array, in seed order."""
        d = self.per_seed(setting, quantity, layer, cell, stage)
        return np.array([d[k] for k in sorted(d)], dtype=float)

    def table(self, setting: str, quantity: str, cell: str = "", stage: str = "final") -> pd.DataFrame:
        """Seeds x layers of one quantity."""
        g = self._select(setting, quantity, cell, stage)
        if g.empty:
            return pd.DataFrame()
        return g.pivot_table(index="seed", columns="layer", values="value", aggfunc="first", dropna=False)

    def layers(self, setting: str, quantity: str, cell: str = "", stage: str = "final") -> list[str]:
        """The layers a quantity was recorded at, in depth order (``embedding`` first, then ``blocks.i``)."""
        g = self._select(setting, quantity, cell, stage)
        return sorted(set(g["layer"]), key=layer_key)

    def trajectory(
        self, setting: str, quantity: str, layer: str, seed: int, cell: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one seed over all checkpoints, sorted by step."""
        g = self._select(setting, quantity, cell, None)
        g = g[(g["layer"] == layer) & (g["seed"] == seed)].sort_values("step")
        return g["step"].to_numpy(dtype=int), g["value"].to_numpy(dtype=float)

    def seeds(self, setting: str, cell: str = "") -> list[int]:
        """Seeds with any value for ``setting`` (and ``cell``)."""
        g = self.df[(self.df["setting"] == setting) & (self.df["cell"] == cell)]
        return sorted(int(s) for s in set(g["seed"]))

    def run_rows(self, setting: str, cell: str | None = None) -> pd.DataFrame:
        """The ``runs.csv`` rows of a setting (and cell)."""
        r = self.runs[self.runs["setting"] == setting]
        return r if cell is None else r[r["cell"].astype(str) == cell]

    def run_field(self, setting: str, field: str, cell: str = "") -> dict[int, Any]:
        """``seed -> field`` from the run table."""
        r = self.run_rows(setting, cell)
        return {int(s): v for s, v in zip(r["seed"], r[field], strict=True)} if field in r else {}


def layer_key(name: str) -> tuple[int, float, str]:
    """Sort key: ``embedding`` first, then ``blocks.i`` by ``i``, then ``eps=…`` by ε, then the rest by name."""
    if name == "embedding":
        return (0, 0.0, name)
    if name.startswith("blocks."):
        try:
            return (1, float(name.split(".")[1]), name)
        except ValueError:
            pass
    if name.startswith("eps="):
        return (2, float(name[4:]), name)
    return (3, 0.0, name)


def rows_from(
    setting: str, cell: str, seed: int, step: int, stage: str, values: dict[str, float | dict[str, float]]
) -> list[Row]:
    """Rows of one checkpoint: ``{quantity: value}`` or ``{quantity: {layer: value}}``."""
    out = []
    for q, v in values.items():
        if isinstance(v, dict):
            out += [Row(setting, cell, seed, step, stage, q, layer, float(x)) for layer, x in v.items()]
        else:
            out.append(Row(setting, cell, seed, step, stage, q, "", float(v)))
    return out


def concat(parts: Sequence[list[Row]]) -> list[Row]:
    """Flatten lists of rows."""
    return [r for p in parts for r in p]
