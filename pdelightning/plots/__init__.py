"""Figures of the analysis callbacks (:mod:`.draw`) and the process that renders them off training (:mod:`.worker`)."""

from pdelightning.plots.draw import (
    attention_by_layer_figure,
    attention_maps_figure,
    cka_figure,
    few_ticks,
    heatmap_figure,
    information_plane_figure,
    loss_vs_eps_figure,
    pde_fit_figure,
    rollout_figure,
)

__all__ = [
    "attention_by_layer_figure",
    "attention_maps_figure",
    "cka_figure",
    "few_ticks",
    "heatmap_figure",
    "information_plane_figure",
    "loss_vs_eps_figure",
    "pde_fit_figure",
    "rollout_figure",
]
