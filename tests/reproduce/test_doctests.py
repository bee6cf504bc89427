"""The examples in the reproduction modules' docstrings run and give what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = (
    "pdelightning_reproduce.verdicts",
    "pdelightning_reproduce.stats",
    "pdelightning_reproduce.pairs",
    "pdelightning_reproduce.rule_changes",
    "pdelightning_reproduce.compute",
    "pdelightning_reproduce.sections.attention",
    "pdelightning_reproduce.sections.bottleneck",
    "pdelightning_reproduce.sections.perturbation",
    "pdelightning_reproduce.sections.ablations",
    "pdelightning.analysis.rank",
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
