"""The report's figures: plain drawing functions of arrays (no data access), each returning a matplotlib ``Figure``.

Intervals are drawn as shaded bands (95 % t intervals over seeds), the paper's values as black markers, nulls and
ceilings as dashed lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 90
MAX_BYTES = 200_000

Series = tuple[str, np.ndarray, np.ndarray, np.ndarray]  # (label, mean, lo, hi)


def _figure(w: float = 6.4, h: float = 3.6) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _band(ax: Any, x: np.ndarray, s: Series, style: str = "-", **kw: Any) -> None:
    label, mean, lo, hi = s
    if not len(mean):
        return
    line = ax.plot(x, mean, style, marker="o", ms=3, label=label, **kw)[0]
    if np.isfinite(lo).any():
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def layer_curves(
    labels: Sequence[str],
    series: Sequence[Series],
    ylabel: str,
    title: str = "",
    paper: Sequence[tuple[str, Sequence[float]]] = (),
    dashed: Sequence[Series] = (),
    logy: bool = False,
) -> Figure:
    """Per-layer curves with interval bands; ``paper`` as black markers, ``dashed`` (nulls, ceilings) dashed."""
    fig, ax = _figure()
    x = np.arange(len(labels))
    for s in series:
        _band(ax, x, s)
    for s in dashed:
        _band(ax, x, s, "--", lw=1)
    for (label, values), marker in zip(paper, ("s", "D", "^", "v"), strict=False):
        ax.plot(x, values, marker, color="black", ms=5, mfc="none", ls=":", lw=0.8, label=f"paper: {label}")
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def eps_curves(
    eps: Sequence[float], series: Sequence[Series], ylabel: str, title: str = "", marks: Sequence[float] = ()
) -> Figure:
    """Curves over a log ε axis, vertical dotted lines at ``marks``."""
    fig, ax = _figure()
    x = np.asarray(eps, dtype=float)
    for s in series:
        _band(ax, x, s)
    for m in marks:
        ax.axvline(m, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("ε (x embedding RMS)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def trajectories(panels: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, Series]]]], ylabel: str) -> Figure:
    """One panel per model: per-layer curves over training steps (symlog x axis)."""
    fig = Figure(figsize=(4.0 * max(len(panels), 1), 3.4))
    FigureCanvasAgg(fig)
    for k, (title, curves) in enumerate(panels):
        ax = fig.add_subplot(1, max(len(panels), 1), k + 1)
        for _, steps, s in curves:
            _band(ax, steps, s)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def heatmaps(panels: Sequence[tuple[str, np.ndarray]], rows: Sequence[str], cols: Sequence[str], label: str) -> Figure:
    """One annotated heatmap per panel (values in [0, 1], ``nan`` blank)."""
    fig = Figure(figsize=(3.2 * max(len(panels), 1), 2.9))
    FigureCanvasAgg(fig)
    for k, (title, mat) in enumerate(panels):
        ax = fig.add_subplot(1, max(len(panels), 1), k + 1)
        ax.imshow(np.ma.masked_invalid(mat), vmin=0, vmax=1, cmap="Reds")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(cols)), cols, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(f"{title}\n{label}", fontsize=8)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Save as PNG; lower the resolution until the file is at most :data:`MAX_BYTES`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dpi = DPI
    while True:
        fig.savefig(path, dpi=dpi)
        if path.stat().st_size <= MAX_BYTES or dpi <= 40:
            return path
        dpi = int(dpi * 0.8)
