"""One headline per callback: its main quantity at the start and the end of the run (pure functions of the scalars).

Each headline is a line of text and the curves the HTML report draws beside it (:class:`Headline`); a callback whose
main quantity is missing gets a line saying how many tags it logged. Tags are looked up in :mod:`.tags`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdelightning.report.tags import (
    CALLBACKS,
    Scalars,
    Series,
    fmt,
    last,
    per_layer,
    single,
    train_loss,
)

Curve = tuple[str, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class Headline:
    """A callback's headline.

    Attributes:
        callback: the callback class name (``Training`` and ``Analysis cost`` for the run's own lines).
        text: one line: the main quantity, first → last, with what to compare it with.
        curves: labelled series for sparklines.
    """

    callback: str
    text: str
    curves: tuple[Curve, ...] = field(default=())


def layer_mean(layers: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over layers at every step all layers logged a finite value.

    Example::

        >>> layer_mean({"a": [(0, 1.0), (5, 3.0)], "b": [(0, 3.0)]})
        [(0, 2.0)]
    """
    by_step: dict[int, list[float]] = {}
    for series in layers.values():
        for s, v in series:
            if math.isfinite(v):
                by_step.setdefault(s, []).append(v)
    return [(s, sum(v) / len(v)) for s, v in sorted(by_step.items()) if len(v) == len(layers)]


def trend(series: Series, digits: int = 3) -> str:
    """``first → last`` of the finite points (one value if they are one point or equal).

    Example::

        >>> trend([(0, 1.0), (10, float("nan")), (20, 0.5)])
        '1 → 0.5'
    """
    points = [(s, v) for s, v in series if math.isfinite(v)]
    if not points:
        return "n/a"
    a, b = fmt(points[0][1], digits), fmt(points[-1][1], digits)
    return a if a == b else f"{a} → {b}"


def _at_last(layers: dict[str, list[tuple[int, float]]]) -> tuple[int, dict[str, float]] | None:
    """The last step any layer logged, and every layer's finite value there."""
    steps = [s for v in layers.values() for s, _ in v]
    if not steps:
        return None
    final = max(steps)
    return final, {k: x for k, v in layers.items() for s, x in v if s == final and math.isfinite(x)}


def _range(values: dict[str, float]) -> str:
    lo, hi = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
    return f"{fmt(values[lo])} ({lo}) … {fmt(values[hi])} ({hi})" if lo != hi else f"{fmt(values[lo])} ({lo})"


def _span(values: dict[str, float], digits: int = 3) -> str:
    lo, hi = fmt(min(values.values()), digits), fmt(max(values.values()), digits)
    return lo if lo == hi else f"{lo} to {hi}"


def _curve(label: str, series: Series) -> Curve:
    return label, tuple((s, v) for s, v in series if math.isfinite(v))


# ---- per callback -----------------------------------------------------------------------------------------------
def attention_similarity(scalars: Scalars) -> Headline | None:
    """Mean cosine to the reference over layers, against uniform attention's score; entropy."""
    cosine = layer_mean(per_layer(scalars, "attn_cosine"))
    if not cosine:
        return None
    null = last(layer_mean(per_layer(scalars, "attn_cosine_null_uniform")))
    entropy = layer_mean(per_layer(scalars, "attn_entropy"))
    text = f"cosine to the reference {trend(cosine)} (layer mean"
    text += f"; uniform attention: {fmt(null[1])})" if null else ")"
    text += f"; entropy {trend(entropy)} nats" if entropy else ""
    return Headline("AttentionSimilarity", text, (_curve("cosine", cosine), _curve("entropy", entropy)))


def information_flow(scalars: Scalars) -> Headline | None:
    """Consecutive-layer CKA (else correlation), mean over layers and its range at the end."""
    layers = per_layer(scalars, "cka_consecutive") or per_layer(scalars, "consecutive_corr")
    mean, end = layer_mean(layers), _at_last(layers)
    if not mean or end is None or not end[1]:
        return None
    what = "CKA" if per_layer(scalars, "cka_consecutive") else "correlation"
    text = f"{what} between consecutive layers {trend(mean)} (mean); at step {end[0]}: {_range(end[1])}"
    return Headline("InformationFlow", text, (_curve(what, mean),))


def layer_mutual_information(scalars: Scalars) -> Headline | None:
    """I(X;T) and I(T;Y) of the last layer, beside their ceilings."""
    i_xt, i_ty = per_layer(scalars, "mi_I_XT"), per_layer(scalars, "mi_I_TY")
    if not i_xt:
        return None
    top = list(i_xt)[-1]
    ceiling, h_y = last(single(scalars, "mi_ceiling") or single(scalars, "mi_log2_N")), last(single(scalars, "mi_H_Y"))
    text = f"{top}: I(X;T) {trend(i_xt[top])} bits" + (f" (ceiling {fmt(ceiling[1])})" if ceiling else "")
    if top in i_ty:
        text += f", I(T;Y) {trend(i_ty[top])} bits" + (f" (H(Y) {fmt(h_y[1])})" if h_y else "")
    return Headline("LayerMutualInformation", text, (_curve("I(X;T)", i_xt[top]), _curve("I(T;Y)", i_ty.get(top, []))))


def gradient_flow(scalars: Scalars) -> Headline | None:
    """Gradient norms by layer at the last read, and the update-to-weight ratio."""
    layers = per_layer(scalars, "grad_norm")
    end = _at_last(layers)
    if end is None or not end[1]:
        return None
    text = f"gradient norm at step {end[0]}: {_range(end[1])}"
    ratio = _at_last(per_layer(scalars, "update_ratio"))
    if ratio and ratio[1]:
        text += f"; update/weight ratio ≈ {fmt(sum(ratio[1].values()) / len(ratio[1]), 2)}"
    ends = dict.fromkeys((next(iter(layers)), list(layers)[-1]))  # the lowest and the highest layer
    return Headline("GradientFlow", text, tuple(_curve(k, layers[k]) for k in ends))


def perturbation_eval(scalars: Scalars) -> Headline | None:
    """Clean probe accuracy and the critical noise level ε."""
    acc = single(scalars, "pert_acc_clean")
    critical, ratio = last(single(scalars, "pert_critical_eps")), last(single(scalars, "pert_departure_ratio"))
    if not acc and critical is None:
        return None
    text = f"clean probe accuracy {trend(acc)}" if acc else "no clean accuracy logged"
    text += f"; critical ε {fmt(critical[1])}" if critical else "; no ε departs from the clean loss"
    text += f" (loss ratio at the largest ε {fmt(ratio[1])})" if ratio else ""
    return Headline("PerturbationEval", text, (_curve("clean acc", acc),))


def stability_monitor(scalars: Scalars) -> Headline | None:
    """The rms growth by depth, the largest ||W_VO||₂, the loss EMA and its spikes."""
    growth, vo, ema = per_layer(scalars, "rms_growth"), per_layer(scalars, "W_VO_spectral"), single(scalars, "loss_ema")
    parts = []
    end = _at_last(growth)
    if end and end[1]:
        parts.append(f"rms growth at step {end[0]}: {_range(end[1])}")
    vo_end = _at_last(vo)
    if vo_end and vo_end[1]:
        worst = max(vo_end[1], key=vo_end[1].__getitem__)
        parts.append(f"max ||W_VO||₂ {fmt(vo_end[1][worst])} ({worst})")
    if ema:
        parts.append(f"loss EMA {trend(ema)}")
    spikes = sum(v >= 1 for _, v in single(scalars, "loss_spike"))
    if single(scalars, "loss_spike"):
        parts.append(f"{spikes} loss spike{'s' * (spikes != 1)}")
    if not parts:
        return None
    last_layer = growth[list(growth)[-1]] if growth else []
    return Headline("StabilityMonitor", "; ".join(parts), (_curve("rms growth (last)", last_layer), _curve("EMA", ema)))


def pde_fit(scalars: Scalars) -> Headline | None:
    """The informative sub-model R² first (attention-only, diffusion-only), then the full fit's."""
    attn, diff, full = (_at_last(per_layer(scalars, n)) for n in ("pde_r2_attention", "pde_r2_diffusion", "pde_r2"))
    if not (attn and attn[1]) and not (full and full[1]):
        return None
    parts = []
    if attn and attn[1]:
        parts.append(f"R² of the attention-only model at step {attn[0]}: {_range(attn[1])}")
    if diff and diff[1]:
        parts.append(f"diffusion-only {_span(diff[1])}")
    if full and full[1]:
        parts.append(f"full fit {_span(full[1], 4)}")
    curve = layer_mean(per_layer(scalars, "pde_r2_attention"))
    return Headline("PDEFit", "; ".join(parts), (_curve("R² attention (mean)", curve),))


def jacobian_stability(scalars: Scalars) -> Headline | None:
    """Layer Jacobians' spectral norms at the end and the Lyapunov exponent."""
    norms, lyap = per_layer(scalars, "jac_spectral_norm"), single(scalars, "jac_lyapunov")
    end = _at_last(norms)
    if not (end and end[1]) and not lyap:
        return None
    parts = [f"||J||₂ at step {end[0]}: {_range(end[1])}"] if end and end[1] else []
    parts += [f"Lyapunov exponent {trend(lyap)} nats/layer"] if lyap else []
    return Headline("JacobianStability", "; ".join(parts), (_curve("lyapunov", lyap),))


def attention_rollout(scalars: Scalars) -> Headline | None:
    """Rollout entropy and mixing of the last layer."""
    entropy, mixing = per_layer(scalars, "rollout_entropy"), per_layer(scalars, "rollout_mixing")
    if not entropy:
        return None
    top = list(entropy)[-1]
    text = f"{top}: rollout entropy {trend(entropy[top])} nats"
    text += f", mixing {trend(mixing[top])}" if top in mixing else ""
    return Headline("AttentionRollout", text, (_curve("entropy", entropy[top]),))


HEADLINES: dict[str, Callable[[Scalars], Headline | None]] = {
    "attention_similarity": attention_similarity,
    "information_flow": information_flow,
    "layer_mutual_information": layer_mutual_information,
    "gradient_flow": gradient_flow,
    "perturbation_eval": perturbation_eval,
    "stability_monitor": stability_monitor,
    "pde_fit": pde_fit,
    "jacobian_stability": jacobian_stability,
    "attention_rollout": attention_rollout,
}
"""Headline function per callback prefix (keys of :data:`~pdelightning.report.tags.CALLBACKS`)."""


# ---- the run's own lines ------------------------------------------------------------------------------------------
def training(scalars: Scalars) -> Headline | None:
    """The training loss first → last, the last training accuracy, and the final (and best) validation metrics."""
    parts: list[str] = []
    curves: list[Curve] = []
    loss = train_loss(scalars)
    if loss:
        parts.append(f"{loss[0]} {trend(loss[1])}")
        curves.append(_curve(loss[0], loss[1]))
    for tag in sorted(t for t in scalars if t.startswith(("val/", "val_", "train/acc", "train_acc"))):
        point = last(scalars[tag])
        if point is None:
            continue
        values = [v for _, v in scalars[tag] if math.isfinite(v)]
        best = max(values) if "acc" in tag else min(values) if "loss" in tag else None
        shown = f" (best {fmt(best)})" if best is not None and len(values) > 1 and tag.startswith("val") else ""
        parts.append(f"{tag} {fmt(point[1])}{shown}")
        curves.append(_curve(tag, scalars[tag]))
    return Headline("Training", ", ".join(parts), tuple(curves[:3])) if parts else None


def overhead(scalars: Scalars) -> Headline | None:
    """How many probes ran and what the analysis cost."""
    seconds, fraction = single(scalars, "overhead_seconds"), last(single(scalars, "overhead_fraction"))
    if not seconds:
        return None
    total = sum(v for _, v in seconds if math.isfinite(v))
    text = f"{len(seconds)} probes (steps {seconds[0][0]}–{seconds[-1][0]}), {fmt(total)} s in all"
    text += f", {100 * fraction[1]:.1f} % of training time" if fraction else ""
    return Headline("Analysis cost", text, (_curve("probe seconds", seconds),))


def headlines(scalars: Scalars, callbacks: Sequence[str]) -> list[Headline]:
    """The training line, one headline per callback in ``callbacks`` (prefixes), and the analysis cost."""
    out = [h for h in (training(scalars),) if h is not None]
    for prefix in callbacks:
        fn = HEADLINES.get(prefix)
        found = None
        try:
            found = fn(scalars) if fn is not None else None
        except Exception:  # a headline never breaks the report
            found = None
        if found is None:
            n = sum(t.startswith(f"analysis/{prefix}/") for t in scalars)
            found = Headline(CALLBACKS.get(prefix, prefix), f"{n} scalar tags logged (no headline quantity found)")
        out.append(found)
    cost = overhead(scalars)
    return out + ([cost] if cost is not None else [])
