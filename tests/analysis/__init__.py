"""Tests of the analysis math (pdelightning.analysis)."""
