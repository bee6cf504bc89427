"""Each claim section on planted summaries with known verdicts: holds, does not hold, inconclusive, not comparable."""

from __future__ import annotations

import numpy as np
import pytest

from pdelightning_reproduce import paper
from pdelightning_reproduce.rules import EPS_GRID, MNIST_LAYERS, NEWSGROUPS_LAYERS, TABLE2_LAYERS
from pdelightning_reproduce.sections import ablations, attention, bottleneck, gradients, perturbation, refinement, runs
from pdelightning_reproduce.sections.information_flow import table2, table3
from pdelightning_reproduce.settings import DT_GRID, depth_lr_cells, dt_cells
from pdelightning_reproduce.verdicts import FAILS, HOLDS, INCONCLUSIVE, NOT_COMPARABLE
from tests.reproduce.planted import Planter


def verdicts(section: object) -> dict[str, str]:
    return {c.rule.id: c.verdict for c in section.claims}  # type: ignore[attr-defined]


# ---- Table 2 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shift", "noise", "expected"),
    [(0.0, 0.002, HOLDS), (-0.3, 0.002, FAILS), (0.0, 0.06, INCONCLUSIVE)],
)
def test_table2_planted(shift: float, noise: float, expected: str) -> None:
    p = Planter()
    for s, values in (("mnist_transformer", paper.TABLE2_TRANSFORMER), ("mnist_pde", paper.TABLE2_PDE)):
        p.add(s, "consecutive_corr", lambda _seed, v=values: np.array(v) + shift, TABLE2_LAYERS, noise=noise)
    v = verdicts(table2(p.results()))
    assert v["t2.transformer"] == expected and v["t2.pde"] == expected


def test_table2_missing_runs_are_not_comparable_and_pde_above() -> None:
    assert set(verdicts(table2(Planter().results())).values()) == {NOT_COMPARABLE}
    p = Planter()
    p.add("mnist_transformer", "consecutive_corr", lambda s: np.full(9, 0.80), TABLE2_LAYERS, noise=0.01)
    p.add("mnist_pde", "consecutive_corr", lambda s: np.full(9, 0.95), TABLE2_LAYERS, noise=0.01)
    v = verdicts(table2(p.results()))
    assert v["t2.pde_above"] == HOLDS and v["t2.transformer"] == FAILS


# ---- Table 3 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "end", "expected"), [(0.95, -0.1, HOLDS), (0.6, 0.55, FAILS), (0.5, 0.1, INCONCLUSIVE)]
)
def test_table3_planted(start: float, end: float, expected: str) -> None:
    p = Planter()
    for q in ("pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"):
        p.add("pair_pde_vs_transformer", q, lambda s: np.linspace(start, end, 10), MNIST_LAYERS, noise=0.04)
        p.add("pair_transformer_vs_transformer", q, lambda s: np.linspace(0.5, 0.4, 10), MNIST_LAYERS)
    sec = table3(p.results())
    v = verdicts(sec)
    assert v["t3.pearson"] == expected and v["t3.spearman"] == expected and v["t3.cka"] == expected
    assert "2 disjoint units" in sec.claims[0].ceiling and "model seeds 0, 2" in sec.intro


def test_table3_is_not_comparable_where_two_transformers_are_not_similar_either() -> None:
    """Pearson across independent initialisations: the ceiling itself is ~0, so no gap can be read from it."""
    p = Planter()
    p.add("pair_pde_vs_transformer", "pearson_vs_reference", lambda s: np.linspace(0.25, 0.03, 10), MNIST_LAYERS)
    p.add(
        "pair_transformer_vs_transformer",
        "pearson_vs_reference",
        lambda s: np.linspace(0.17, 0.0, 10),
        MNIST_LAYERS,
        noise=0.04,
    )
    claim = next(c for c in table3(p.results()).claims if c.rule.id == "t3.pearson")
    assert claim.verdict == NOT_COMPARABLE and "not shown similar by Pearson either" in claim.why


def test_disjoint_units_use_no_model_twice() -> None:
    from pdelightning_reproduce.pairs import disjoint_units

    assert disjoint_units([(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]) == [0, 2]
    assert disjoint_units([(s, (s + 1) % 10) for s in range(10)]) == [0, 2, 4, 6, 8]
    assert disjoint_units([(0, 0), (1, 2)]) == [0, 1]  # a model against itself uses one model


# ---- attention -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cos", "expected"), [(0.595, HOLDS), (0.25, FAILS), (0.572, INCONCLUSIVE)])
def test_attention_cosine_planted(cos: float, expected: str) -> None:
    """Null 0.3, ceiling 0.6: holds within a tenth of the spread of the ceiling; below the null it fails."""
    p = Planter()
    p.add("pair_pde_vs_transformer", "cosine", lambda s: np.full(10, cos), MNIST_LAYERS, noise=0.02)
    p.add("pair_pde_vs_transformer", "kl", lambda s: np.full(10, 0.01), MNIST_LAYERS, noise=0.001)
    p.add("pair_transformer_vs_transformer", "cosine", lambda s: np.full(10, 0.6), MNIST_LAYERS)
    p.add("pair_transformer_vs_transformer", "kl", lambda s: np.full(10, 0.011), MNIST_LAYERS)
    for n in ("uniform", "shuffled", "random_init"):
        p.add("pair_pde_vs_transformer", f"null_{n}_cosine", lambda s: np.full(10, 0.3), MNIST_LAYERS)
        p.add("pair_pde_vs_transformer", f"null_{n}_kl", lambda s: np.full(10, 0.5), MNIST_LAYERS)
    v = verdicts(attention(p.results()))
    assert v["att.cosine"] == expected
    assert v["att.kl"] == HOLDS  # at the ceiling and far below every null


def test_attention_kl_ceiling_no_closer_than_the_null() -> None:
    """When two Transformers are further apart than the PDE is from its closest null, the relative gap is
    meaningless; a PDE further from the Transformer than from that null still does not hold."""
    p = Planter()
    p.add("pair_pde_vs_transformer", "kl", lambda s: np.full(10, 3.3), MNIST_LAYERS, noise=0.05)
    p.add("pair_transformer_vs_transformer", "kl", lambda s: np.full(10, 2.4), MNIST_LAYERS, noise=0.05)
    for n in ("uniform", "shuffled", "random_init"):
        p.add("pair_pde_vs_transformer", f"null_{n}_kl", lambda s: np.full(10, 2.0), MNIST_LAYERS, noise=0.05)
    claim = next(c for c in attention(p.results()).claims if c.rule.id == "att.kl")
    assert claim.verdict == FAILS
    assert next(lf for lf in claim.leaves if lf.criterion.key == "kl_gap_rel").state.value == "invalid"


# ---- information bottleneck ------------------------------------------------------------------------------------------
def _ib(
    p: Planter, setting: str, curve: np.ndarray, layer_scale: list[float], q: str = "I_TY_lower", half: float = 0.05
) -> None:
    """Plant ``curve`` per layer; for ``I_TY_lower`` also its one-sided limits, ``half`` below and above."""
    steps = [0, 10, 100, 1000]
    for j, la in enumerate(NEWSGROUPS_LAYERS):
        p.trajectory(setting, q, la, steps, lambda s, j=j: curve * layer_scale[j] + 0.01 * s)
        if q == "I_TY_lower":
            for name, sign in (("_lcb", -1.0), ("_ucb", 1.0)):
                f = lambda s, j=j, sign=sign: curve * layer_scale[j] + 0.01 * s + sign * half  # noqa: E731
                p.trajectory(setting, q + name, la, steps, f)


def test_bottleneck_planted_decline_and_sharpest_first_layer() -> None:
    p = Planter()
    _ib(p, "newsgroups_transformer", np.array([2.0, 3.0, 2.6, 2.2]), [1, 1, 1, 1.2])
    _ib(p, "newsgroups_pde", np.array([1.5, 2.5, 1.0, 1.2]), [1.0, 0.5, 0.4, 0.3])
    v = verdicts(bottleneck(p.results()))
    assert v["ib.decline_transformer"] == FAILS  # ends above its start in every layer
    assert v["ib.decline_pde"] == HOLDS  # 1.2 x scale < 1.5 x scale at every layer
    assert v["ib.pde_lower"] == HOLDS and v["ib.pde_layer1_sharpest"] == HOLDS


def test_bottleneck_reads_only_a_valid_lower_bound() -> None:
    """v2's shape: the train-fitted estimate falls below 0 and v2's cross-fitted one starts at -0.9 bit (both
    context only): without pdelightning_reproduce.ib's I_TY_lower every claim is "not measured yet"."""
    p = Planter()
    for s in ("newsgroups_transformer", "newsgroups_pde"):
        _ib(p, s, np.array([0.05, -0.5, -1.0, -1.5]), [1, 1, 1, 1], q="I_TY")
        _ib(p, s, np.array([-0.9, 0.2, 0.5, 0.8]), [1, 1, 1, 1], q="I_TY_crossfit")
    sec = bottleneck(p.results())
    assert set(verdicts(sec).values()) == {NOT_COMPARABLE}
    assert all("not measured yet" in c.why for c in sec.claims)


def test_bottleneck_outside_the_valid_range_or_uninformative_is_not_comparable() -> None:
    """A start whose run's upper limit is below 0 is outside the valid range; a start whose lower limit is not
    above 0 is uninformative: a decline from either is not comparable; the valid end values are still read."""
    p = Planter()
    for s in ("newsgroups_transformer", "newsgroups_pde"):
        _ib(p, s, np.array([-0.9, 0.2, 0.5, 0.8]), [1, 1, 1, 1])
    sec = bottleneck(p.results())
    v = verdicts(sec)
    assert v["ib.decline_transformer"] == NOT_COMPARABLE == v["ib.decline_pde"] == v["ib.pde_layer1_sharpest"]
    assert v["ib.pde_lower"] == INCONCLUSIVE  # the end values are valid; the two models are equal
    assert "outside the estimator's valid range" in sec.claims[0].why and "`I_TY_lower`" in sec.claims[0].ours
    p = Planter()  # informative nowhere: start 0.02 with lower limit -0.03 (upper 0.07 >= 0, so not invalid)
    for s in ("newsgroups_transformer", "newsgroups_pde"):
        _ib(p, s, np.array([0.02, 0.9, 0.4, 0.3]), [1, 1, 1, 1])
    sec = bottleneck(p.results())
    assert verdicts(sec)["ib.decline_transformer"] == NOT_COMPARABLE
    assert "not informative" in sec.claims[0].why and "outside" not in sec.claims[0].why
    p = Planter()  # an informative start that falls: the decline holds
    for s in ("newsgroups_transformer", "newsgroups_pde"):
        _ib(p, s, np.array([0.5, 0.9, 0.4, 0.3]), [1, 1, 1, 1])
    v = verdicts(bottleneck(p.results()))
    assert v["ib.decline_transformer"] == HOLDS == v["ib.decline_pde"]


def test_max_drawdown_is_peak_to_lowest_later_point() -> None:
    from pdelightning_reproduce.sections.bottleneck import max_drawdown

    assert max_drawdown(np.array([0.0, 2.0, 1.5, 3.0, 0.2, 2.5])) == pytest.approx(2.8)
    assert max_drawdown(np.array([1.0, 2.0, 3.0])) == 0.0


# ---- gradients -------------------------------------------------------------------------------------------------------
def test_gradients_planted() -> None:
    p = Planter()
    steps = [0, 10, 100, 1000]
    for j, la in enumerate(NEWSGROUPS_LAYERS):
        p.trajectory("newsgroups_transformer", "relgrad", la, steps, lambda s: [1e-3] * 4)
        p.trajectory("newsgroups_pde", "relgrad", la, steps, lambda s, j=j: [1e-2 * (5 if j == 0 else 1)] * 4)
        for s in ("newsgroups_transformer", "newsgroups_pde"):
            p.trajectory(s, "grad_abs_mean", la, steps, lambda s: [1e-4] * 4)
    v = verdicts(gradients(p.results()))
    assert v["grad.pde_higher"] == HOLDS and v["grad.pde_first_layer"] == HOLDS
    assert v["grad.range_transformer"] == NOT_COMPARABLE == v["grad.range_pde"]


# ---- perturbation ----------------------------------------------------------------------------------------------------
def test_perturbation_planted_divergence_at_1e_2() -> None:
    from pdelightning_reproduce.sections.perturbation import LABELS

    p = Planter()
    eps = np.array(EPS_GRID)
    for s, rel in (("newsgroups_transformer", 0.05 * (eps >= 1e-1)), ("newsgroups_pde", 0.5 * (eps >= 1e-2))):
        p.add(s, "loss_clean", lambda seed: 1.0 + 0.02 * seed).add(s, "acc_clean", lambda seed: 0.8)
        p.add(s, "loss", lambda seed, r=rel: (1.0 + 0.02 * seed) * (1.0 + r), LABELS, noise=1e-4)
        p.add(s, "acc", lambda seed, r=rel: 0.8 - 0.5 * r, LABELS, noise=1e-3)
    v = verdicts(perturbation(p.results()))
    assert v["pert.similar_low"] == HOLDS and v["pert.pde_faster_loss"] == HOLDS
    assert v["pert.pde_faster_loss_large"] == HOLDS and v["pert.pde_faster_acc_large"] == HOLDS
    assert v["pert.pde_faster_acc"] == HOLDS and v["pert.divergence_near"] == HOLDS


def test_perturbation_paper_range_is_judged_apart_from_large_eps() -> None:
    """v2's shape: the PDE degrades faster only at ε >= 3.16; over the paper's range the models agree."""
    from pdelightning_reproduce.sections.perturbation import LABELS

    p = Planter()
    eps = np.array(EPS_GRID)
    for s, rel in (("newsgroups_transformer", 0.2 * (eps >= 3.0)), ("newsgroups_pde", 0.6 * (eps >= 3.0))):
        p.add(s, "loss_clean", lambda seed: 1.0 + 0.02 * seed).add(s, "acc_clean", lambda seed: 0.8)
        p.add(s, "loss", lambda seed, r=rel: (1.0 + 0.02 * seed) * (1.0 + r), LABELS, noise=2e-3)
        p.add(s, "acc", lambda seed, r=rel: 0.8 - 0.5 * r, LABELS, noise=2e-3)
    v = verdicts(perturbation(p.results()))
    assert v["pert.pde_faster_loss"] == INCONCLUSIVE and v["pert.pde_faster_loss_large"] == HOLDS


def test_divergence_nowhere_on_the_grid_does_not_hold() -> None:
    from pdelightning_reproduce.sections.perturbation import LABELS

    p = Planter()
    for s in ("newsgroups_transformer", "newsgroups_pde"):
        p.add(s, "loss_clean", lambda seed: 1.0).add(s, "acc_clean", lambda seed: 0.8)
        p.add(s, "loss", lambda seed: np.ones(len(LABELS)), LABELS).add(s, "acc", lambda seed: np.full(13, 0.8), LABELS)
    v = verdicts(perturbation(p.results()))
    assert v["pert.divergence_near"] == FAILS and v["pert.pde_faster_loss"] == FAILS


# ---- v2 ablations ----------------------------------------------------------------------------------------------------
def _sweeps(p: Planter, no_ln_diverges: bool, pde_diverges_above_1: bool, base_diverges: bool = False) -> None:
    for c in depth_lr_cells():
        last = f"blocks.{c.depth - 1}"
        for s, cka, rank in (
            ("sweep_transformer", 0.8, 10.0),
            ("sweep_no_residual", 0.1, 1.5),
            ("sweep_no_layernorm", 0.7, 9.0),
        ):
            ablated = s == "sweep_no_layernorm" and no_ln_diverges
            div = (ablated or (s == "sweep_transformer" and base_diverges)) and c.lr > 1e-3
            p.add(s, "probe_acc", lambda seed: 0.9, cell=c.name, noise=0.01)
            p.run(s, c.name, diverged=div, status="diverged" if div else "complete", training_divergence=_v3(div))
            p.add(s, "cka_to_embedding", lambda seed, v=cka: v, (last,), cell=c.name, noise=0.01)
            p.add(s, "erank", lambda seed, v=rank: v, (last,), cell=c.name, noise=0.05)
    for c in dt_cells(DT_GRID[:4]):  # v3's Δt cells; eq. (21) at initialisation measured per run (planted: 12 x Δt)
        for s in ("sweep_pde", "sweep_pde_stabilized"):
            div = s == "sweep_pde" and pde_diverges_above_1 and 12 * c.dt > 1
            p.run(s, c.name, diverged=div, status="diverged" if div else "complete", training_divergence=_v3(div))
            p.add(s, "eq21", lambda seed, c=c: 12 * c.dt, ("blocks.0",), stage="init", step=0, cell=c.name)


def _v3(div: bool) -> str:
    return "diverged" if div else "trained"


def test_ablations_planted() -> None:
    p = Planter()
    _sweeps(p, no_ln_diverges=True, pde_diverges_above_1=True)
    v = verdicts(ablations(p.results()))
    assert v == {
        "v2.no_residual_drift": HOLDS,
        "v2.no_layernorm_explosive": HOLDS,
        "v2.pde_unstable": HOLDS,
        "v2.eq21_predicts": HOLDS,
    }
    p = Planter()  # nothing diverges anywhere: 0/45 vs 0/45 cannot exclude a small effect
    _sweeps(p, no_ln_diverges=False, pde_diverges_above_1=False)
    v = verdicts(ablations(p.results()))
    assert v["v2.no_layernorm_explosive"] == INCONCLUSIVE and v["v2.pde_unstable"] == INCONCLUSIVE
    assert v["v2.eq21_predicts"] == INCONCLUSIVE
    p = Planter()  # the baseline diverges and the ablation does not: the claim does not hold
    _sweeps(p, no_ln_diverges=False, pde_diverges_above_1=False, base_diverges=True)
    assert verdicts(ablations(p.results()))["v2.no_layernorm_explosive"] == FAILS
    assert verdicts(ablations(Planter().results()))["v2.no_residual_drift"] == NOT_COMPARABLE


def test_divergence_rules_without_trainings_verdict_are_not_measured_yet() -> None:
    """v2's runs (stopped at 10 ln C, no loss series) carry no training_divergence: the rate rules are not
    comparable, "not measured yet"; the cell table still shows v2's stop."""
    p = Planter()
    _sweeps(p, no_ln_diverges=True, pde_diverges_above_1=True)
    for r in p.runs:
        r["training_divergence"] = None
    sec = ablations(p.results())
    for c in sec.claims:
        if c.rule.id != "v2.no_residual_drift":
            assert c.verdict == NOT_COMPARABLE and "not measured yet" in c.why, c.rule.id
    assert any(row[3] == "not measured" and row[4] == "5/5" for row in sec.tables[0].rows)


def test_eq21_rule_classes_runs_by_their_measured_eq21() -> None:
    """Within each Δt cell the seeds straddle eq. (21) = 1 (seed-specific initial weights); exactly the runs measured
    above 1 diverge: the rule holds (5/5 vs 0/5, Fisher p = 0.004) although no cell as a whole is "above 1"."""
    p = Planter()
    for c, above in zip(dt_cells(DT_GRID[:2]), ({2, 3, 4}, {0, 1}), strict=True):
        for s in ("sweep_pde", "sweep_pde_stabilized"):
            div = {k: s == "sweep_pde" and k in above for k in range(5)}
            p.run(s, c.name, training_divergence=lambda k, div=div: _v3(div[k]))
            p.add(s, "eq21", lambda k, above=above: 1.5 if k in above else 0.5, ("blocks.0",), "init", 0, c.name)
    claim = next(c for c in ablations(p.results()).claims if c.rule.id == "v2.eq21_predicts")
    assert claim.verdict == HOLDS and claim.estimates["diff"].value == pytest.approx(1.0)


def test_drift_of_untrained_nets_is_not_comparable() -> None:
    p = Planter()
    _sweeps(p, no_ln_diverges=True, pde_diverges_above_1=True)
    for c in depth_lr_cells():
        p.add("sweep_no_residual", "probe_acc", lambda seed: 0.12, cell=c.name, noise=0.01)  # v2: 0.10-0.17
    claim = next(c for c in ablations(p.results()).claims if c.rule.id == "v2.no_residual_drift")
    assert claim.verdict == NOT_COMPARABLE and "says nothing about residual connections" in claim.why


def test_no_layernorm_rate_pools_only_the_cells_that_ran() -> None:
    """Planted: the no-LayerNorm runs diverge in every lr > 1e-3 cell; the learning rate 3e-3 never ran. The pooled
    rate is over the cells that ran (1/2 of them diverge, not 3/9), and the claim says how many ran.
    """
    p = Planter()
    skipped = [c.name for c in depth_lr_cells() if abs(c.lr - 3e-3) < 1e-12]
    assert skipped
    for c in depth_lr_cells():
        if c.name in skipped:
            continue
        for s in ("sweep_transformer", "sweep_no_layernorm"):
            div = s == "sweep_no_layernorm" and c.lr > 1e-3
            p.run(s, c.name, diverged=div, status="diverged" if div else "complete", training_divergence=_v3(div))
    claim = next(c for c in ablations(p.results()).claims if c.rule.id == "v2.no_layernorm_explosive")
    ran = len(depth_lr_cells()) - len(skipped)
    assert f"pooled over the {ran} cells that ran (of {len(depth_lr_cells())})" in claim.ours
    assert claim.estimates["diff"].value == pytest.approx(0.5)


def test_wilson_interval() -> None:
    from pdelightning_reproduce.sections.ablations import wilson

    lo, hi = wilson(3, 10)  # statsmodels proportion_confint(3, 10, method="wilson") = (0.1078, 0.6032)
    assert lo == pytest.approx(0.1078, abs=1e-4) and hi == pytest.approx(0.6032, abs=1e-4)


# ---- refinement and the precondition ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dist", "change", "expected"), [(0.01, 0.0, HOLDS), (0.6, -0.2, FAILS), (0.095, 0.0, INCONCLUSIVE)]
)
def test_refinement_planted(dist: float, change: float, expected: str) -> None:
    p = Planter()
    p.add("mnist_pde", "refine_logit_distance", lambda s: dist, noise=0.02)
    p.add("mnist_pde", "refine_acc_change", lambda s: change, noise=0.001)
    assert verdicts(refinement(p.results()))["cont.refinement"] == expected


def test_convergence_precondition_needs_every_seed() -> None:
    p = Planter().run("mnist_transformer", val_acc=lambda s: 0.98 - 0.002 * s)
    assert verdicts(runs(p.results()))["pre.mnist_transformer_converged"] == HOLDS
    p = Planter().run("mnist_transformer", val_acc=lambda s: 0.99 if s else 0.95)
    assert verdicts(runs(p.results()))["pre.mnist_transformer_converged"] == INCONCLUSIVE
