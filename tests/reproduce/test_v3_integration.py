"""The v3 parts wired together: divergence judged after training, under-training guarding verdicts, the report's
banner and changed-since-v2 table, the rules appendix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pdelightning_reproduce.divergence import recorded_divergence, recorded_under_trained
from pdelightning_reproduce.render import rules_appendix
from pdelightning_reproduce.report import write_report
from pdelightning_reproduce.rules import BY_ID, NEWSGROUPS_LAYERS, pre_run_rules_sha
from pdelightning_reproduce.sections import build_sections
from pdelightning_reproduce.sections.training import guard_under_trained, settings_read
from pdelightning_reproduce.summary import RUN_FIELDS, Row, read_runs, write_rows, write_runs
from pdelightning_reproduce.train import judge_record, stop_loss
from pdelightning_reproduce.verdicts import HOLDS, NOT_COMPARABLE, ClaimResult
from tests.reproduce.planted import Planter


def test_v3_runs_stop_only_on_a_nonfinite_loss_and_are_judged_afterwards() -> None:
    assert stop_loss("v3", 10) is None
    assert stop_loss("cpu", 10) == pytest.approx(10 * math.log(10))  # v2's bound, kept for its budgets
    spike = {"losses": [2.3, 40.0, *[1.0] * 20], "loss_steps": list(range(1, 23)), "val_acc": [0.4, 0.6]}
    spike.update(divergence_step=None, role="sweep", plateau_met=False, stop_reason="max_steps")
    out = judge_record(dict(spike), judged_afterwards=True)  # a spike after one Adam step, then recovery
    assert (out["training_divergence"], out["diverged"], out["status"]) == ("trained", False, "complete")
    assert out["val_acc"] == 0.6 and out["best_val_acc"] == 0.6 and out["under_trained"] is False  # a sweep
    late = dict(spike, losses=[2.3, *[1.0] * 15, 9.0], loss_steps=list(range(1, 18)))
    out = judge_record(late, judged_afterwards=True)  # 9 > 3 x 2.3 after 16 updates
    assert (out["training_divergence"], out["divergence_at"], out["diverged"]) == ("diverged", 17, True)
    v2 = dict(spike, divergence_step=2)  # v2's budgets: the stop during training decides
    assert judge_record(v2, judged_afterwards=False)["diverged"] is True
    main = dict(spike, role="main")
    assert judge_record(main, judged_afterwards=True)["under_trained"] is True  # capped, no plateau


def test_run_table_carries_the_divergence_verdict_and_under_training(tmp_path: Path) -> None:
    for key in ("training_divergence", "divergence_reason", "divergence_at", "under_trained"):
        assert key in RUN_FIELDS
    metas = [
        {
            "setting": "mnist_pde",
            "cell": "",
            "seed": 0,
            "status": "complete",
            "stop_reason": "max_epochs",
            "plateau_met": False,
            "training_divergence": "trained",
            "under_trained": True,
        },
        {
            "setting": "mnist_pde",
            "cell": "",
            "seed": 1,
            "status": "complete",
            "stop_reason": "plateau",
            "plateau_met": True,
            "training_divergence": "trained",
            "under_trained": False,
        },
        {"setting": "sweep_pde", "cell": "dt0.5", "seed": 0, "status": "complete", "diverged": True},  # v2-style
    ]
    write_runs(tmp_path / "runs.csv", metas)
    rows = read_runs(tmp_path).to_dict("records")
    assert [recorded_under_trained(r) for r in rows] == [True, False, False]
    assert [recorded_divergence(r) for r in rows] == [False, False, None]  # v2's row: not measured this way
    v2_row = {"status": "complete", "stop_reason": "max_epochs", "plateau_met": float("nan"), "under_trained": None}
    assert recorded_under_trained(v2_row) is True  # capped and no plateau recorded
    assert recorded_under_trained(dict(v2_row, status="diverged")) is False


def test_settings_read_by_rule() -> None:
    assert settings_read(BY_ID["ib.decline_pde"]) == ("newsgroups_pde",)
    assert settings_read(BY_ID["t2.transformer"]) == ("mnist_transformer",)
    assert settings_read(BY_ID["att.cosine"]) == ("mnist_transformer", "mnist_pde")
    assert settings_read(BY_ID["v2.pde_unstable"]) == ()
    assert settings_read(BY_ID["ib.pde_layer1_sharpest"]) == ("newsgroups_pde",)
    assert settings_read(BY_ID["t3.cka_diffusion"]) == ("mnist_transformer", "mnist_pde_diffusion")


def _planted_ib(p: Planter) -> None:
    steps = [0, 10, 100, 1000]
    for s in ("newsgroups_transformer", "newsgroups_pde"):
        for la in NEWSGROUPS_LAYERS:
            for q, shift in (("I_TY_lower", 0.0), ("I_TY_lower_lcb", -0.05), ("I_TY_lower_ucb", 0.05)):
                p.trajectory(s, q, la, steps, lambda k, d=shift: np.array([0.5, 0.9, 0.4, 0.3]) + d + 0.01 * k)


def test_under_trained_runs_make_the_verdicts_that_read_them_not_comparable() -> None:
    p = Planter()
    _planted_ib(p)
    p.run("newsgroups_transformer", stop_reason="plateau", plateau_met=True)
    p.run("newsgroups_pde", stop_reason="max_epochs", plateau_met=False, epochs=5, seeds=(0, 1, 2))
    p.run("newsgroups_pde", stop_reason="plateau", plateau_met=True, seeds=(3, 4))
    claims = {c.rule.id: c for s in build_sections(p.results()) for c in s.claims}
    assert claims["ib.decline_transformer"].verdict == HOLDS  # reads only the Transformer, at its plateau
    pde = claims["ib.decline_pde"]
    assert pde.verdict == NOT_COMPARABLE and "under-trained: `newsgroups_pde` seeds 0, 1, 2" in pde.why
    assert "the rule reads 'holds'" in pde.why and pde.leaves  # its numbers stay, as context
    lone = ClaimResult(BY_ID["ib.decline_transformer"], HOLDS)
    assert guard_under_trained(lone, p.results()).verdict == HOLDS


def test_report_says_what_it_judges_and_what_changed_since_v2(tmp_path: Path) -> None:
    p = Planter()
    _planted_ib(p)
    p.run("newsgroups_pde", stop_reason="max_epochs", plateau_met=False, budget="cpu", seeds=(0, 1, 2))
    p.run("sweep_pde", "eq21-3", seeds=(0, 1, 2), budget="cpu", diverged=True, status="diverged")
    src = tmp_path / "src"
    write_rows(src / "summary.csv.gz", (Row(*r) for r in p.rows))
    write_runs(src / "runs.csv", p.runs)
    text = write_report(src, tmp_path / "out").read_text()
    head = text.split("## Summary")[0]
    assert head.startswith("# Reproduction of arXiv 2408.09523 (PDE view of Transformers): v3 rules")
    assert "These are v2's runs judged by the v3 rules" in head and "`docs/reproduction/v3_plan.md`" in head
    assert "not yet trained" in head and "not comparable: not measured yet" in head
    assert "`sweep_pde` (1 cells x seeds 0, 1, 2; budget cpu)" in head
    assert pre_run_rules_sha("v3")["sha256"][:16] in head  # the pre-run sha beside today's
    changed = text.split("## Verdicts that changed since v2")[1].split("## ")[0]
    assert "| rule | v2 | now | what changed in the rule | why | what decides today's verdict |" in changed
    row = next(line for line in changed.splitlines() if line.startswith("| ib.decline_pde |"))
    assert "| holds | **not comparable** |" in row and "under-trained" in row
    assert "v2.pde_unstable" in changed and "not measured yet" in changed


def test_rules_appendix_prints_each_valid_range_with_its_reason() -> None:
    text = rules_appendix()
    q = BY_ID["ib.pde_lower"].quantities[0]
    assert f"(valid range [0, inf]: {q.valid_reason})" in text


def test_records_trained_before_the_judgement_are_judged_when_merged() -> None:
    """A run.json with a loss series but no verdict (trained by an older train.py) gets training's verdict in its
    runs.csv row; v2's records (no series) stay empty."""
    from pdelightning_reproduce.summary import run_row

    meta = {"setting": "sweep_pde", "cell": "dt0.5", "seed": 0, "status": "diverged", "role": "sweep"}
    row = run_row(dict(meta, losses=[2.3, 40.0], loss_steps=[1, 2]))  # stopped at v2's bound after one update
    assert (row["training_divergence"], row["divergence_at"]) == ("undecided", None)
    row = run_row(dict(meta, losses=[2.3, *[1.0] * 12, float("nan")], loss_steps=list(range(1, 15))))
    assert (row["training_divergence"], row["divergence_reason"], row["divergence_at"]) == ("diverged", "nonfinite", 14)
    assert run_row(meta)["training_divergence"] is None
    main = {"setting": "mnist_pde", "seed": 1, "status": "complete", "role": "main", "stop_reason": "max_epochs"}
    assert run_row(main)["under_trained"] is True and run_row(dict(main, role="sweep"))["under_trained"] is None


def test_the_banner_says_v2_only_for_runs_without_a_loss_series():
    import types

    import pandas as pd

    from pdelightning_reproduce.report import provenance

    rows = {"setting": ["mnist_pde", "mnist_pde"], "seed": [0, 1], "cell": ["", ""], "budget": ["full", "full"]}
    v2 = types.SimpleNamespace(runs=pd.DataFrame({**rows, "training_divergence": [float("nan"), float("nan")]}))
    new = types.SimpleNamespace(runs=pd.DataFrame({**rows, "training_divergence": ["trained", "trained"]}))
    assert provenance(v2).startswith("> **These are v2's runs judged by the v3 rules.**")
    assert provenance(types.SimpleNamespace(runs=pd.DataFrame(rows))).startswith("> **These are v2's runs")
    assert provenance(new).startswith("> **The runs judged here**: `mnist_pde` (seeds 0, 1; budget full)")
