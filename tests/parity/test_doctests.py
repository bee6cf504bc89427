"""The doctests of the analysis modules: small known answers written next to the code."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "attention",
    "cka",
    "estimator_bias",
    "gradients",
    "information",
    "linear_probe",
    "perturbation",
    "representation",
    "stability",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(f"pdelightning.analysis.{name}")
    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
