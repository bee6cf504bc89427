"""Finding rules: pure functions from a run's logged scalars to one :class:`Finding` (or nothing).

Each rule reads ``scalars`` (``tag -> [(step, value), ...]``, see :mod:`.tags`) and the thresholds it is given, and
returns a one-line statement with its evidence and its threshold, e.g. "eq. (21) > 1 in layers blocks.7–9 since
step 1200 (max 1.4 at step 2000)", naming the tags it used. No rule reads files, the clock or global state, so each is
tested on a planted mapping (``tests/report/test_rules.py``). :data:`RULES` lists them in report order;
:func:`find_all` runs them with the thresholds of :func:`~pdelightning.report.events.rule_settings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pdelightning.report.tags import (
    TAGS,
    VAL_LOSS_TAGS,
    Scalars,
    Series,
    at_step,
    depth_key,
    fmt,
    last,
    layer_span,
    per_layer,
    single,
    train_loss,
)

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One statement about the run.

    Attributes:
        rule: the rule's name (a key of :data:`RULES`).
        severity: ``critical`` (the run is numerically broken), ``warning`` (a training problem to look at) or
            ``info`` (a limit of what a measurement can say here).
        text: one line with the evidence and the threshold.
        tags: the logged tags the statement rests on.
    """

    rule: str
    severity: Severity
    text: str
    tags: tuple[str, ...]


def _tags(scalars: Scalars, name: str, layers: set[str] | None = None) -> tuple[str, ...]:
    """The logged tags of quantity ``name`` (only ``layers`` if given)."""
    out = []
    for pattern in TAGS[name]:
        for tag in scalars:
            m = pattern.regex.match(tag)
            if m and (layers is None or not pattern.per_layer or m.group("layer") in layers):
                out.append(tag)
    return tuple(sorted(set(out)))


def _since(series: Series, above: Callable[[float], bool]) -> int | None:
    """The first step from which every later point satisfies ``above`` (``None`` if the last point does not)."""
    start = None
    for step, value in series:
        start = (step if start is None else start) if above(value) else None
    return start


# ---- eq. (21) -------------------------------------------------------------------------------------------------------
def eq21_exceeded(scalars: Scalars, limit: float = 1.0, exact_r2: float = 1e-6) -> Finding | None:
    """Eq. (21) ``2 D Δt/Δx² + |α| Δt ||W^O||_2 > limit`` at the last probe, in which layers and since when.

    Reads StabilityMonitor's ``eq21`` (the model's own PDE layers), else JacobianStability's ``eq21``, else PDEFit's
    ``eq21_fitted`` (from coefficients fitted to a Transformer's layers: a description, hence ``info``). eq. (21)
    ``<= 1`` is sufficient for a stable explicit step; above it stability is no longer guaranteed (not proven lost).
    Fitted layers whose full fit is exact (``r2 >= 1 - exact_r2``: a residual Transformer layer is an explicit step
    with ``α = 1/Δt``, so the number is just ``||W^O||_2``) are left out.
    """
    sources: tuple[tuple[str, str, Severity], ...] = (
        ("eq21_monitor", "StabilityMonitor", "warning"),
        ("eq21_jacobian", "JacobianStability", "warning"),
        ("eq21_fitted", "PDEFit, fitted coefficients", "info"),
    )
    for name, source, severity in sources:
        layers = {k: v for k, v in per_layer(scalars, name).items() if last(v) is not None}
        if name == "eq21_fitted":  # a residual layer is exactly an explicit step with α = 1/Δt: nothing to read
            exact = {k for k, v in per_layer(scalars, "pde_r2").items() if (p := last(v)) and p[1] >= 1 - exact_r2}
            layers = {k: v for k, v in layers.items() if k not in exact}
        if not layers:
            continue
        final = max(p[0] for v in layers.values() if (p := last(v)) is not None)
        over = {k: v for k, v in layers.items() if (x := at_step(v, final)) is not None and x > limit}
        if not over:
            return None
        onset = min(s for s in (_since(v, lambda x: x > limit) for v in over.values()) if s is not None)
        worst = max(over, key=lambda k: at_step(over[k], final) or -math.inf)
        text = (
            f"eq. (21) > {limit:g} in layers {layer_span(list(over))} since step {onset} "
            f"(max {fmt(at_step(over[worst], final))} in {worst} at step {final}; {source}): the explicit step's "
            "sufficient stability condition no longer holds there"
        )
        return Finding("eq21_exceeded", severity, text, _tags(scalars, name, set(over)))
    return None


# ---- GradientFlow ---------------------------------------------------------------------------------------------------
def gradients_vanish(scalars: Scalars, threshold: float = 1e-7) -> Finding | None:
    """Gradient L2 norms below ``threshold`` at GradientFlow's last read; "below layer k" when they are the lowest.

    ``embedding`` and numbered layers count for "below"; ``head``/``other`` are named but not ordered.
    """
    layers = per_layer(scalars, "grad_norm")
    if not layers:
        return None
    final = max(s for v in layers.values() for s, _ in v)
    values = {k: x for k, v in layers.items() if (x := at_step(v, final)) is not None}
    low = [k for k, x in values.items() if math.isfinite(x) and x < threshold]
    if not low:
        return None
    order = [k for k in layers if k not in ("head", "other")]
    lowest = order[: len(low)] == [k for k in order if k in low] and all(k in order for k in low)
    if len(low) == len(layers):
        where = "in every layer"
    elif lowest and len(low) < len(order):
        where = f"below layer {order[len(low)]} ({layer_span(low)})"
    else:
        where = f"in {layer_span(low)}"
    smallest = min(low, key=values.__getitem__)
    text = (
        f"gradients vanish {where}: grad_norm < {threshold:g} at step {final} "
        f"(smallest {fmt(values[smallest])} in {smallest})"
    )
    return Finding("gradients_vanish", "warning", text, _tags(scalars, "grad_norm", set(low)))


def gradients_explode(scalars: Scalars, threshold: float = 1e3) -> Finding | None:
    """A gradient L2 norm above ``threshold`` (or non-finite) at any GradientFlow read: which layers, since when."""
    layers = per_layer(scalars, "grad_norm")
    hot = {k: [(s, x) for s, x in v if not x <= threshold] for k, v in layers.items()}
    hot = {k: v for k, v in hot.items() if v}
    if not hot:
        return None
    first = min(v[0][0] for v in hot.values())
    finite_max = [x for v in hot.values() for _, x in v if math.isfinite(x)]
    peak = f"up to {fmt(max(finite_max))}" if finite_max else "non-finite"
    text = (
        f"gradients explode in {layer_span(list(hot))} from step {first}: grad_norm {peak} > {threshold:g} "
        f"at {sum(len(v) for v in hot.values())} layer reads"
    )
    return Finding("gradients_explode", "critical", text, _tags(scalars, "grad_norm", set(hot)))


_KEY_SOURCES = {"logged": ["attn_log_keys"], "null": ["attn_entropy_reference", "attn_kl_null_uniform"]}


# ---- AttentionSimilarity --------------------------------------------------------------------------------------------
def attention_near_uniform(
    scalars: Scalars, within: float = 0.02, log_keys: float | Mapping[str, float] | None = None, max_kl: float = 0.05
) -> Finding | None:
    """Layers whose mean attention entropy is within ``within`` (a fraction) of ``ln(keys)``, uniform attention's.

    ``ln(keys)`` comes from a logged ``entropy_uniform``/``log_keys`` tag, else ``log_keys`` (a number or a
    ``{layer: value}`` mapping), else the uniform null AttentionSimilarity logs against a near-uniform reference:
    ``ln(keys) ≈ H(reference) + KL(uniform || reference)``, exact to second order in the reference's departure from
    uniform and used only where ``KL <= max_kl`` nats (the default reference, the model at its start, is such).
    """
    entropy = per_layer(scalars, "attn_entropy")
    if not entropy:
        return None
    logged = per_layer(scalars, "attn_log_keys")
    h_ref, kl_u = per_layer(scalars, "attn_entropy_reference"), per_layer(scalars, "attn_kl_null_uniform")
    near: dict[str, float] = {}
    used = ["attn_entropy"]
    final = max(s for v in entropy.values() for s, _ in v)
    for layer, series in entropy.items():
        h = at_step(series, final)
        if h is None or not math.isfinite(h):
            continue
        how = "logged"
        if layer in logged and (p := last(logged[layer])) is not None:
            ln_k = p[1]
        elif isinstance(log_keys, Mapping) and layer in log_keys:
            ln_k, how = float(log_keys[layer]), "given"
        elif isinstance(log_keys, (int, float)):
            ln_k, how = float(log_keys), "given"
        elif layer in h_ref and layer in kl_u:
            hr, kl = at_step(h_ref[layer], final), at_step(kl_u[layer], final)
            if hr is None or kl is None or not 0 <= kl <= max_kl:
                continue
            ln_k, how = hr + kl, "null"
        else:
            continue
        if ln_k > 0 and h >= (1 - within) * ln_k:
            near[layer] = h / ln_k
            used += _KEY_SOURCES.get(how, [])
    if not near:
        return None
    lo, hi = f"{100 * min(near.values()):.1f}", f"{100 * max(near.values()):.1f}"
    ratio = f"{lo} %" if lo == hi else f"{lo}–{hi} %"
    text = (
        f"attention in layers {layer_span(list(near))} within {100 * within:g} % of uniform at step {final}: "
        f"entropy / ln(keys) = {ratio} (>= {100 * (1 - within):g} %); these layers barely select keys"
    )
    tags = tuple(sorted({t for name in set(used) for t in _tags(scalars, name, set(near))}))
    return Finding("attention_near_uniform", "info", text, tags)


# ---- LayerMutualInformation -----------------------------------------------------------------------------------------
def mi_at_ceiling(scalars: Scalars, tol: float = 0.1) -> Finding | None:
    """``I(X;T)`` at the estimator's ceiling (within ``tol`` bits of ``I_XT_ceiling``, or flagged ``saturated``) at
    the last probe: the estimate then measures the probe set's size, and compression cannot be read from it.
    """
    i_xt, flags = per_layer(scalars, "mi_I_XT"), per_layer(scalars, "mi_saturated")
    ceiling = single(scalars, "mi_ceiling") or single(scalars, "mi_log2_N")
    steps = [s for v in (*i_xt.values(), *flags.values()) for s, _ in v]
    if not steps:
        return None
    final = max(steps)
    cap = at_step(ceiling, final) if ceiling else None
    at_cap = []
    for layer in sorted(set(i_xt) | set(flags), key=depth_key):
        flag = at_step(flags.get(layer, []), final)
        value = at_step(i_xt.get(layer, []), final)
        if flag == 1 or (value is not None and cap is not None and value >= cap - tol):
            at_cap.append(layer)
    if not at_cap:
        return None
    values = [at_step(i_xt[k], final) for k in at_cap if k in i_xt]
    shown = f"I(X;T) = {fmt(min(v for v in values if v is not None))}–{fmt(max(v for v in values if v is not None))}"
    shown = shown if values and all(v is not None for v in values) else "flagged saturated"
    text = (
        f"I(X;T) at the estimator's ceiling in {layer_span(at_cap)} at step {final} ({shown} bits vs ceiling "
        f"{fmt(cap)} bits, within {tol:g}): compression cannot be read here"
    )
    names = ("mi_I_XT", "mi_saturated", "mi_ceiling" if single(scalars, "mi_ceiling") else "mi_log2_N")
    return Finding("mi_at_ceiling", "info", text, tuple(t for n in names for t in _tags(scalars, n, set(at_cap))))


# ---- StabilityMonitor: non-finite values and loss spikes ------------------------------------------------------------
def nonfinite_values(scalars: Scalars) -> Finding | None:
    """A non-finite training loss (StabilityMonitor's flag, or the logged loss itself), validation loss, or
    non-finite activations (StabilityMonitor's fraction per layer).
    """
    parts, tags = [], []
    flag = [s for s, v in single(scalars, "loss_nonfinite") if v >= 1]
    loss = train_loss(scalars)
    bad_loss = [s for s, v in loss[1] if not math.isfinite(v)] if loss else []
    if flag or bad_loss:
        first, n = min(flag + bad_loss), len(set(flag + bad_loss))
        parts.append(f"the training loss is non-finite from step {first} ({n} check{'s' * (n != 1)})")
        tags += list(_tags(scalars, "loss_nonfinite")) if flag else []
        tags += [loss[0]] if loss and bad_loss else []
    for tag in VAL_LOSS_TAGS:
        bad = [s for s, v in scalars.get(tag, []) if not math.isfinite(v)]
        if bad:
            parts.append(f"{tag} is non-finite from step {bad[0]}")
            tags.append(tag)
    act = {k: [(s, v) for s, v in series if v != 0] for k, series in per_layer(scalars, "act_nonfinite").items()}
    act = {k: v for k, v in act.items() if v}
    if act:
        first = min(v[0][0] for v in act.values())
        fractions = [x for v in act.values() for _, x in v if math.isfinite(x)]
        worst = max(fractions) if fractions else math.nan
        parts.append(
            f"non-finite activations in {layer_span(list(act))} from step {first} "
            f"(up to {fmt(100 * worst)} % of values)"
        )
        tags += _tags(scalars, "act_nonfinite", set(act))
    if not parts:
        return None
    return Finding("nonfinite_values", "critical", "; ".join(parts) + " (threshold: any non-finite value)", tuple(tags))


def loss_spikes(scalars: Scalars, spike_factor: float = 3.0) -> Finding | None:
    """Loss spikes StabilityMonitor flagged (a loss above ``spike_factor`` × its running average): count and steps."""
    series = single(scalars, "loss_spike")
    steps = [s for s, v in series if v >= 1]
    if not steps:
        return None
    shown = ", ".join(map(str, steps[:5])) + (f", … ({len(steps) - 5} more)" if len(steps) > 5 else "")
    rule = f"loss > {spike_factor:g} × its running average" if math.isfinite(spike_factor) else "StabilityMonitor rule"
    text = f"{len(steps)} loss spike{'s' * (len(steps) != 1)} (steps {shown}): {rule}"
    return Finding("loss_spikes", "warning", text, _tags(scalars, "loss_spike"))


# ---- the hub's overhead ---------------------------------------------------------------------------------------------
def overhead_above_budget(scalars: Scalars, budget: float = 0.03) -> Finding | None:
    """The analysis' share of training time (``analysis/overhead/fraction``, at its last value) above ``budget``."""
    point = last(single(scalars, "overhead_fraction"))
    if point is None or not point[1] > budget:
        return None
    text = (
        f"analysis took {100 * point[1]:.1f} % of training time at step {point[0]}, above its {100 * budget:g} % budget"
    )
    return Finding("overhead_above_budget", "warning", text, _tags(scalars, "overhead_fraction"))


RULES: dict[str, Callable[..., Finding | None]] = {
    "nonfinite_values": nonfinite_values,
    "gradients_explode": gradients_explode,
    "eq21_exceeded": eq21_exceeded,
    "loss_spikes": loss_spikes,
    "gradients_vanish": gradients_vanish,
    "overhead_above_budget": overhead_above_budget,
    "attention_near_uniform": attention_near_uniform,
    "mi_at_ceiling": mi_at_ceiling,
}
"""Every rule by name, in the order the report lists their findings (most severe kinds first)."""


def find_all(scalars: Scalars, settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[Finding]:
    """Every finding of :data:`RULES` on ``scalars``; ``settings[rule]`` are that rule's keyword arguments.

    A rule that fails on unexpected data is skipped: a report never breaks on a run it does not understand.
    """
    out = []
    for name, rule in RULES.items():
        try:
            found = rule(scalars, **dict((settings or {}).get(name, {})))
        except Exception:
            continue
        if found is not None:
            out.append(found)
    return sorted(out, key=lambda f: SEVERITIES.index(f.severity))
