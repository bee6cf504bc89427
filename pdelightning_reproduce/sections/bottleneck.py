"""Information bottleneck on 20 Newsgroups (§3.3): I(T;Y) per layer over training, with its ceilings and bias."""

from __future__ import annotations

import math

import numpy as np

from pdelightning.analysis import information as info
from pdelightning_reproduce import figures, paper
from pdelightning_reproduce.rules import (
    BY_ID,
    FIT_N,
    IB_LOWER_LCB,
    IB_LOWER_QUANTITY,
    IB_LOWER_UCB,
    IXT_NOISE_VARIANCE,
    NEWSGROUPS_LAYERS,
    PROBE_N,
)
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table, accuracy_text, cell, est, per_seed
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import ClaimResult, claim_result, difference_of_means, fmt, invalid_unless

MODELS = (
    ("Transformer", "newsgroups_transformer"),
    ("PDE", "newsgroups_pde"),
    ("§3.3 linear + ReLU PDE", "newsgroups_pde_linear_relu"),
)
DECLINE = {"Transformer": "ib.decline_transformer", "PDE": "ib.decline_pde", MODELS[2][0]: "ib.decline_linear_relu"}
#: The PDE models compared with the Transformer, with their rules: ours, and the paper's §3.3 model.
COMPARED = (
    ("PDE", "newsgroups_pde", "ib.pde_lower", "ib.pde_layer1_sharpest"),
    (MODELS[2][0], MODELS[2][1], "ib.linear_relu_lower", "ib.linear_relu_layer1_sharpest"),
)
#: The model's own head bound H(Y) - CE/ln 2: pdelightning_reproduce.ib's name, else v2's.
HEAD_QUANTITIES = ("I_TY_head", "head_bound")


def head_quantity(results: Results) -> str:
    """The summary name of the head bound present in ``results`` (context only, no rule reads it)."""
    return next((q for q in HEAD_QUANTITIES if any(results.has(s, q) for _, s in MODELS)), HEAD_QUANTITIES[-1])


def max_drawdown(values: np.ndarray) -> float:
    """The largest fall from a point of ``values`` to any later point (0 for a never-falling curve).

    Example::

        >>> max_drawdown(np.array([1.0, 3.0, 2.0, 2.5, 0.5, 1.0]))
        2.5
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return math.nan
    peak = np.maximum.accumulate(v)
    return float(np.max(peak - v))


def shift_notes(crossfit: dict[str, tuple]) -> list[str]:
    """What the two I(T;Y) estimators say at the end of training, in words decided by their intervals.

    ``crossfit[label] = (cross-fitted start, cross-fitted end, the rules' estimate at the end, head bound)``.
    """
    notes = []
    for label, (cf_start, cf_end, fixed_end, hb) in crossfit.items():
        if fixed_end.missing or cf_end.missing:
            continue
        if fixed_end.hi < 0 and (hb.missing or hb.lo > 0):
            notes.append(
                f"**{label}: the rules' I(T;Y) estimate is below zero at the end** ({cell(fixed_end)} bits, layer "
                f"mean), although the model's own head shows at least {cell(hb)} bits on the same test posts and the "
                f"cross-fitted probe-set estimate is {cell(cf_end)}. The rules' probe is fitted on the features of "
                "training posts, which the trained model separates far better than test posts (it has fitted them), "
                "so on test posts it is over-confident and its bound falls below 0. Its decline over training measures "
                "this train/test shift as much as any loss of information; the cross-fitted estimate, fitted and "
                "scored on test posts only, does not have it (its own bias at this N is its value at step 0, "
                f"{cell(cf_start)} bits, where the representation is nearly uninformative)."
            )
    return notes


def probe_bias_text(n: int, d: int) -> str:
    """The LDA probe's measured bias at ``n`` scored samples and width ``d`` (nearest entry of the analysis
    package's table, :func:`~pdelightning.analysis.information.known_bias`).
    """
    return (
        f"{info.known_bias('probe', n, d):+.3f} bits (`analysis.information.ESTIMATOR_BIAS['probe']`, nearest "
        f"tabulated (N, d) to ({n}, {d}); measured on Gaussian classes, an indication only)"
    )


LCB, UCB = IB_LOWER_LCB, IB_LOWER_UCB
NOT_MEASURED = (
    f"not measured yet: the summary has no `{IB_LOWER_QUANTITY}` (the held-out lower bound of "
    "pdelightning_reproduce.ib, with its confidence limits); v2's analysis did not compute it"
)


def lower_bound_quantity(results: Results) -> str:
    """The summary quantity the rules read: ``I_TY_lower`` (:mod:`pdelightning_reproduce.ib`); absent, the rules
    are "not comparable: not measured yet" (v2's ``I_TY_crossfit`` is not a valid lower bound: uncalibrated, it reads
    -1.87 bits on pure noise).
    """
    return IB_LOWER_QUANTITY


def bound_problems(
    limits: dict[str, tuple[dict[int, np.ndarray], dict[int, np.ndarray]]],
    layers: list[int],
    informative_at: str | None,
    label: str,
) -> str:
    """Why values of the bound may not be read ("" when they may): a run's upper limit below 0 at a value read
    (outside the estimator's valid range), a value without limits, or, for a decline, a start whose lower limit is
    not above 0 (uninformative: a fall from it says nothing about I(T;Y)).

    Args:
        limits: ``{stage: (seed -> per-layer lcb, seed -> per-layer ucb)}`` of the values read.
        layers: indices into the per-layer arrays.
        informative_at: the stage whose lower limit must be above 0 (``None``: no such requirement).
        label: the model's name, for the reason.
    """
    out, blank, dull = [], [], []
    for stage, (lcb, ucb) in limits.items():
        if not ucb:
            blank.append(stage)
        for seed, u in ucb.items():
            if any(np.isfinite(u[j]) and u[j] < 0 for j in layers):
                out.append(f"seed {seed} at {stage}")
        if stage == informative_at:
            dull += [f"seed {seed}" for seed, lo in lcb.items() if not all(lo[j] > 0 for j in layers)]
            dull += ["no lower limit"] if not lcb else []
    reasons = []
    if blank:
        reasons.append(f"{label}: no confidence limits of the bound at {', '.join(blank)}")
    if out:
        reasons.append(
            f"{label}: the bound's upper limit (`{UCB}`) is below 0 ({', '.join(out)}): outside the estimator's "
            "valid range (the probe is worse than the prior), not a decline of information"
        )
    if dull:
        reasons.append(
            f"{label}: the start is not informative (lower limit not above 0: {', '.join(dull)}); a fall of a lower "
            "bound from a value not known to be above 0 says nothing about I(T;Y)"
        )
    return "; ".join(reasons)


def _limits(results: Results, s: str, stages: tuple[str, ...]) -> dict:
    return {st: tuple(per_seed(results, s, q, NEWSGROUPS_LAYERS, st) for q in (LCB, UCB)) for st in stages}


def _peak_lcb(results: Results, s: str, j: int) -> tuple[list[str], list[str]]:
    """Per seed of ``s``: runs whose bound's upper limit is below 0 at some checkpoint of layer ``j``, and runs
    whose lower limit at the layer's peak is not above 0.
    """
    out, dull = [], []
    la = NEWSGROUPS_LAYERS[j]
    for seed in results.seeds(s):
        _, v = results.trajectory(s, IB_LOWER_QUANTITY, la, seed)
        _, lo = results.trajectory(s, LCB, la, seed)
        _, hi = results.trajectory(s, UCB, la, seed)
        if np.isfinite(hi).any() and np.nanmin(hi) < 0:
            out.append(f"seed {seed}")
        if not (len(lo) == len(v) and np.isfinite(v).any() and lo[int(np.nanargmax(v))] > 0):
            dull.append(f"seed {seed}")
    return out, dull


def _compared_claims(
    results: Results,
    bound: str,
    head: str,
    ends: dict[str, list[float]],
    drops: dict[str, dict[int, list[float]]],
    label: str,
    s: str,
    lower_id: str,
    sharpest_id: str,
) -> list[ClaimResult]:
    """A PDE model's "lower than the Transformer's" and "layer 1 has the sharpest drop" claims."""
    pair = (("Transformer", "newsgroups_transformer"), (label, s))
    diff = difference_of_means(ends[label], ends["Transformer"])
    why = "; ".join(
        w for m, ms in pair if (w := bound_problems(_limits(results, ms, ("final",)), [0, 1, 2, 3], None, m))
    )
    diff = invalid_unless(diff, not why, why)
    measured = all(results.has(ms, bound) for _, ms in pair)
    hb = {m: est(results.values(ms, head)) for m, ms in pair}
    out = [
        claim_result(
            BY_ID[lower_id],
            {("ity_lower_end_diff", ""): diff},
            ours=f"lower bound at the end, layer mean: {label} {cell(est(ends[label]))} vs Transformer "
            f"{cell(est(ends['Transformer']))}; difference {cell(diff)}",
            ceiling=f"head bounds: {label} {cell(hb[label])}, Transformer {cell(hb['Transformer'])}",
            accuracy=accuracy_text(results, pair),
            estimates={"diff": diff},
            missing_reason="" if measured else NOT_MEASURED,
        )
    ]
    rel = est([d[0] - max(d[1:]) for d in drops[label].values() if np.isfinite(d).all()])
    high, dull = [], []
    for j in range(len(NEWSGROUPS_LAYERS)):
        o, d = _peak_lcb(results, s, j)
        high, dull = high + o, dull + d
    problems = [f"the {label} bound's upper limit is below 0 at some checkpoint ({', '.join(sorted(set(high)))})"]
    problems = problems * bool(high)
    problems += [f"the {label} bound is not informative at a layer's peak ({', '.join(sorted(set(dull)))})"] * bool(
        dull
    )
    rel = invalid_unless(rel, not problems, "; ".join(problems) + ": a fall measured from there says nothing")
    out.append(
        claim_result(
            BY_ID[sharpest_id],
            {("drop_first_minus_other", ""): rel},
            ours=f"{label} drops of the lower bound (peak to lowest later point) per layer: "
            + ", ".join(
                f"{la} {cell(est([d[j] for d in drops[label].values()]))}" for j, la in enumerate(NEWSGROUPS_LAYERS)
            )
            + f"; blocks.0 minus the largest other {cell(rel)}",
            accuracy=accuracy_text(results, [(label, s)]),
            estimates={"rel": rel},
            missing_reason="" if results.has(s, bound) else NOT_MEASURED,
        )
    )
    return out


def bottleneck(results: Results) -> Section:
    """The four §3.3 claims; the trajectory figure; I(X;T) against its ceiling."""
    sec = Section("bottleneck", "Information bottleneck: I(T;Y) over training (§3.3)")
    n_probe = results.values("newsgroups_pde", "probe_n", stage="init")
    n = int(n_probe[0]) if n_probe.size else PROBE_N["newsgroups"]
    n_fit = results.values("newsgroups_pde", "fit_n", stage="init")
    n_fit = int(n_fit[0]) if n_fit.size else FIT_N["newsgroups"]
    width = results.values("newsgroups_pde", "probe_d", stage="init")
    width = int(width[0]) if width.size else 128
    sec.intro = (
        f"Paper: {paper.IB_SOURCE}. Ours: I(T;Y) of each block's pooled output = H(Y) − CE (bits) of a linear "
        f"softmax probe (shrinkage LDA) fitted on {n_fit} training-split samples and scored on the probe set of "
        f"N = {n} test posts, at the analysed checkpoints (step 0, 50, 100, 200 and the final), unclipped; start = "
        "step 0, end = final checkpoint. Beside it: the model's own head bound H(Y) − CE/ln 2, H(Y), a cross-fitted "
        "estimate (5-fold shrinkage LDA on the probe set alone: fitted and scored on test posts only; context, no "
        "rule), and I(X;T) (Gaussian-KDE "
        f"upper bound, σ² = {IXT_NOISE_VARIANCE}) against its ceiling, the entropy of the distinct probe inputs. "
        f"Estimator bias at this N: {probe_bias_text(n, width)}."
    )
    bound, head = lower_bound_quantity(results), head_quantity(results)
    sec.intro += (
        f" The rules read only a held-out lower bound on I(T;Y): `{bound}` (pdelightning_reproduce.ib), each run's "
        f"value with its one-sided 95 % limits `{LCB}` / `{UCB}`; a value read whose run's upper limit is below 0 "
        "is outside the estimator's valid range, and a decline is read only from a start whose lower limit is above "
        "0 (either makes the claim not comparable). The train-fitted and the uncalibrated cross-fitted estimates "
        "above are context only. The paper's §3.3 PDE is 'a custom PDE model with linear layers and ReLU "
        "activations' (`newsgroups_pde_linear_relu`, no attention): every PDE claim is read for it too, beside ours "
        "(the attention + FFN 'full PDE')."
    )
    curves: dict[str, dict] = {}
    crossfit: dict[str, tuple] = {}
    lower: dict[str, dict] = {}
    for label, s in MODELS:
        final = per_seed(results, s, "I_TY", NEWSGROUPS_LAYERS)
        init = per_seed(results, s, "I_TY", NEWSGROUPS_LAYERS, stage="init")
        lb = {st: per_seed(results, s, bound, NEWSGROUPS_LAYERS, st) for st in ("init", "final")}
        lower[label] = lb
        changes, layer_ends = {}, {}
        for j, layer in enumerate(NEWSGROUPS_LAYERS):
            changes[layer] = est([lb["final"][k][j] - lb["init"][k][j] for k in lb["final"] if k in lb["init"]])
            layer_ends[layer] = [est([v[j] for v in lb[st].values()]) for st in ("init", "final")]
        lim = _limits(results, s, ("init", "final"))
        lookup = {
            ("ity_lower_change", la): invalid_unless(e, not (why := bound_problems(lim, [j], "init", label)), why)
            for j, (la, e) in enumerate(changes.items())
        }
        mean_start = est([np.nanmean(v) for v in init.values()])
        mean_end = est([np.nanmean(v) for v in final.values()])
        lb_start = est([np.nanmean(v) for v in lb["init"].values()])
        lb_end = est([np.nanmean(v) for v in lb["final"].values()])
        cf = {st: per_seed(results, s, "I_TY_crossfit", NEWSGROUPS_LAYERS, st) for st in ("init", "final")}
        cf_start = est([np.nanmean(v) for v in cf["init"].values()])
        cf_end = est([np.nanmean(v) for v in cf["final"].values()])
        hb = est(results.values(s, head))
        hb0 = est(results.values(s, head, stage="init"))
        hy = est(results.values(s, "H_Y"))
        crossfit[label] = (cf_start, cf_end, mean_end, hb)
        sec.claims.append(
            claim_result(
                BY_ID[DECLINE[label]],
                lookup,
                ours=f"lower bound `{bound}`, layer mean {cell(lb_start)} (start) → {cell(lb_end)} (end); context, "
                f"not in the rule: the train-fitted estimate {cell(mean_start)} → {cell(mean_end)}; the head bound "
                f"{cell(hb0)} → {cell(hb)}",
                ceiling=f"H(Y) = {cell(hy)}",
                accuracy=accuracy_text(results, [(label, s)]),
                estimates={"start": lb_start, "end": lb_end},
                missing_reason="" if results.has(s, bound) else NOT_MEASURED,
            )
        )
        curves[label] = {"final": final, "init": init}
    ends = {label: [float(np.nanmean(v)) for v in lower[label]["final"].values()] for label in lower}
    drops: dict[str, dict[int, list[float]]] = {}
    for label, s in MODELS:
        drops[label] = {}
        for seed in results.seeds(s):
            trajs = [results.trajectory(s, bound, la, seed)[1] for la in NEWSGROUPS_LAYERS]
            drops[label][seed] = [max_drawdown(t) for t in trajs]
    for label, s, lower_id, sharpest_id in COMPARED:
        sec.claims += _compared_claims(results, bound, head, ends, drops, label, s, lower_id, sharpest_id)
    sec.notes.extend(shift_notes(crossfit))
    rows, panels = [], []
    for label, s in MODELS:
        ixt_f = per_seed(results, s, "I_XT", NEWSGROUPS_LAYERS)
        ixt_i = per_seed(results, s, "I_XT", NEWSGROUPS_LAYERS, stage="init")
        ceiling = results.values(s, "ixt_ceiling", stage="init")
        cmin = float(np.nanmin(ceiling)) if ceiling.size else math.nan
        final, init = curves[label]["final"], curves[label]["init"]
        cf_i = per_seed(results, s, "I_TY_crossfit", NEWSGROUPS_LAYERS, stage="init")
        cf_f = per_seed(results, s, "I_TY_crossfit", NEWSGROUPS_LAYERS)
        for j, la in enumerate(NEWSGROUPS_LAYERS):
            xf = est([v[j] for v in ixt_f.values()])
            sat = "yes" if np.isfinite(cmin) and not xf.missing and info.is_saturated(xf.value, cmin) else "no"
            rows.append(
                [
                    label,
                    la,
                    cell(est([v[j] for v in init.values()])),
                    cell(est([v[j] for v in final.values()])),
                    cell(est([v[j] for v in cf_i.values()])),
                    cell(est([v[j] for v in cf_f.values()])),
                    cell(est([d[j] for d in drops[label].values()])),
                    cell(est([v[j] for v in ixt_i.values()])),
                    cell(xf),
                    fmt(cmin),
                    sat,
                ]
            )
        layer_curves = []
        for la in NEWSGROUPS_LAYERS:
            trajs = [results.trajectory(s, bound, la, seed) for seed in results.seeds(s)]
            trajs = [t for t in trajs if len(t[0])]
            if not trajs:
                continue
            steps = sorted(set().union(*(set(t[0].tolist()) for t in trajs)))
            mat = np.array(
                [[dict(zip(t[0].tolist(), t[1], strict=True)).get(st, np.nan) for st in steps] for t in trajs]
            )
            ests = [est(mat[:, k]) for k in range(len(steps))]
            layer_curves.append(
                (la, np.array(steps), (la, *(np.array([getattr(e, a) for e in ests]) for a in ("value", "lo", "hi"))))
            )
        if layer_curves:
            panels.append((label, layer_curves))
    sec.tables.append(
        Table(
            [
                "model",
                "layer",
                "I(T;Y) start",
                "I(T;Y) end",
                "cross-fitted start",
                "cross-fitted end",
                "largest drop of the lower bound",
                "I(X;T) start",
                "I(X;T) end",
                "I(X;T) ceiling",
                "saturated",
            ],
            rows,
            "Bits; seed means with 95 % t intervals. Saturated: I(X;T) within 0.1 bit of the ceiling (the "
            "entropy of the distinct probe inputs), where the estimator cannot show compression.",
        )
    )
    if any(p[1] for p in panels):
        sec.figures.append(
            FigureSpec(
                "information_plane",
                f"The rules' held-out lower bound on I(T;Y) (`{bound}`) per layer over training (seed mean, 95 % "
                "intervals); models without runs are left out",
                figures.trajectories,
                {"panels": panels, "ylabel": "I(T;Y) lower bound [bits]"},
            )
        )
    return sec
