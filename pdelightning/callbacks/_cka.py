"""Moved to :mod:`pdelightning.analysis.cka`; re-exported here so the old import path keeps working."""

from pdelightning.analysis.cka import cka_matrix, gram_linear, hsic_biased, hsic_unbiased, linear_cka

__all__ = ["cka_matrix", "gram_linear", "hsic_biased", "hsic_unbiased", "linear_cka"]
