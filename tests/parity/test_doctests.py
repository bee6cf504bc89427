"""The doctests of the analysis modules: small known answers written next to the code."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from pdelightning import _checks
from pdelightning.analysis.laplacian import laplacian_1d

MODULES = [
    "attention",
    "cka",
    "estimator_bias",
    "gradients",
    "information",
    "laplacian",
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


def test_check_choice_doctest_and_message() -> None:
    """The shared argument check returns the value or names it and the valid choices."""
    result = doctest.testmod(_checks, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
    with pytest.raises(ValueError, match=r"boundary='dirichlte' is not one of \('dirichlet', 'neumann', 'periodic'\)"):
        laplacian_1d(torch.zeros(1, 3, 1), boundary="dirichlte")
