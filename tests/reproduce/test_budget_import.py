"""Budgets (which runs, which cuts), runs trained elsewhere (imported weights, regenerated initialisation), the
pair analysis's attention comparison, and the compute/parity record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pdelightning_reproduce.budget import CPU, FULL, budget
from pdelightning_reproduce.compute import cpu_seconds, parity
from pdelightning_reproduce.imported import import_run, record_from_progress, regenerate_init
from pdelightning_reproduce.pairs import attention_values
from pdelightning_reproduce.run import main
from pdelightning_reproduce.settings import SETTINGS, Plan, RunSpec
from pdelightning_reproduce.summary import Row, write_rows
from pdelightning_reproduce.train import fit_args, train_run
from tests.test_cli import fake_mnist


def test_cpu_budget_plans_five_main_seeds_and_the_cut_sweeps() -> None:
    plan = Plan(seeds=CPU.main_seeds, sweep_seeds=CPU.sweep_seeds, cells=dict(CPU.cells), budget="cpu")
    runs = plan.runs()
    by = pd.Series([r.setting for r in runs]).value_counts().to_dict()
    assert all(by[s.name] == 5 for s in SETTINGS if s.role == "main")
    assert by["sweep_no_layernorm"] == 3 * 3 * 2 and by["sweep_pde"] == 3 * 7  # seeds x depths x lrs / Δt cells
    assert {r.cell for r in runs if r.setting == "sweep_transformer"} == {
        f"L{d}-lr{lr}" for d in (6, 12, 24) for lr in ("1e-03", "1e-02")
    }
    assert len(plan.pairs()) == 20
    args = fit_args(RunSpec("newsgroups_pde", "", 0), Path("o"), Path("d"), False, [], budget_name="cpu")
    assert "--data.init_args.train_subset=3000" in args and "--data.init_args.max_len=128" in args
    assert not any("subset" in a for a in fit_args(RunSpec("mnist_pde", "", 0), Path("o"), Path("d"), False, []))
    assert all(CPU.cut_for(s.name) for s in SETTINGS) and FULL.overrides_for("newsgroups_pde") == ()
    with pytest.raises(KeyError, match="valid: full, cpu"):
        budget("gpu")


def test_cli_budget_sets_seeds_and_cells(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(plan: Plan, *a: object, **k: object) -> dict:
        seen["plan"] = plan
        return {"failed": []}

    monkeypatch.setattr("pdelightning_reproduce.pipeline.run_pipeline", fake)
    assert main(["train", "--budget", "cpu", "--settings", "sweep_pde", "mnist_pde"]) == 0
    plan = seen["plan"]
    assert plan.budget == "cpu" and plan.sweep_seeds == (0, 1, 2) and plan.seeds == (0, 1, 2, 3, 4)
    assert len(plan.runs()) == 5 + 3 * 7


def test_regenerated_initialisation_is_the_trained_runs_own(tmp_path: Path) -> None:
    mnist = fake_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    spec = RunSpec("mnist_transformer", "", 3)
    meta = train_run(spec, tmp_path / "runs", mnist, quick=True)
    assert meta["status"] == "complete" and meta["budget"] == "full", meta.get("error")
    trained = torch.load(spec.path(tmp_path / "runs") / "ckpt" / "step000000.pt", weights_only=False)
    again = torch.load(regenerate_init(spec, tmp_path / "again", mnist, quick=True), weights_only=False)
    assert trained["init_args"] == again["init_args"] and trained["state_dict"].keys() == again["state_dict"].keys()
    assert all(torch.equal(trained["state_dict"][k], again["state_dict"][k]) for k in trained["state_dict"])
    other = torch.load(
        regenerate_init(RunSpec("mnist_transformer", "", 4), tmp_path / "o", mnist, quick=True), weights_only=False
    )
    assert not torch.equal(other["state_dict"]["head.weight"], trained["state_dict"]["head.weight"])
    final = spec.path(tmp_path / "runs") / "ckpt" / "final.pt"
    rec = import_run(spec, final, {**meta, "device": "cuda: X"}, tmp_path / "imp", mnist, "GPU run: test")
    written = json.loads((spec.path(tmp_path / "imp") / "run.json").read_text())
    assert written["imported"] == "GPU run: test" and written["init_regenerated"] and rec["device"] == "cuda: X"
    assert (spec.path(tmp_path / "imp") / "ckpt" / "step000000.pt").is_file()


def test_record_from_progress_line() -> None:
    payload = {"epoch": 10, "model_class": "m.C", "init_args": {"n_layers": 10}}
    line = "[ 113.3 s] trained mnist_transformer/seed0: complete in 95.61 s, step 2110, val/acc 0.9833333492279053"
    rec = record_from_progress(line, payload, "cuda: NVIDIA H200", max_epochs=10)
    assert (rec["seed"], rec["final_step"], rec["wall_s"], rec["stop_reason"]) == (0, 2110, 95.61, "max_epochs")
    assert rec["val_acc"] == pytest.approx(0.9833333492279053) and rec["gpu"] and rec["plateau_met"] is None
    assert record_from_progress(line, {**payload, "epoch": 7}, "cpu", 10)["stop_reason"] is None
    with pytest.raises(ValueError, match="not a 'trained"):
        record_from_progress("start train x/seed0", payload, "cpu", 10)


def test_attention_values_against_known_answers() -> None:
    g = torch.Generator().manual_seed(0)
    p = [torch.softmax(torch.randn(6, 2, 4, 4, generator=g), -1) for _ in range(2)]
    valid = torch.ones(6, 4, dtype=torch.bool)
    same = attention_values(p, p, None, valid)
    assert all(same["cosine"][f"blocks.{i}"] == pytest.approx(1.0) for i in range(2))
    assert all(abs(same["kl"][f"blocks.{i}"]) < 1e-6 for i in range(2)) and "null_random_init_cosine" not in same
    uniform = [torch.full((6, 2, 4, 4), 0.25)] * 2
    v = attention_values(uniform, p, uniform, valid)
    assert v["null_uniform_cosine"]["blocks.0"] == pytest.approx(1.0)  # uniform attention vs the uniform null
    assert v["null_random_init_kl"]["blocks.1"] == pytest.approx(0.0, abs=1e-6)
    assert v["entropy_model"]["blocks.0"] == pytest.approx(float(torch.log(torch.tensor(4.0))), rel=1e-6)


def test_parity_and_cpu_seconds(tmp_path: Path) -> None:
    for root, value in (("gpu", 1.0), ("cpu", 1.0 + 2e-5)):
        write_rows(
            tmp_path / root / "mnist_pde/seed2/summary.csv",
            [
                Row("mnist_pde", "", 2, 0, "init", "erank", "blocks.0", value),
                Row("mnist_pde", "", 2, 9, "final", "test_acc", "", 0.5),
            ],
        )
    got = parity(tmp_path / "gpu", tmp_path / "cpu")
    assert got["values"] == 2 and got["max_relative_difference"] == pytest.approx(2e-5, rel=1e-3)
    log = tmp_path / "s.log"
    log.write_text("t 11 01:00 00:00:30\nt 11 02:00 00:01:30\nt 12 1-00:00:00 1-00:00:01\nbad line\n")
    assert cpu_seconds(log) == {"11": 90.0, "12": 86401.0}
