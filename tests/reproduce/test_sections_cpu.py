"""Section behaviour added for runs of several machines and budgets: where each run was trained, the cuts, the
accuracy fallback to the probe set, and the warning when the rules' I(T;Y) estimator reads below zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdelightning_reproduce.pipeline import publish
from pdelightning_reproduce.rules import NEWSGROUPS_LAYERS
from pdelightning_reproduce.sections.bottleneck import bottleneck
from pdelightning_reproduce.sections.common import accuracy_text, cell, est
from pdelightning_reproduce.sections.runs import runs
from pdelightning_reproduce.summary import Results, Row, read_runs, read_summary, write_rows
from tests.reproduce.planted import Planter


def test_device_and_budget_tables_name_every_run() -> None:
    p = Planter()
    p.run(
        "mnist_pde",
        seeds=(2,),
        device="cuda: NVIDIA H200",
        gpu=True,
        budget="full",
        wall_s=77.0,
        imported="GPU run: final weights",
        init_regenerated=True,
    )
    p.run(
        "mnist_pde",
        seeds=(0, 1, 3, 4),
        device="cpu: x86_64, 2 cores",
        gpu=False,
        budget="cpu",
        wall_s=1200.0,
        cuts="none (the same config as the GPU runs)",
    )
    p.run("newsgroups_pde", device="cpu: x86_64, 2 cores", gpu=False, budget="cpu", wall_s=300.0, cuts="3,000 posts")
    sec = runs(p.results())
    devices = next(t for t in sec.tables if t.headers[:2] == ["setting", "device"])
    rows = {(r[0], r[1]): r for r in devices.rows}
    assert (
        rows[("mnist_pde", "cuda: NVIDIA H200")][3] == "2"
        and "regenerated" in rows[("mnist_pde", "cuda: NVIDIA H200")][4]
    )
    assert rows[("mnist_pde", "cpu: x86_64, 2 cores")][3] == "0, 1, 3, 4"
    budgets = next(t for t in sec.tables if t.headers[:2] == ["setting", "budget"])
    assert ["newsgroups_pde", "cpu", "5", "3,000 posts"] in budgets.rows
    compute = next(t for t in sec.tables if t.headers[0] == "device")
    assert any(r[0] == "cpu: x86_64, 2 cores" and r[1] == "9" for r in compute.rows)
    assert "1 trained on a GPU" in sec.intro


def test_accuracy_falls_back_to_the_probe_set() -> None:
    p = Planter().add("newsgroups_pde", "probe_acc", lambda s: 0.5).add("mnist_pde", "test_acc", lambda s: 0.98)
    text = accuracy_text(p.results(), [("PDE", "newsgroups_pde"), ("M", "mnist_pde")])
    assert "PDE (probe set) 0.5000" in text and "M 0.9800" in text


def test_warning_when_the_fixed_estimator_reads_below_zero() -> None:
    def planted(end: float) -> list[str]:
        p = Planter()
        for s in ("newsgroups_transformer", "newsgroups_pde"):
            for st, v in (("init", -0.9), ("final", 1.2)):
                p.add(s, "I_TY_crossfit", lambda seed, v=v: np.full(4, v), NEWSGROUPS_LAYERS, stage=st, noise=0.01)
            for st, v in (("init", 0.0), ("final", end)):
                p.add(s, "I_TY", lambda seed, v=v: np.full(4, v), NEWSGROUPS_LAYERS, stage=st, noise=0.01)
            p.add(s, "head_bound", lambda seed: 1.1, noise=0.01)
        return bottleneck(p.results()).notes

    below = planted(-1.5)
    assert len(below) == 2 and all("below zero" in n and "train/test shift" in n for n in below)
    assert planted(0.8) == []


def test_a_seed_without_final_accuracy_cannot_pass_the_convergence_check() -> None:
    """'Every seed must pass': a seed with no val/acc makes the precondition not comparable, never holds on the rest."""
    p = Planter().run("mnist_transformer", val_acc=lambda s: None if s == 2 else 0.98)
    claim = runs(p.results()).claims[0]
    assert claim.verdict == "not comparable" and "seed 2 of `mnist_transformer` has no final val/acc" in claim.why
    assert claim.ours == "final val/acc per seed: 0.9800, 0.9800, none, 0.9800, 0.9800"
    full = runs(Planter().run("mnist_transformer", val_acc=0.98).results()).claims[0]
    assert full.verdict == "holds"


def test_a_run_table_without_some_fields_reads_as_missing_values() -> None:
    """An older or partial runs.csv (no val_acc, final_step, wall_s column) still gives the runs section."""
    r = Planter().run("mnist_transformer", val_acc=0.98).run("newsgroups_pde", val_acc=0.7).results()
    thin = Results(r.df, r.runs.drop(columns=["val_acc", "final_step", "wall_s"]))
    sec = runs(thin)
    assert sec.claims[0].verdict == "not comparable"
    table = next(t for t in sec.tables if t.headers[:2] == ["setting", "role"])
    row = next(row for row in table.rows if row[0] == "newsgroups_pde")
    assert row[2] == "5" and row[8] == "—" and row[9] == cell(est([])) and row[10] == "—"
    assert not any(t.headers[0] == "device" for t in sec.tables)  # no wall times: no compute table


def test_a_run_table_without_cell_or_seed() -> None:
    """No ``cell`` column: every run is a main run (cell ""); no ``seed`` or ``setting``: an error naming columns."""
    r = Planter().run("mnist_transformer", val_acc=0.98).results()
    no_cell = Results(r.df, r.runs.drop(columns=["cell"]))
    assert runs(no_cell).claims[0].verdict == "holds"
    with pytest.raises(ValueError, match=r"no seed column; its columns: \['setting'"):
        Results(r.df, r.runs.drop(columns=["seed"]))


def test_publishing_a_redone_unit_drops_the_files_it_no_longer_has(tmp_path: Path) -> None:
    """A redone run that failed (run.json, no summary.csv) leaves no summary of the attempt before it in dest."""
    out, dest = tmp_path / "runs", tmp_path / "pub"
    unit = out / "mnist_pde" / "seed0"
    unit.mkdir(parents=True)
    (unit / "run.json").write_text(json.dumps({"setting": "mnist_pde", "cell": "", "seed": 0, "status": "complete"}))
    write_rows(unit / "summary.csv", [Row("mnist_pde", "", 0, 10, "final", "val_acc", "", 0.9)])
    publish(out, dest, unit)
    assert len(read_summary(dest)) == 1
    (unit / "summary.csv").unlink()
    (unit / "run.json").write_text(json.dumps({"setting": "mnist_pde", "cell": "", "seed": 0, "status": "failed"}))
    publish(out, dest, unit)
    assert not (dest / "units" / "mnist_pde" / "seed0" / "summary.csv").exists() and read_summary(dest).empty
    assert read_runs(dest)["status"].tolist() == ["failed"]
