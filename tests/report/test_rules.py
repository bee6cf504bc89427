"""Each finding rule on a planted mapping that triggers it and one that does not (no files, no training)."""

from __future__ import annotations

import math

import pytest

from pdelightning.report.rules import (
    RULES,
    attention_near_uniform,
    eq21_exceeded,
    find_all,
    gradients_explode,
    gradients_vanish,
    loss_spikes,
    mi_at_ceiling,
    nonfinite_values,
    overhead_above_budget,
)
from pdelightning.report.tags import TAGS, depth_key, layer_span, per_layer

NAN = math.nan


def series(*values: float, every: int = 100) -> list[tuple[int, float]]:
    return [(i * every, v) for i, v in enumerate(values)]


# ---- eq. (21) -------------------------------------------------------------------------------------------------------
def test_eq21_names_the_layers_above_one_and_since_when() -> None:
    scalars = {f"analysis/stability_monitor/eq21/blocks.{i}": series(0.5, 0.8, 0.9, 0.95) for i in range(10)}
    for i in (7, 8, 9):  # above 1 from step 200 on (blocks.7 dips back at 100, so "since" is 200)
        scalars[f"analysis/stability_monitor/eq21/blocks.{i}"] = series(1.2, 0.9, 1.1, 1.0 + i / 20)
    found = eq21_exceeded(scalars)
    assert found is not None and found.severity == "warning"
    assert "eq. (21) > 1 in layers blocks.7–9 since step 200" in found.text
    assert "max 1.45 in blocks.9 at step 300" in found.text and "StabilityMonitor" in found.text
    assert set(found.tags) == {f"analysis/stability_monitor/eq21/blocks.{i}" for i in (7, 8, 9)}


def test_eq21_quiet_when_the_last_probe_is_below_one() -> None:
    scalars = {"analysis/stability_monitor/eq21/blocks.0": series(1.5, 1.2, 0.99)}  # recovered: not a finding now
    assert eq21_exceeded(scalars) is None
    assert eq21_exceeded({}) is None


def test_eq21_from_a_fitted_pde_is_info_and_skips_trivially_exact_fits() -> None:
    scalars = {
        "analysis/pde_fit/eq21_fitted/blocks.0": series(1.1, 1.2),
        "analysis/pde_fit/eq21_fitted/blocks.1": series(1.1, 1.3),
        "analysis/pde_fit/r2/blocks.0": series(0.7, 0.8),
        "analysis/pde_fit/r2/blocks.1": series(1.0, 1.0),  # residual layer: exact fit, the number is ||W^O|| only
    }
    found = eq21_exceeded(scalars)
    assert found is not None and found.severity == "info" and "layers blocks.0 since step 0" in found.text
    assert "fitted" in found.text
    scalars["analysis/pde_fit/r2/blocks.0"] = series(1.0, 1.0)
    assert eq21_exceeded(scalars) is None


def test_eq21_reads_secondary_sub_prefixes() -> None:
    """The dashboard may move tags under analysis/<callback>/detail/...: the same rule still reads them."""
    scalars = {"analysis/jacobian_stability/detail/eq21/blocks.2": series(0.9, 1.5)}
    found = eq21_exceeded(scalars)
    assert found is not None and "blocks.2 since step 100" in found.text and "JacobianStability" in found.text


# ---- GradientFlow ---------------------------------------------------------------------------------------------------
def _grads(norms: dict[str, float], step: int = 40) -> dict[str, list[tuple[int, float]]]:
    return {f"analysis/gradient_flow/grad_norm/{k}": [(0, 0.5), (step, v)] for k, v in norms.items()}


def test_gradients_vanish_below_a_layer() -> None:
    scalars = _grads({"embedding": 1e-10, "blocks.0": 3e-9, "blocks.1": 2e-8, "blocks.2": 0.3, "head": 0.9})
    found = gradients_vanish(scalars, threshold=1e-7)
    assert found is not None
    assert found.text.startswith("gradients vanish below layer blocks.2 (embedding, blocks.0–1): grad_norm < 1e-07 at")
    assert "smallest 1e-10 in embedding" in found.text and len(found.tags) == 3


def test_gradients_vanish_names_layers_that_are_not_the_lowest() -> None:
    found = gradients_vanish(_grads({"blocks.0": 0.2, "blocks.1": 1e-9, "blocks.2": 0.3}))
    assert found is not None and "gradients vanish in blocks.1:" in found.text
    found = gradients_vanish(_grads({"blocks.0": 1e-9, "head": 1e-9}))
    assert found is not None and "gradients vanish in every layer:" in found.text


def test_gradients_vanish_quiet_on_healthy_or_earlier_only_small_norms() -> None:
    assert gradients_vanish(_grads({"blocks.0": 0.2, "blocks.1": 0.1})) is None
    early_small = {"analysis/gradient_flow/grad_norm/blocks.0": [(0, 1e-9), (40, 0.1)]}  # recovered by the last read
    assert gradients_vanish(early_small) is None


def test_gradients_explode_counts_reads_above_threshold_and_nonfinite() -> None:
    scalars = {
        "analysis/gradient_flow/grad_norm/blocks.0": series(1.0, 2e3, 5e4),
        "analysis/gradient_flow/grad_norm/blocks.1": series(1.0, 1.0, NAN),
        "analysis/gradient_flow/grad_norm/blocks.2": series(1.0, 1.0, 1.0),
    }
    found = gradients_explode(scalars, threshold=1e3)
    assert found is not None and found.severity == "critical"
    assert "gradients explode in blocks.0–1 from step 100: grad_norm up to 5e+04 > 1000 at 3 layer reads" == found.text


def test_gradients_explode_quiet_below_threshold() -> None:
    assert gradients_explode({"analysis/gradient_flow/grad_norm/blocks.0": series(1.0, 999.0)}, threshold=1e3) is None


# ---- AttentionSimilarity --------------------------------------------------------------------------------------------
def test_attention_near_uniform_with_the_number_of_keys_given() -> None:
    ln8 = math.log(8)
    scalars = {
        "analysis/attention_similarity/entropy/blocks.0": series(ln8, 0.5 * ln8),
        "analysis/attention_similarity/entropy/blocks.3": series(ln8, 0.99 * ln8),
        "analysis/attention_similarity/entropy/mean": series(ln8, 0.745 * ln8),  # a summary, not a layer
    }
    found = attention_near_uniform(scalars, within=0.02, log_keys=ln8)
    assert found is not None and found.severity == "info"
    assert "attention in layers blocks.3 within 2 % of uniform at step 100" in found.text
    assert "entropy / ln(keys) = 99.0 % (>= 98 %)" in found.text
    assert attention_near_uniform(scalars, within=0.005, log_keys=ln8) is None  # 99 % is not within 0.5 %


def test_attention_near_uniform_from_the_uniform_null() -> None:
    """ln(keys) = H(r) + KL(u || r), to second order, for a near-uniform reference r: plant r and check."""
    n = 8
    r = [1 / n * (1 + 0.1 * (-1) ** k) for k in range(n)]  # near uniform
    h_r = -sum(p * math.log(p) for p in r)
    kl_u_r = sum(1 / n * math.log((1 / n) / p) for p in r)
    assert abs(h_r + kl_u_r - math.log(n)) < 1e-3
    scalars = {
        "analysis/attention_similarity/entropy/blocks.0": series(2.06, 2.05),  # 98.6 % of ln 8
        "analysis/attention_similarity/entropy/blocks.1": series(2.06, 1.5),
        "analysis/attention_similarity/entropy_reference/blocks.0": series(h_r, h_r),
        "analysis/attention_similarity/entropy_reference/blocks.1": series(h_r, h_r),
        "analysis/attention_similarity/kl_null_uniform/blocks.0": series(kl_u_r, kl_u_r),
        "analysis/attention_similarity/kl_null_uniform/blocks.1": series(kl_u_r, kl_u_r),
    }
    found = attention_near_uniform(scalars, within=0.02)
    assert found is not None and "layers blocks.0 within 2 %" in found.text and "98.6 %" in found.text
    assert "analysis/attention_similarity/kl_null_uniform/blocks.0" in found.tags
    far = dict(scalars, **{"analysis/attention_similarity/kl_null_uniform/blocks.0": series(0.5, 0.5)})
    assert attention_near_uniform(far) is None  # a reference far from uniform gives no estimate of ln(keys)


# ---- LayerMutualInformation -----------------------------------------------------------------------------------------
def test_mi_at_ceiling_from_the_value_or_the_flag() -> None:
    base = {
        "analysis/layer_mutual_information/I_XT_ceiling": series(7.17, 7.17),
        "analysis/layer_mutual_information/I_XT/blocks.0": series(7.0, 7.12),
        "analysis/layer_mutual_information/I_XT/blocks.1": series(5.0, 4.6),
    }
    found = mi_at_ceiling(base, tol=0.1)
    assert found is not None and "I(X;T) at the estimator's ceiling in blocks.0 at step 100" in found.text
    assert "7.12–7.12 bits vs ceiling 7.17 bits, within 0.1" in found.text
    assert found.text.endswith("compression cannot be read here")
    flagged = dict(base, **{"analysis/layer_mutual_information/saturated/blocks.1": series(0.0, 1.0)})
    found = mi_at_ceiling(flagged, tol=0.01)  # blocks.0 is 0.05 below: not within 0.01; blocks.1 is flagged
    assert found is not None and "in blocks.1 at" in found.text


def test_mi_at_ceiling_quiet_below_the_ceiling() -> None:
    scalars = {
        "analysis/layer_mutual_information/log2_N": series(7.17, 7.17),
        "analysis/layer_mutual_information/I_XT/blocks.0": series(7.1, 5.0),  # saturated earlier, not at the end
        "analysis/layer_mutual_information/saturated/blocks.0": series(1.0, 0.0),
    }
    assert mi_at_ceiling(scalars) is None


# ---- StabilityMonitor -----------------------------------------------------------------------------------------------
def test_nonfinite_values_in_the_loss_and_the_activations() -> None:
    scalars = {
        "train/loss": series(2.0, 1.0, NAN),
        "val/loss": series(2.0, NAN, NAN),
        "analysis/stability_monitor/nonfinite": series(0.0, 0.0, 1.0),
        "analysis/stability_monitor/nonfinite/blocks.0": series(0.0, 0.0, 0.0),
        "analysis/stability_monitor/nonfinite/blocks.1": series(0.0, 0.0, 0.25),
    }
    found = nonfinite_values(scalars)
    assert found is not None and found.severity == "critical"
    assert "the training loss is non-finite from step 200 (1 check);" in found.text
    assert "val/loss is non-finite from step 100" in found.text
    assert "non-finite activations in blocks.1 from step 200 (up to 25 % of values)" in found.text
    assert "train/loss" in found.tags and "analysis/stability_monitor/nonfinite/blocks.1" in found.tags


def test_nonfinite_values_quiet_on_a_finite_run() -> None:
    scalars = {"train/loss": series(2.0, 1.0), "analysis/stability_monitor/nonfinite/blocks.0": series(0.0, 0.0)}
    assert nonfinite_values(scalars) is None


def test_loss_spikes_counts_the_flagged_checks() -> None:
    found = loss_spikes({"analysis/stability_monitor/loss_spike": series(0, 1, 0, 1, every=50)}, spike_factor=3.0)
    assert found is not None and found.text == "2 loss spikes (steps 50, 150): loss > 3 × its running average"
    assert loss_spikes({"analysis/stability_monitor/loss_spike": series(0, 0, 0)}) is None


# ---- overhead -------------------------------------------------------------------------------------------------------
def test_overhead_above_budget_reads_the_last_fraction() -> None:
    found = overhead_above_budget({"analysis/overhead/fraction": series(0.2, 0.05)}, budget=0.03)
    assert found is not None and "analysis took 5.0 % of training time at step 100, above its 3 % budget" in found.text
    assert overhead_above_budget({"analysis/overhead/fraction": series(0.2, 0.025)}, budget=0.03) is None


# ---- running them all, and the tag table ----------------------------------------------------------------------------
def test_find_all_orders_by_severity_and_passes_settings() -> None:
    scalars = {
        "analysis/overhead/fraction": series(0.05),
        "analysis/stability_monitor/loss_spike": series(1.0),
        "train/loss": series(NAN),
    }
    found = find_all(scalars, {"overhead_above_budget": {"budget": 0.5}})
    assert [f.rule for f in found] == ["nonfinite_values", "loss_spikes"]  # overhead under the given 50 % budget
    assert set(RULES) >= {f.rule for f in found}


@pytest.mark.parametrize("name", sorted(TAGS))
def test_every_pattern_matches_its_documented_form_with_and_without_a_sub_prefix(name: str) -> None:
    pattern = TAGS[name][0]
    plain = f"analysis/{pattern.callback}/{pattern.quantity}" + ("/blocks.3" if pattern.per_layer else "")
    nested = f"analysis/{pattern.callback}/detail/{pattern.quantity}" + ("/blocks.3" if pattern.per_layer else "")
    assert pattern.regex.match(plain) and pattern.regex.match(nested)
    assert not pattern.regex.match(f"analysis/{pattern.callback}/{pattern.quantity}_other/blocks.3")


def test_per_layer_sorts_by_depth_and_skips_summaries() -> None:
    scalars = {f"analysis/attention_rollout/entropy/{k}": series(1.0) for k in ("blocks.10", "blocks.2", "mean")}
    assert list(per_layer(scalars, "rollout_entropy")) == ["blocks.2", "blocks.10"]
    assert sorted(["head", "blocks.1", "embedding"], key=depth_key) == ["embedding", "blocks.1", "head"]
    assert layer_span(["blocks.1", "blocks.3", "blocks.2", "blocks.5"]) == "blocks.1–3, blocks.5"
