"""The reproduction pipeline end to end on generated data: train -> analyse (runs and pairs) -> publish -> report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pdelightning_reproduce.__main__ import main
from pdelightning_reproduce.analyze import checkpoints
from pdelightning_reproduce.measures import eq21_per_step
from pdelightning_reproduce.recorder import load_model
from pdelightning_reproduce.settings import RunSpec
from pdelightning_reproduce.summary import read_runs, read_summary, unit_files
from pdelightning_reproduce.train import train_run
from tests.test_cli import fake_mnist

REPO = Path(__file__).resolve().parents[2]


def _console(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pdelightning_reproduce ARGS`` run from ``cwd`` (outside the repository), as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "pdelightning_reproduce", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_quick_pipeline_trains_analyses_publishes_and_reports(tmp_path: Path) -> None:
    mnist = fake_mnist(tmp_path / "mnist", n_train=96, n_test=48)
    out, pub = tmp_path / "runs", tmp_path / "pub"
    args = ["all", "--quick", "--out", str(out), "--publish", str(pub), "--mnist-dir", str(mnist), "--seeds", "0", "3"]
    args += ["--settings", "mnist_transformer", "mnist_pde", "--workers", "1"]
    (tmp_path / "cwd").mkdir()
    done = _console(args, tmp_path / "cwd")
    assert done.returncode == 0, done.stderr[-3000:]
    for setting in ("mnist_transformer", "mnist_pde"):
        for seed in (0, 3):
            rdir = out / setting / f"seed{seed}"
            meta = json.loads((rdir / "run.json").read_text())
            assert meta["status"] == "complete", (rdir / "train.log").read_text()[-3000:]
            assert [st for _, st, _ in checkpoints(rdir)] == ["init", "final"]
            assert list(rdir.glob("events.out.tfevents.*")), "TensorBoard events are kept"
            assert meta["config"] == f"pdelightning_reproduce/configs/{setting}.yaml"
    runs = pd.read_csv(pub / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"complete"}
    summary = pd.read_csv(pub / "summary.csv.gz")
    pair = summary[summary["setting"] == "pair_pde_vs_transformer"]
    assert set(pair["seed"]) == {0, 3}
    assert {"cosine", "null_uniform_cosine", "pearson_vs_reference"} <= set(pair["quantity"])
    assert json.loads((out / "pair_pde_vs_transformer" / "seed0" / "pair.json").read_text())["reference_seed"] == 3
    assert json.loads((out / "pair_pde_vs_transformer_shared_init/seed3/pair.json").read_text())["reference_seed"] == 3
    assert (pub / "progress.log").read_text().count("] analysed ") == 4 + 6
    done = _console(["report", str(pub), "--out", str(tmp_path / "report")], tmp_path / "cwd")
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "report" / "REPRODUCTION.md"
    assert f"[report] {report}" in done.stdout
    text = report.read_text()
    assert "QUICK PIPELINE CHECK" in text and "## Verdicts that changed since v2" in text
    assert "`pdelightning-reproduce report " in text
    pngs = list((tmp_path / "report" / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size <= 200_000 for p in pngs)


def test_pde_sweep_chooses_dt_so_eq21_at_initialisation_hits_its_target(tmp_path: Path) -> None:
    # (repro-models) v3's PDE sweeps set Δt in the cell; choose_dt (v2's eq. (21) targets) is checked against the run
    from pdelightning_reproduce.train import choose_dt, fit_args

    mnist = fake_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    spec = RunSpec("sweep_pde", "dt0.5", 3)
    meta = train_run(spec, tmp_path / "runs", mnist, quick=True)
    assert meta["status"] in ("complete", "diverged"), meta.get("error")
    model, payload = load_model(spec.path(tmp_path / "runs") / "ckpt" / "step000000.pt")
    assert payload["init_args"]["dt"] == meta["dt"] == 0.5
    dt, coefficient = choose_dt(fit_args(spec, tmp_path / "runs", mnist, True, []), 1.5)
    assert max(eq21_per_step(model).values()) == pytest.approx(0.5 * coefficient, rel=1e-4)
    assert dt == pytest.approx(1.5 / coefficient) and torch.isfinite(torch.tensor(coefficient))


def test_a_new_attempt_never_reads_what_an_earlier_attempt_left(tmp_path: Path) -> None:
    """A run trained again (its earlier attempt was stopped) sets the earlier files aside: no stale checkpoint, event
    file or summary is read as the new attempt's, and nothing of them is lost."""
    mnist = fake_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    spec = RunSpec("mnist_transformer", "", 0)
    rdir = spec.path(tmp_path / "runs")
    (rdir / "ckpt").mkdir(parents=True)
    stale = {"ckpt/step009999.pt": b"weights of the stopped attempt", "events.out.tfevents.1.vm.1.0": b"x"}
    stale |= {"summary.csv": b"setting\n", "run.json": b'{"status": "running"}'}
    for name, data in stale.items():
        (rdir / name).write_bytes(data)
    meta = train_run(spec, tmp_path / "runs", mnist, quick=True)
    assert meta["status"] == "complete", meta.get("error")
    steps = [step for step, _, _ in checkpoints(rdir)]
    assert steps and 9999 not in steps and max(steps) == meta["final_step"]
    assert not (rdir / "summary.csv").exists() and len(list(rdir.glob("events.out.tfevents.*"))) == 1
    for name, data in stale.items():
        assert (rdir / "earlier_attempt" / name).read_bytes() == data
    runs = read_runs(tmp_path / "runs")  # a runs root: the earlier attempt's run.json is not a run
    assert len(runs) == 1 and runs["status"].tolist() == ["complete"]
    with pytest.raises(FileNotFoundError):  # nor its summary.csv the new attempt's (not analysed yet)
        read_summary(tmp_path / "runs")
    meta = train_run(spec, tmp_path / "runs", mnist, quick=True)  # a third attempt keeps only the one before it
    assert not (rdir / "earlier_attempt" / "ckpt" / "step009999.pt").exists()
    assert json.loads((rdir / "earlier_attempt" / "run.json").read_text())["status"] == "complete"


def test_setting_aside_survives_a_kill_midway(tmp_path: Path) -> None:
    """Killed after some files were gathered, or after the attempt before was deleted: the next call finishes the
    move and loses none of the earlier attempt's files."""
    from pdelightning_reproduce.train import set_aside_earlier_attempt

    rdir = tmp_path / "seed0"
    (rdir / "earlier_attempt").mkdir(parents=True)
    (rdir / "earlier_attempt" / "run.json").write_text("attempt 1")
    (rdir / ".earlier_attempt.moving").mkdir()
    (rdir / ".earlier_attempt.moving" / "run.json").write_text("attempt 2")  # gathered before the kill
    (rdir / "summary.csv").write_text("attempt 2")  # not yet
    assert unit_files(tmp_path, "run.json") == []  # neither folder is read as a run
    set_aside_earlier_attempt(rdir)
    assert sorted(p.name for p in rdir.iterdir()) == ["earlier_attempt"]
    assert {p.name: p.read_text() for p in (rdir / "earlier_attempt").iterdir()} == {
        "run.json": "attempt 2",
        "summary.csv": "attempt 2",
    }
    (rdir / "earlier_attempt").rename(rdir / ".earlier_attempt.moving")  # killed after deleting attempt 1
    set_aside_earlier_attempt(rdir)
    assert sorted(p.name for p in rdir.iterdir()) == ["earlier_attempt"]
    assert (rdir / "earlier_attempt" / "summary.csv").read_text() == "attempt 2"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["all", "--settings", "mnist_tranformer"], "invalid choice: 'mnist_tranformer'"),
        (["all", "--seeds", "x"], "invalid int value: 'x'"),
        (["fit"], "invalid choice: 'fit'"),
        (["all", "--cells", "nosuch:L6"], "expected SETTING:CELL"),
        (["report", "/nonexistent/summary"], "/nonexistent/summary does not exist"),
    ],
)
def test_bad_arguments_are_refused(bad: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(bad)
    assert says in capsys.readouterr().err
