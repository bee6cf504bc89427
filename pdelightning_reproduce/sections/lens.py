"""The PDE lens (issue 10): eq. (20) fitted to every layer of the trained MNIST models, and measured Jacobian
stability beside eq. (21). Context only: the paper gives no per-layer values, so there are no verdicts.
"""

from __future__ import annotations

import math

import numpy as np

from pdelightning_reproduce import figures
from pdelightning_reproduce.lens import JACOBIAN_BLOCK, JACOBIAN_ITERS, JACOBIAN_TOL, PREFIX
from pdelightning_reproduce.rules import MNIST_LAYERS
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table, accuracy_text, cell, curve_stats, est
from pdelightning_reproduce.sections.common import per_seed as per_seed_layers
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import Estimate, fmt

MODELS = (("Transformer", "mnist_transformer"), ("PDE", "mnist_pde"))
COLUMNS = (
    ("D (mean)", f"{PREFIX}D"),
    ("α", f"{PREFIX}alpha"),
    ("FFN coef.", f"{PREFIX}ffn_coef"),
    ("R² full", f"{PREFIX}r2"),
    ("R² diffusion only", f"{PREFIX}r2_diffusion"),
    ("R² attention only", f"{PREFIX}r2_attention"),
    ("eq. (21) of the fitted coef.", f"{PREFIX}eq21_fitted"),
    ("‖J‖₂", f"{PREFIX}jacobian_norm"),
    ("‖J − I‖₂ / Δt", f"{PREFIX}jacobian_minus_identity"),
)


def _scalar(results: Results, setting: str, quantity: str) -> Estimate:
    return est(results.values(setting, quantity))


def _rate(results: Results, setting: str) -> dict[int, np.ndarray]:
    """``seed -> ||J - I||_2 / Δt`` per layer."""
    raw = per_seed_layers(results, setting, f"{PREFIX}jacobian_minus_identity", MNIST_LAYERS)
    dt = results.per_seed(setting, f"{PREFIX}dt")
    return {s: v / dt[s] for s, v in raw.items() if s in dt and dt[s] > 0}


def conservativeness(results: Results, setting: str = "mnist_pde") -> tuple[list[str], dict[str, Estimate]]:
    """Sentences comparing eq. (21) with the measured Jacobian norms of ``setting`` (numbers from the runs), and
    the estimates behind them: per seed, the layer mean of ``||J_l - I||_2 / eq21_l`` (> 1: eq. (21) understates
    how far one step moves a perturbation) and the count of layers with ``||J_l||_2 > 1``.
    """
    eq21 = per_seed_layers(results, setting, "eq21", MNIST_LAYERS)
    jn = per_seed_layers(results, setting, f"{PREFIX}jacobian_norm", MNIST_LAYERS)
    jmi = per_seed_layers(results, setting, f"{PREFIX}jacobian_minus_identity", MNIST_LAYERS)
    seeds = sorted(set(eq21) & set(jn) & set(jmi))
    if not seeds:
        return [], {}
    ratio = est([float(np.nanmean(jmi[s] / eq21[s])) for s in seeds])
    expanding = est([float(np.sum(jn[s] > 1.0)) for s in seeds])
    eq_all = np.concatenate([eq21[s] for s in seeds])
    jn_all = np.concatenate([jn[s] for s in seeds])
    lyap = _scalar(results, setting, f"{PREFIX}lyapunov")
    n_layers = len(MNIST_LAYERS)
    verdict = (
        f"eq. (21) understates the measured ‖J − I‖₂ by a factor {cell(ratio)}: on these models it is not a "
        "conservative bound"
        if not ratio.missing and ratio.lo > 1
        else f"eq. (21) exceeds the measured ‖J − I‖₂ (ratio {cell(ratio)}): conservative here"
        if not ratio.missing and ratio.hi < 1
        else f"eq. (21) and the measured ‖J − I‖₂ agree within the interval (ratio {cell(ratio)})"
    )
    lines = [
        f"**How conservative is eq. (21)?** In the trained PDE models (`{setting}`, {len(seeds)} seeds) eq. (21) lies "
        f"between {fmt(float(np.nanmin(eq_all)))} and {fmt(float(np.nanmax(eq_all)))} in every layer "
        f"({'all ≤ 1: the heuristic calls every step stable' if np.nanmax(eq_all) <= 1 else 'some > 1'}), while the "
        f"measured ‖∂u_(l+1)/∂u_l‖₂ lies between {fmt(float(np.nanmin(jn_all)))} and {fmt(float(np.nanmax(jn_all)))} "
        f"(layers with a norm above 1 per model: {cell(expanding)} of {n_layers}) and the finite-depth Lyapunov "
        f"exponent is {cell(lyap)} nats per layer ({'> 0: perturbations of the embedding grow through depth' if not lyap.missing and lyap.lo > 0 else 'see the interval'}). "  # noqa: E501
        f"Per layer, {verdict}. Eq. (21) counts the diffusion term and α‖W^O‖₂ only; the step's Jacobian also holds "
        "the FFN's Jacobian and the attention's dependence on u through W_Q, W_K and W_V, which it leaves out.",
    ]
    return lines, {"ratio": ratio, "expanding": expanding, "lyapunov": lyap}


def lens(results: Results) -> Section | None:
    """The lens section, or ``None`` when no run has lens quantities."""
    if not any(results.has(s, f"{PREFIX}r2") for _, s in MODELS):
        return None
    sec = Section("lens", "The PDE lens: how PDE-like are the trained models, and how stable is their depth dynamics?")
    n_jac = results.values("mnist_pde", f"{PREFIX}jacobian_n")
    n_jac = int(n_jac[0]) if n_jac.size else 0
    conv_values = np.concatenate([results.values(s, f"{PREFIX}jacobian_converged") for _, s in MODELS])
    conv = fmt(float(np.nanmin(conv_values))) + " (lowest over runs)" if conv_values.size else "—"
    sec.intro = (
        "Each trained MNIST model (final checkpoint) read as explicit Euler steps of eq. (20): per block l, the "
        "least-squares fit of (u_(l+1) − u_l)/Δt ≈ D ∘ ∇²u_l + α A_l + c F_l over every token of the probe set "
        "(`pdelightning.analysis.pde_fit`; u_l = the block's input, u_(l+1) its output, A_l = the output of "
        "`blocks[l].attn` without α, F_l = the output of `blocks[l].mlp`; Δt = the model's dt for the PDE model, 1/L "
        "for the Transformer; Laplacian along tokens, Dirichlet). R² of the full fit and of the diffusion-only and "
        "attention-only sub-models (each refitted alone; negative: worse than the mean update). Then the measured "
        "stability (`pdelightning.analysis.jacobian`): per block the spectral norm of ∂u_(l+1)/∂u_l and of "
        f"∂u_(l+1)/∂u_l − I (divided by Δt), on the first {n_jac} probe images, block iteration with "
        f"{JACOBIAN_BLOCK} directions and at most {JACOBIAN_ITERS} steps, stopping at a relative change of "
        f"{JACOBIAN_TOL:g} (lower bounds; share of converged estimates: {conv}), and the finite-depth Lyapunov "
        "exponent (1/L) log ‖∂u_L/∂u_0‖₂ of the "
        "stack. Seed means with 95 % t intervals; no paper value, no verdict. A residual Transformer "
        "is exactly u + A + F, so its fit must give α = c = 1/Δt = L, D ≈ 0 and R² = 1; our PDE model without "
        "LayerNorm is exactly eq. (20), so its fit must return its own D and α with c = 1 and R² = 1."
    )
    for label, s in MODELS:
        if not results.has(s, f"{PREFIX}r2"):
            continue
        data = {q: per_seed_layers(results, s, q, MNIST_LAYERS) for _, q in COLUMNS}
        data[f"{PREFIX}jacobian_minus_identity"] = _rate(results, s)
        own = per_seed_layers(results, s, "eq21", MNIST_LAYERS)
        headers = ["layer", *(h for h, _ in COLUMNS)] + (["eq. (21) of the model"] if own else [])
        rows = []
        for j, la in enumerate(MNIST_LAYERS):
            row = [la] + [cell(est([v[j] for v in data[q].values()])) for _, q in COLUMNS]
            if own:
                row.append(cell(est([v[j] for v in own.values()])))
            rows.append(row)
        lyap = _scalar(results, s, f"{PREFIX}lyapunov")
        dt = _scalar(results, s, f"{PREFIX}dt")
        caption = (
            f"{label} (`{s}`), Δt = {fmt(dt.value)}; Lyapunov exponent {cell(lyap)} nats per layer; "
            f"{accuracy_text(results, [(label, s)])}."
        )
        sec.tables.append(Table(headers, rows, caption))
    lines, _ = conservativeness(results)
    sec.notes.extend(lines)
    series, dashed = [], []
    for label, s in MODELS:
        jn = per_seed_layers(results, s, f"{PREFIX}jacobian_norm", MNIST_LAYERS)
        if jn:
            series.append((f"‖J‖₂ {label}", *curve_stats(jn)))
    own = per_seed_layers(results, "mnist_pde", "eq21", MNIST_LAYERS)
    if own:
        dashed.append(("eq. (21) PDE", *curve_stats(own)))
    if series:
        sec.figures.append(
            FigureSpec(
                "lens_jacobian",
                "Measured ‖∂u_(l+1)/∂u_l‖₂ per layer beside eq. (21) of the PDE model (95 % intervals "
                "over seeds); 1 = neither growth nor decay",
                figures.layer_curves,
                {"labels": list(MNIST_LAYERS), "series": series, "dashed": dashed, "ylabel": "norm", "logy": True},
            )
        )
    r2 = []
    for label, s in MODELS:
        for q, name in ((f"{PREFIX}r2_attention", "attention only"), (f"{PREFIX}r2_diffusion", "diffusion only")):
            d = per_seed_layers(results, s, q, MNIST_LAYERS)
            if d:
                r2.append((f"{label}: {name}", *curve_stats(d)))
    if r2:
        sec.figures.append(
            FigureSpec(
                "lens_r2",
                "R² of the attention-only and diffusion-only sub-models of eq. (20) per layer (the full fit "
                "has R² = 1 for both models)",
                figures.layer_curves,
                {"labels": list(MNIST_LAYERS), "series": r2, "ylabel": "R²"},
            )
        )
    if not math.isfinite(_scalar(results, "mnist_pde", f"{PREFIX}lyapunov").value):
        sec.notes.append("No Jacobian measurement of the PDE model was found.")
    return sec
