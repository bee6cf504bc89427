"""The report on planted results: the changed-verdicts list from structured results, and a rendering smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pdelightning_reproduce import paper
from pdelightning_reproduce.report import changed_verdicts, write_report
from pdelightning_reproduce.rules import BY_ID, TABLE2_LAYERS
from pdelightning_reproduce.sections import Section, build_sections
from pdelightning_reproduce.summary import Row, write_rows, write_runs
from pdelightning_reproduce.verdicts import FAILS, HOLDS, ClaimResult
from tests.reproduce.planted import Planter


def test_changed_verdicts_lists_only_changes_with_the_reason(tmp_path: Path) -> None:
    previous = tmp_path / "prev.json"
    previous.write_text(
        json.dumps(
            {
                "verdicts": [
                    {"claim": "PDE inter-layer correlation (Table 2)", "verdict": "holds"},
                    {"claim": "Transformer inter-layer correlation (Table 2)", "verdict": "does not hold"},
                    {"claim": "a claim nobody continues", "verdict": "holds"},
                ]
            }
        )
    )
    sec = Section(
        "table2", "t", claims=[ClaimResult(BY_ID["t2.pde"], FAILS), ClaimResult(BY_ID["t2.transformer"], FAILS)]
    )
    changes = changed_verdicts([sec], previous)
    assert [(c["rule"], c["previous"], c["now"]) for c in changes] == [
        ("t2.pde", "holds", FAILS),
        ("—", "holds", "not re-tested"),
    ]
    assert changes[0]["why"] == BY_ID["t2.pde"].changes


def test_report_renders_planted_results_with_every_section(tmp_path: Path) -> None:
    p = Planter()
    p.add("mnist_pde", "consecutive_corr", lambda s: np.array(paper.TABLE2_PDE), TABLE2_LAYERS, noise=0.001)
    p.add("mnist_transformer", "consecutive_corr", lambda s: np.array(paper.TABLE2_TRANSFORMER), TABLE2_LAYERS)
    p.run("mnist_transformer", val_acc=0.98, device="cuda: NVIDIA H200", gpu=True)
    res = p.results()
    src = tmp_path / "src"
    write_rows(src / "summary.csv.gz", (Row(*r) for r in p.rows))
    write_runs(src / "runs.csv", p.runs)
    sections = build_sections(res)
    assert {c.rule.id for s in sections for c in s.claims} == set(BY_ID)  # every rule is judged somewhere
    assert {c.rule.id: c.verdict for s in sections for c in s.claims}["t2.pde"] == HOLDS
    text = write_report(src, tmp_path / "out").read_text()
    assert "## Appendix: the rules" in text and "NVIDIA H200" in text and "QUICK" not in text
    assert (tmp_path / "out" / "figures" / "table2_interlayer_correlation.png").is_file()
