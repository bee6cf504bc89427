"""Figures of the analysis callbacks (matplotlib ``Figure`` objects, no pyplot state: safe on a worker thread)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor


def few_ticks(ax: Any, shape: Sequence[int]) -> None:
    """No ticks on an image; its size goes in the axis labels (tick artists are most of what a figure costs)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{ax.get_xlabel()} (0-{int(shape[1]) - 1})".strip(), fontsize=7)
    ax.set_ylabel(f"{ax.get_ylabel()} (0-{int(shape[0]) - 1})".strip(), fontsize=7)


def attention_maps_figure(maps: Mapping[str, tuple[Tensor, Tensor]], pairs: Sequence[tuple[str, str]]) -> Any:
    """Head-averaged attention of probe sample 0: model (top row) and reference (bottom row), one column per layer."""
    from matplotlib.figure import Figure

    names = [a for a, _ in pairs if a in maps]
    vmax = max(float(m.max()) for a in names for m in maps[a])
    fig = Figure(figsize=(2.4 * len(names) + 1.0, 5.0))
    axes = fig.subplots(2, len(names), squeeze=False)
    ref_of = dict(pairs)
    im = None
    for col, a in enumerate(names):
        for row, (mat, title) in enumerate(((maps[a][0], f"model {a}"), (maps[a][1], f"reference {ref_of[a]}"))):
            ax = axes[row][col]
            im = ax.imshow(mat.numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            few_ticks(ax, mat.shape)
    fig.subplots_adjust(left=0.08, right=0.86, wspace=0.45, hspace=0.45)
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.02, 0.7)), label="attention (head mean)")
    return fig


def attention_by_layer_figure(results: Mapping[str, Mapping[str, Any]], nulls: Sequence[str]) -> Any:
    """Left: per-layer matched cosine beside its nulls (y axis zoomed to the data). Right: skill per layer."""
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
    for q in ("cosine_skill", "js_skill"):
        ax_skill.plot(range(len(layers)), [results[a].get(q, float("nan")) for a in layers], marker="o", label=q)
    ax_skill.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax_skill.set_xticks(range(len(layers)), layers, fontsize=7)
    ax_skill.set_ylabel("skill vs strongest null")
    ax_skill.legend(fontsize=6)
    fig.subplots_adjust(bottom=0.18, wspace=0.3)
    return fig


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
    return fig
