"""The rules table is consistent: ids, quantities, thresholds, the previous report's claims, the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdelightning_reproduce import paper, rule_changes
from pdelightning_reproduce import rules as rules_pkg
from pdelightning_reproduce.rules import BY_ID, RULES, SECTION_MODULES, AllOf, AtLeast, Criterion, Node
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
    assert {p.name for p in PAIRS} == {
        "pde_vs_transformer",
        "transformer_vs_transformer",
        "pde_vs_transformer_shared_init",
        "pde_diffusion_vs_transformer",
    }


def test_run_ids_and_quick_overrides() -> None:
    spec = RunSpec("sweep_no_layernorm", "L24-lr1e-02", 3)
    assert spec.id == "sweep_no_layernorm/L24-lr1e-02/seed3"
    assert spec.get_cell().depth == 24 and spec.get_cell().lr == pytest.approx(1e-2)
    assert "--model.model.init_args.n_layers=3" in quick_overrides(spec)
    with pytest.raises(KeyError, match="valid"):
        RunSpec("sweep_no_layernorm", "L7", 0).get_cell()


def test_one_module_per_section_and_every_rule_in_its_own() -> None:
    for module in SECTION_MODULES:
        key = module.__name__.rsplit(".", 1)[1]
        assert module.RULES and {r.section for r in module.RULES} == {key}, key
    assert RULES == tuple(r for m in SECTION_MODULES for r in m.RULES)


def test_rules_sha_covers_every_module_and_the_pre_run_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = rules_pkg.rules_sha256()
    assert len(now) == 64 and now == rules_pkg.rules_sha256()
    files = sorted(p.name for p in (ROOT / "pdelightning_reproduce/rules").glob("*.py"))
    assert "table3.py" in files and "base.py" in files
    v2 = rules_pkg.pre_run_rules_sha("v2")
    assert len(v2["sha256"]) == 64 and "e3c5aa8" in v2["recorded"]
    with pytest.raises(KeyError, match="recorded: v2"):
        rules_pkg.pre_run_rules_sha("v0")
    assert now[:16] in rules_pkg.sha_text()
    # editing any module of the package changes the hash (copy the package, change one threshold, hash again)
    import importlib.util
    import shutil
    import sys

    dest = tmp_path / "rules_copy"
    shutil.copytree(ROOT / "pdelightning_reproduce/rules", dest, ignore=shutil.ignore_patterns("__pycache__"))
    text = (dest / "table3.py").read_text()
    (dest / "table3.py").write_text(text.replace("TABLE3_NEAR_ZERO_REL = 0.25", "TABLE3_NEAR_ZERO_REL = 0.3"))
    spec = importlib.util.spec_from_file_location(
        "rules_copy", dest / "__init__.py", submodule_search_locations=[str(dest)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "rules_copy", module)
    spec.loader.exec_module(module)
    assert module.rules_sha256() != now


def test_every_rule_change_since_v2_is_recorded_with_why() -> None:
    assert set(rule_changes.V2_VERDICTS) <= set(BY_ID)
    assert set(rule_changes.RULE_CHANGES_V3) == set(BY_ID) - {"grad.range_transformer", "grad.range_pde"}
    for rid, change in rule_changes.RULE_CHANGES_V3.items():
        assert change.what and change.why, rid
    rows = rule_changes.changed_since_v2(
        [("v2.pde_unstable", "inconclusive"), ("t3.cka", "does not hold"), ("t2.pde", "does not hold")]
    )
    assert [(r["rule"], r["v2"]) for r in rows] == [("v2.pde_unstable", "holds"), ("t3.cka", "new rule")]
    assert "Fisher" in rows[0]["what changed"] and rows[0]["why"]


def test_thresholds_are_on_the_data_scale() -> None:
    """No rule tests the paper's cosine 0.98 or KL 0.0288 directly, nor an absolute 0.1 on a relative loss."""
    for r in RULES:
        if r.test is None:
            continue
        for c in _leaves(r.test):
            assert c.threshold not in (paper.ATTENTION_LAYER_COSINE_MIN, 2 * paper.ATTENTION_KL), r.id
    perturbation_keys = {c.key for c in _leaves(BY_ID["pert.similar_low"].test)}  # type: ignore[arg-type]
    assert perturbation_keys == {"low_diff_sd"}
    large = {r.id for r in RULES if r.id.endswith("_large")}
    assert large == {"pert.pde_faster_loss_large", "pert.pde_faster_acc_large"}
    assert "1e-3 <= ε <= 1e-1" in BY_ID["pert.pde_faster_loss"].quantities[0].definition


def test_ib_rules_read_only_a_lower_bound_with_a_valid_range() -> None:
    for rid in ("ib.decline_transformer", "ib.decline_pde", "ib.pde_lower", "ib.pde_layer1_sharpest"):
        q = BY_ID[rid].quantities[0]
        assert q.valid == (0.0, float("inf")) and rules_pkg.IB_LOWER_UCB in q.valid_reason
        assert rules_pkg.IB_LOWER_QUANTITY in q.definition and "I(T;Y) = H(Y) - CE of" not in q.definition


def test_the_rules_are_those_recorded_before_the_v3_runs() -> None:
    """Any change to pdelightning_reproduce/rules/ after the v3 record must come with a new record and a line in
    rule_changes (what changed after fixing, and why)."""
    recorded = rules_pkg.pre_run_rules_sha("v3")["sha256"]
    assert rules_pkg.rules_sha256() == recorded, "rules changed after the v3 pre-run record: say so in rule_changes"
