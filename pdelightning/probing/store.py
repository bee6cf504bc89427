"""Per-sample probe statistics gathered across ranks with a torchmetrics ``Metric``."""

from __future__ import annotations

import re

import torch
from torch import Tensor
from torchmetrics import Metric


def _state_name(key: str) -> str:
    return "s_" + re.sub(r"\W", "_", key)


def _cat(x: Tensor | list[Tensor]) -> Tensor:
    return torch.cat(x) if isinstance(x, list) else x


class GatherStore(Metric):
    """A ``Metric`` whose states are lists of per-sample tensors, concatenated across ranks on ``compute``.

    ``update(index, **tensors)`` appends one batch (``index`` holds each sample's position in the probe set; tensors
    may carry more rows than ``index``, the extra rows are dropped, so a rank with no probe sample contributes
    zero-row tensors of the right shape from a stand-in forward and still takes part in every collective).
    ``compute()`` returns ``{name: tensor}`` over the whole probe set, sorted by ``index``, identical on every rank.
    Every rank must call ``compute()`` (a collective under DDP).
    """

    full_state_update = False

    def __init__(self, keys: list[str]) -> None:
        super().__init__(compute_with_cache=False)
        self.keys = list(keys)
        self._trailing: dict[str, tuple[int, ...]] = {}
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for k in self.keys:
            self.add_state(_state_name(k), default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, **tensors: Tensor) -> None:  # type: ignore[override]
        """Append one batch of per-sample tensors (the first ``len(index)`` rows of each)."""
        n = len(index)
        self.index.append(index.to(self.device))  # type: ignore[attr-defined]
        missing = [k for k in self.keys if k not in tensors]
        if missing:
            raise KeyError(f"GatherStore.update is missing {missing}")
        for k in self.keys:
            t = tensors[k].detach()
            self._trailing[k] = tuple(t.shape[1:])
            getattr(self, _state_name(k)).append(t[:n].to(self.device))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Concatenate (across batches and ranks) and order by sample index."""
        index = _cat(self.index).reshape(-1)  # type: ignore[attr-defined]
        order = index.argsort()
        return {
            k: _cat(getattr(self, _state_name(k))).reshape(-1, *self._trailing.get(k, ()))[order] for k in self.keys
        }

    def gather(self) -> dict[str, Tensor]:
        """:meth:`compute` with every tensor ``[N, ...]``, also for ``N = 1`` (``Metric`` squeezes that to a scalar)."""
        return {k: v.reshape(-1, *self._trailing.get(k, ())) for k, v in self.compute().items()}
