"""The examples in the reproduction modules' docstrings run and give what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "pdelightning.reproduce.verdicts", "pdelightning.reproduce.compute", "pdelightning.reproduce.sections.bottleneck",
    "pdelightning.reproduce.sections.perturbation", "pdelightning.reproduce.sections.ablations",
    "pdelightning.analysis.rank",
)  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
