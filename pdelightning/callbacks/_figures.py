"""Moved to :mod:`pdelightning.plots` (numpy and matplotlib only, drawn in the figure worker process)."""

from pdelightning.plots.draw import (  # noqa: F401 (the old import path keeps working)
    attention_by_layer_figure,
    attention_maps_figure,
    few_ticks,
    loss_vs_eps_figure,
)
