"""The rules table is consistent: ids, quantities, thresholds, the previous report's claims, the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdelightning_reproduce import paper
from pdelightning_reproduce.rules import BY_ID, RULES, AllOf, AtLeast, Criterion, Node
from pdelightning_reproduce.settings import PAIRS, SETTINGS, Plan, RunSpec, quick_overrides

ROOT = Path(__file__).resolve().parents[2]


def _leaves(node: Node) -> list[Criterion]:
    if isinstance(node, Criterion):
        return [node]
    return [c for child in node.children for c in _leaves(child)]


def test_ids_unique_and_every_tested_key_is_a_defined_quantity() -> None:
    assert len({r.id for r in RULES}) == len(RULES)
    for r in RULES:
        if r.test is None:
            assert r.not_comparable, r.id
            continue
        keys = {q.key for q in r.quantities}
        for c in _leaves(r.test):
            assert c.key in keys, f"{r.id}: criterion on undefined quantity {c.key}"
            if c.op == "within":
                assert isinstance(c.threshold, tuple) and c.threshold[0] < c.threshold[1]


def test_at_least_is_satisfiable() -> None:
    def walk(node: Node) -> None:
        if isinstance(node, AtLeast):
            assert 1 <= node.k <= len(node.children)
        if isinstance(node, (AtLeast, AllOf)):
            for c in node.children:
                walk(c)

    for r in RULES:
        if r.test is not None:
            walk(r.test)


def test_table2_windows_are_the_papers_values() -> None:
    leaves = [c for c in _leaves(BY_ID["t2.pde"].test) if c.key == "consecutive_corr"]  # type: ignore[arg-type]
    centres = [round((c.threshold[0] + c.threshold[1]) / 2, 6) for c in leaves]  # type: ignore[index]
    assert centres == list(paper.TABLE2_PDE) and [c.item for c in leaves] == [f"blocks.{i}" for i in range(1, 10)]


def test_every_previous_verdict_has_a_successor_rule() -> None:
    old = json.loads((ROOT / "docs/reproduction/previous_verdicts.json").read_text())["verdicts"]
    assert len(old) == 21
    continued = {p for r in RULES for p in r.previous}
    assert {o["claim"] for o in old} <= continued
    assert {o["verdict"] for o in old} <= {"holds", "does not hold", "not comparable"}


def test_plan_orders_main_settings_first_and_sweeps_seed_major() -> None:
    runs = Plan().runs()
    roles = [next(s.role for s in SETTINGS if s.name == r.setting) for r in runs]
    assert roles.index("sweep") == sum(r == "main" for r in roles)  # every main run before any sweep run
    sweep = [r for r in runs if r.cell]
    first_seed1 = next(i for i, r in enumerate(sweep) if r.seed == 1)
    assert all(r.seed == 0 for r in sweep[:first_seed1]) and len(sweep) == 5 * (3 * 9 + 2 * 7)
    assert len(runs) == 7 * 5 + len(sweep)


def test_pairs_never_compare_twins_except_the_labelled_one() -> None:
    plan = Plan()
    for p in plan.pairs():
        model, ref = p.members()
        if p.pair == "pde_vs_transformer_shared_init":
            assert model.seed == ref.seed
        else:
            assert model.seed != ref.seed
    assert {p.name for p in PAIRS} == {"pde_vs_transformer", "transformer_vs_transformer",
                                       "pde_vs_transformer_shared_init", "pde_diffusion_vs_transformer"}  # fmt: skip


def test_run_ids_and_quick_overrides() -> None:
    spec = RunSpec("sweep_no_layernorm", "L24-lr1e-02", 3)
    assert spec.id == "sweep_no_layernorm/L24-lr1e-02/seed3"
    assert spec.get_cell().depth == 24 and spec.get_cell().lr == pytest.approx(1e-2)
    assert "--model.model.init_args.n_layers=3" in quick_overrides(spec)
    with pytest.raises(KeyError, match="valid"):
        RunSpec("sweep_no_layernorm", "L7", 0).get_cell()
