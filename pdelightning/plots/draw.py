"""The analysis callbacks' figures: pure functions from numbers (numpy arrays, floats) to a matplotlib ``Figure``.

They import nothing but numpy and matplotlib (no torch), so the figure worker process
(:mod:`pdelightning.plots.worker`) starts in about a second and draws them while training goes on. Tensors are
accepted too (anything ``numpy.asarray`` reads). No pyplot state: fixed margins instead of a layout engine, few
ticks on images (tick artists are most of what a figure costs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def plain_ticks(fig: Any) -> Any:
    """Turn off the offset notation of every linear axis of ``fig`` (no "1e-12+1" above an axis of values near 1)."""
    from matplotlib.ticker import ScalarFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            formatter = axis.get_major_formatter()
            if isinstance(formatter, ScalarFormatter):
                formatter.set_useOffset(False)
    return fig


def few_ticks(ax: Any, shape: Sequence[int]) -> None:
    """No ticks on an image; its size goes in the axis labels (tick artists are most of what a figure costs)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{ax.get_xlabel()} (0-{int(shape[1]) - 1})".strip(), fontsize=7)
    ax.set_ylabel(f"{ax.get_ylabel()} (0-{int(shape[0]) - 1})".strip(), fontsize=7)


def attention_maps_figure(maps: Mapping[str, tuple[ArrayLike, ArrayLike]], pairs: Sequence[tuple[str, str]]) -> Any:
    """Head-averaged attention of probe sample 0: model (top row) and reference (bottom row), one column per layer."""
    from matplotlib.figure import Figure

    names = [a for a, _ in pairs if a in maps]
    vmax = max(float(np.max(m)) for a in names for m in maps[a])
    fig = Figure(figsize=(2.4 * len(names) + 1.0, 5.0))
    axes = fig.subplots(2, len(names), squeeze=False)
    ref_of = dict(pairs)
    im = None
    for col, a in enumerate(names):
        for row, (mat, title) in enumerate(((maps[a][0], f"model {a}"), (maps[a][1], f"reference {ref_of[a]}"))):
            ax = axes[row][col]
            im = ax.imshow(np.asarray(mat), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            few_ticks(ax, np.shape(mat))
    fig.subplots_adjust(left=0.08, right=0.86, wspace=0.45, hspace=0.45)
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.02, 0.7)), label="attention (head mean)")
    return plain_ticks(fig)


def attention_by_layer_figure(results: Mapping[str, Mapping[str, Any]], nulls: Sequence[str]) -> Any:
    """Left: per-layer matched cosine beside its nulls (y axis zoomed to the data). Right: skill per layer (the raw
    margin where no skill is defined).
    """
    from matplotlib.figure import Figure

    layers = list(results)
    series = ["cosine"] + [f"cosine_null_{n}" for n in nulls]
    fig = Figure(figsize=(max(7.0, 2.0 * len(layers) + 3.0), 3.4))
    ax, ax_skill = fig.subplots(1, 2)
    width = 0.8 / len(series)
    values = []
    for k, s in enumerate(series):
        ys = [results[a].get(s, float("nan")) for a in layers]
        values += [y for y in ys if math.isfinite(y)]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, ys, width, label=s.replace("cosine_", ""))
    low = min(values, default=0.0)
    ax.set_ylim(max(0.0, low - 0.2 * (1.0 - low) - 1e-3), 1.0)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_ylabel("cosine similarity (per row)")
    ax.legend(fontsize=6)
    defined = any(math.isfinite(results[a].get(q, math.nan)) for a in layers for q in ("cosine_skill", "js_skill"))
    kind = "skill" if defined else "margin"  # a skill is undefined where the null leaves no room: read the margin
    for q in (f"cosine_{kind}", f"js_{kind}"):
        ax_skill.plot(range(len(layers)), [results[a].get(q, float("nan")) for a in layers], marker="o", label=q)
    ax_skill.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax_skill.set_xticks(range(len(layers)), layers, fontsize=7)
    ax_skill.set_ylabel(f"{kind} vs strongest null")
    ax_skill.legend(fontsize=6)
    fig.subplots_adjust(bottom=0.18, wspace=0.3)
    return plain_ticks(fig)


def loss_vs_eps_figure(
    epsilons: Sequence[float],
    losses: Sequence[float],
    accs: Sequence[float],
    clean_loss: float,
    clean_acc: float,
    critical: float,
    fgsm_losses: Sequence[float] | None = None,
    fgsm_accs: Sequence[float] | None = None,
    title: str = "",
) -> Any:
    """Loss and accuracy against ε (log axis) with the clean values as horizontal lines and the critical ε marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(9, 3.6))  # fixed margins: a layout engine costs more than the plot
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.87, wspace=0.28)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, values, fgsm, clean, label in (
        (ax_loss, losses, fgsm_losses, clean_loss, "loss"),
        (ax_acc, accs, fgsm_accs, clean_acc, "accuracy"),
    ):
        ax.plot(epsilons, values, "o-", label="Gaussian noise")
        if fgsm is not None:
            ax.plot(epsilons, fgsm, "s--", label="FGSM")
        ax.axhline(clean, color="gray", linestyle=":", label=f"clean {label}")
        if math.isfinite(critical):
            ax.axvline(critical, color="red", linestyle="--", label=f"critical ε = {critical:.2g}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # minor log ticks are hundreds of artists to draw
        ax.set_xlabel("perturbation strength ε")
        ax.set_ylabel(f"mean {label}")
        ax.grid(True, alpha=0.3)
    ax_loss.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return plain_ticks(fig)


def heatmap_figure(rows: list[tuple[str, list[ArrayLike], list[str]]], n_samples: int = 8) -> Any:
    """Grid of heatmaps: one row per model, one panel per layer, the first ``n_samples`` samples x features.

    Each row shares one symmetric colour scale (so fading activations with depth are visible) and a colour bar.
    """
    from matplotlib.figure import Figure

    n_cols = max(len(reps) for _, reps, _ in rows)
    fig = Figure(figsize=(2.0 * n_cols + 1.0, 2.0 * len(rows) + 0.4))  # fixed margins: a layout engine costs more
    fig.subplots_adjust(left=0.07, right=0.88, bottom=0.12, top=0.9, wspace=0.35, hspace=0.5)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (label, reps, names) in enumerate(rows):
        panels = [np.asarray(x, dtype=float)[:n_samples] for x in reps]
        vmax = max(float(np.abs(p).max()) for p in panels) or 1.0
        image = None
        for c, ax in enumerate(axes[r]):
            if c >= len(panels):
                ax.axis("off")
                continue
            image = ax.imshow(panels[c], aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_title(names[c], fontsize=8)
            ax.set_xlabel("feature")
            ax.set_ylabel(f"{label}\nsample" if c == 0 else "")
            few_ticks(ax, panels[c].shape)
        if image is not None:
            box = axes[r][0].get_position()
            fig.colorbar(image, cax=fig.add_axes((0.9, box.y0, 0.015, box.height)))
    return plain_ticks(fig)


def cka_figure(
    names: list[str], matrix: ArrayLike, ref_names: list[str] | None = None, cross: ArrayLike | None = None
) -> Any:
    """The layer x layer CKA matrix, and beside it this model x reference when ``cross`` is given."""
    from matplotlib.figure import Figure

    panels = [("CKA between layers", matrix, names, names)]
    if cross is not None and ref_names:
        panels.append(("CKA vs reference", cross, names, ref_names))
    m = len(names)
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 0.35 * m + 2.2))  # fixed margins: a layout engine costs more
    fig.subplots_adjust(left=0.1, right=0.86, bottom=0.2, top=0.9, wspace=0.35)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (title, mat, rows, cols) in zip(axes, panels, strict=True):
        values = np.asarray(mat, dtype=float)
        image = ax.imshow(values, cmap="viridis", vmin=min(0.0, float(np.nan_to_num(values).min())), vmax=1.0)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_xlabel("layer" if cols is rows else "reference layer", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
        ax.set_xticks(range(len(cols)), cols, fontsize=6, rotation=90)
        if max(values.shape) <= 12:
            for i, row in enumerate(values.tolist()):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w" if v < 0.5 else "k")
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.89, 0.2, 0.015, 0.7)))
    return plain_ticks(fig)


def information_plane_figure(
    history: Sequence[Mapping[str, Any]], layers: Sequence[str], title: str = "Information plane"
) -> Any:
    """The information plane: ``x = I(X;T)``, ``y = I(T;Y)``, one coloured trajectory per layer over training.

    Each history entry is ``{"step", "I_XT": {layer: bits}, "I_TY": {...}, "saturated": {...}, "log2_N", "H_Y"}``.
    Points grow more opaque with training time, arrows join consecutive probes, the last point is ringed;
    saturated points are drawn hollow. The ``log2 N`` ceiling (dashed, vertical) and ``H(Y)`` (dotted,
    horizontal) of the latest probe are drawn as reference lines.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.0))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.92)  # fixed margins: a layout engine costs more
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"]
    n_points = len(history)
    any_saturated = False
    for li, layer in enumerate(layers):
        color = cmap(li / max(1, len(layers) - 1))
        pts = [(h["I_XT"].get(layer), h["I_TY"].get(layer), bool(h["saturated"].get(layer, False))) for h in history]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "-", color=color, alpha=0.35, lw=1, label=layer)
        for k in range(1, len(pts)):
            ax.annotate(
                "",
                xy=(xs[k], ys[k]),
                xytext=(xs[k - 1], ys[k - 1]),
                arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6, "lw": 1},
            )
        for k, (x, y, sat) in enumerate(pts):
            alpha = 0.3 + 0.7 * (k + 1) / max(1, n_points)
            any_saturated |= sat
            ax.scatter(
                [x],
                [y],
                s=36,
                edgecolors=[color],
                facecolors="none" if sat else [color],
                alpha=alpha,
                linewidths=1.5,
                zorder=3,
            )
        ax.scatter([xs[-1]], [ys[-1]], s=120, facecolors="none", edgecolors="black", linewidths=0.8, zorder=4)
    if history:
        last = history[-1]
        ax.axvline(last["log2_N"], color="gray", ls="--", lw=1, label=f"log2 N = {last['log2_N']:.2f} (ceiling)")
        ax.axhline(last["H_Y"], color="gray", ls=":", lw=1, label=f"H(Y) = {last['H_Y']:.2f}")
    if any_saturated:
        ax.scatter([], [], s=36, facecolors="none", edgecolors="gray", label="saturated (at log2 N)")
    ax.set_xlabel("I(X;T) [bits]")
    ax.set_ylabel("I(T;Y) [bits]")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return plain_ticks(fig)


def pde_fit_figure(history: list[dict[str, Any]], layers: list[str]) -> Any:
    """Per-layer fitted ``D``, ``α``, FFN coefficient and R² (full and sub-models) at the last probe, and R² over
    training (one line per layer).
    """
    from matplotlib.figure import Figure

    last = history[-1]
    names = [n for n in layers if n in last]
    fig = Figure(figsize=(12, 3.4))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.22, wspace=0.3)
    ax_c, ax_r, ax_t = fig.subplots(1, 3)
    x = range(len(names))
    for q in ("D", "alpha", "ffn_coef"):
        ax_c.plot(x, [last[n][q] for n in names], "o-", label=q)
    ax_c.set_title(f"fitted coefficients (step {last['step']})", fontsize=9)
    for q in ("r2", "r2_attention", "r2_diffusion"):
        ax_r.plot(x, [last[n][q] for n in names], "o-", label=q)
    ax_r.set_ylim(min(-0.05, min(last[n]["r2_diffusion"] for n in names) - 0.05), 1.05)
    ax_r.set_title("R² of the fit", fontsize=9)
    for ax in (ax_c, ax_r):
        ax.set_xticks(list(x), names, rotation=60, fontsize=6)
        ax.legend(fontsize=7)
    for n in names:  # the attention-only sub-model: the full fit of a residual block is exact (R² = 1) by construction
        pts = [(h["step"], h[n]["r2_attention"]) for h in history if n in h]
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=n)
    ax_t.set_ylim(min(-0.05, *(h[n]["r2_attention"] - 0.05 for h in history for n in names if n in h)), 1.05)
    ax_t.set_xlabel("step")
    ax_t.set_title("R² of the attention-only fit over training", fontsize=9)
    ax_t.legend(fontsize=6)
    return plain_ticks(fig)


def rollout_figure(sample: ArrayLike, layers: list[str], entropies: list[float]) -> Any:
    """The final rollout of one probe sample (output position x input token) and the entropy per layer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 3.6))
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.2, wspace=0.35)
    ax_m, ax_e = fig.subplots(1, 2)
    image = ax_m.imshow(np.asarray(sample), cmap="viridis", vmin=0.0)
    ax_m.set_xlabel("input token")
    ax_m.set_ylabel("output position")
    few_ticks(ax_m, np.shape(sample))
    ax_m.set_title(f"rollout through {len(layers)} layers (sample 0)", fontsize=9)
    fig.colorbar(image, ax=ax_m, shrink=0.8)
    ax_e.plot(range(len(layers)), entropies, "o-")
    ax_e.set_xticks(range(len(layers)), layers, rotation=60, fontsize=6)
    ax_e.set_ylabel("row entropy of the rollout [nats]", fontsize=8)
    return plain_ticks(fig)
