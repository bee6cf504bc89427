"""Compatibility names for finding what to analyse (the logic lives in :mod:`pdelightning.adapters`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from pdelightning.adapters.registry import TargetNotFoundError, clean_name, glob_to_regex, resolve, unwrap
from pdelightning.models.protocol import AnalysisTargets

__all__ = ["TargetNotFoundError", "clean_name", "glob_to_regex", "module_copy", "resolve_targets", "unwrap"]

_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def resolve_targets(
    model: nn.Module,
    layers: str | None = None,
    attention: str | None = None,
    embedding: str | None = None,
    need: Sequence[str] = ("layers",),
) -> AnalysisTargets:
    """The targets of ``model`` (see :func:`pdelightning.adapters.resolve`)."""
    return resolve(model, layers=layers, attention=attention, embedding=embedding, need=need)[1]


def module_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s submodules, parameters and buffers that *shares* its other attributes.

    A LightningModule carries configuration objects (optimizer factories, hyperparameters, a trainer reference)
    that need not, and sometimes cannot, be copied; sharing them keeps the copy cheap and safe. Take it before the
    strategy wraps the model: under DDP the parameters carry reducer hooks that cannot be copied.
    """
    module = unwrap(module)
    memo: dict[int, object] = {}
    for m in module.modules():
        for k, v in vars(m).items():
            if k not in _MODULE_INTERNALS and not isinstance(v, (nn.Module, Tensor)):
                memo[id(v)] = v
    return copy.deepcopy(module, memo)
