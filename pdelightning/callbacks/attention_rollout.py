"""How information flows across layers: attention rollout through the whole stack (Abnar & Zuidema, 2020).

A layer's attention says where each token reads from in the layer below; with the residual path, a token also
keeps its own state. Rollout composes the layers: ``R_l = Ã_l R_{l-1}`` with ``Ã = (1 - w) A + w I`` (heads fused,
rows renormalised over valid keys), so ``R_l[i, j]`` is how much of output position ``i`` after layer ``l`` traces
back to input token ``j`` (:mod:`pdelightning.analysis.rollout`). The entropy of its rows says how widely
information has mixed: ``0`` for a stack that keeps every token to itself, ``ln T`` for complete mixing.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from pdelightning.adapters.windowed import dense_attention, skip_once, stages
from pdelightning.analysis.rollout import attention_rollout, fuse_heads, row_entropy
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.plots import rollout_figure
from pdelightning.probing.capture import Request
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.store import GatherStore

_CHUNK_ELEMENTS = 2**24  # windowed models: samples whose [T, T] rollouts fit this many entries go through at once


class AttentionRollout(ProbeCallback):
    r"""Attention rollout per probe: the rolled-out token-to-token attention through the layers, and its entropy.

    For each probe sample, the attention probabilities of every layer (read exactly as the model's library computes
    them, see :mod:`pdelightning.adapters.readers`) are fused over heads (``head_fusion``), mixed with the residual
    identity (``0.5 A + 0.5 I`` by default), renormalised over valid keys and multiplied through the layers.
    Logged per layer: the mean row entropy of the rollout after that layer (nats, over valid rows and samples), and
    the same as a fraction of ``ln`` (number of valid tokens) (``mixing``: 0 = no mixing, 1 = uniform). The figure
    shows the final rollout of one probe sample and the entropy per layer. Comparing a PDE model's rollout with a
    Transformer's shows whether the continuum model moves information across tokens the same way (the paper's
    information-flow section has no such picture).

    Args:
        residual_weight: weight ``w`` of the identity (the residual path) in each layer's matrix, in ``[0, 1)``.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        **kwargs: the :class:`~pdelightning.callbacks.ProbeCallback` arguments.

    Raises:
        ValueError: for ``residual_weight`` outside ``[0, 1)`` or an unknown ``head_fusion``.
        TargetNotFoundError: at setup, when the model has no layers with attention.

    Logged metrics: ``analysis/attention_rollout/entropy/<layer>``, ``analysis/attention_rollout/mixing/<layer>``.
    Figure ``analysis/attention_rollout/rollout``.

    Example::

        trainer = L.Trainer(callbacks=[AttentionRollout()])
    """

    name = "attention_rollout"
    needs = ("layers", "attention")

    def __init__(
        self, residual_weight: float = 0.5, head_fusion: Literal["mean", "max", "min"] = "mean", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= residual_weight < 1.0:
            raise ValueError(f"residual_weight={residual_weight} must lie in [0, 1)")
        if head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"head_fusion={head_fusion!r} is not one of ('mean', 'max', 'min')")
        self.residual_weight, self.head_fusion = residual_weight, head_fusion
        self.last_metrics: dict[str, float] = {}

    @override
    def request(self) -> Request:
        return Request(attention=True)

    @override
    def begin(self, session: ProbeSession) -> None:
        self._layers = session.targets["model"].layers
        self._names = [t.name for t in self._layers]
        keys = [f"entropy/{n}" for n in self._names] + [f"mixing/{n}" for n in self._names]
        self._store = GatherStore(keys).to(session.device)
        self._sample0: torch.Tensor | None = None

    @override
    def consume(self, pb: ProbeBatch) -> None:
        groups = stages(self._layers)
        if len(groups) > 1:
            skip_once(
                self,
                "rollout across stages",
                "patch merging between stages changes the tokens; the rollout "
                "restarts at the first layer of each stage (logged per layer as usual)",
            )
        parts: dict[str, list[Tensor]] = {}
        for group in groups:
            attentions = [pb.captured["model"].attention[t.name] for t in group]
            # windowed rows [B, H, T, N]: heads fused first (exact: every head is zero outside the window), then the
            # [T, T] operator is formed for a few samples at a time
            windowed = [t.windows is not None for t in group]
            attentions = [
                fuse_heads(a, self.head_fusion)[:, None] if w else a for a, w in zip(attentions, windowed, strict=True)
            ]
            n, t = attentions[0].shape[0], attentions[0].shape[-2]
            valid = pb.valid if pb.valid is not None and pb.valid.shape == (n, t) else None
            chunk = max(1, _CHUNK_ELEMENTS // (t * t)) if any(windowed) else n
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                mats = [
                    dense_attention(a[rows], layer.windows) if layer.windows is not None else a[rows]
                    for a, layer in zip(attentions, group, strict=True)
                ]
                cut = valid[rows] if valid is not None else None
                for key, value in self._consume_stage(pb, [t.name for t in group], mats, cut, rows).items():
                    parts.setdefault(key, []).append(value)
        self._store.update(pb.index, **{key: torch.cat(values) for key, values in parts.items()})

    def _consume_stage(
        self, pb: ProbeBatch, names: list[str], attentions: list[Tensor], valid: Tensor | None, samples: slice
    ) -> dict[str, Tensor]:
        """The rollout of one stage's layers for the batch rows ``samples`` (``valid``: their ``[b, T]`` mask)."""
        rollout = attention_rollout(
            attentions, valid, residual_weight=self.residual_weight, head_fusion=self.head_fusion
        )  # [L, B, T, T]
        rows = row_entropy(rollout, valid, reduction="none")  # [L, B, T], zero at padded rows
        if valid is None:
            valid = torch.ones(rows.shape[1:], dtype=torch.bool, device=rows.device)
        count = valid.sum(-1).clamp_min(1).to(rows.dtype)  # [B]
        entropy = rows.sum(-1) / count  # [L, B]
        ceiling = count.log().clamp_min(1e-12)
        update = {}
        for i, n in enumerate(names):
            update[f"entropy/{n}"] = entropy[i].float()
            update[f"mixing/{n}"] = torch.where(count > 1, entropy[i] / ceiling, torch.zeros_like(ceiling)).float()
        here = pb.index[samples] == pb.session.figure_position
        if bool(here.any()):
            k = int(here.nonzero()[0, 0])
            keep = valid[k]
            self._sample0 = rollout[-1, k][keep][:, keep].float().cpu()
        return update

    @override
    def finish(self, session: ProbeSession) -> None:
        out = self._store.gather()
        self._store = None  # type: ignore[assignment]
        metrics = {}
        for key, v in out.items():
            v = v.double()
            metrics[f"analysis/{self.name}/{key}"] = float(v.mean()) if v.numel() else math.nan
        self.last_metrics = metrics
        self.log_scalars(session.trainer, metrics, session.step)
        if self.figures_due and self._sample0 is not None:
            sample, names = self._sample0, list(self._names)
            entropies = [metrics[f"analysis/{self.name}/entropy/{n}"] for n in names]
            self.figure(session, self.key("rollout"), rollout_figure, sample, names, entropies)

    @override
    def layout(self) -> dict[str, list[str]]:
        k = f"analysis/{self.name}"
        return {"rollout entropy per layer": [rf"^{k}/entropy/.*"], "mixing per layer": [rf"^{k}/mixing/.*"]}
