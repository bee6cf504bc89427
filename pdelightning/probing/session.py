"""A probe's shared state (:class:`ProbeSession`), one probe batch with its captures (:class:`ProbeBatch`), and the
shared forward that makes one (:func:`forward_batch`): what the hub (:mod:`pdelightning.probing.hub`) hands every
callback due at a probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from pdelightning.adapters.base import ModelAdapter
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.probing.batch import (
    call_model,
    extract_logits,
    labels_of,
    map_tensors,
    per_sample_loss,
    take_rows,
    valid_from_batch,
)
from pdelightning.probing.capture import Capture, Captured, EmbeddingEdit, Request, pad_prefix
from pdelightning.probing.figures import FigureWorker
from pdelightning.probing.sharding import full

__all__ = ["MODEL", "ProbeBatch", "ProbeSession", "forward_batch"]

MODEL = "model"


@dataclass
class ProbeSession:
    """One probe: the step, the models' targets and what the callbacks share.

    Attributes:
        trainer, pl_module: the run.
        step: the global step of the probe.
        final: whether this is the last probe of training.
        targets: resolved targets of each model key (``"model"`` and the extra models).
        adapters: the adapter of each model key (``None`` for glob-only targets).
        modules: each model key's module.
        probe_size: number of samples in the whole probe set (all ranks).
        figures: the background figure worker.
        partner: ``[probe_size]`` each position's partner for the shuffled null (``-1``: none).
        rank: ``[probe_size]`` a random rank of each position (a subset of ``k`` samples: those of rank ``< k``).
        figure_position: the probe position of the sample that figures draw (rank 0; on process 0).
    """

    trainer: L.Trainer
    pl_module: L.LightningModule
    step: int
    final: bool
    targets: dict[str, AnalysisTargets]
    adapters: dict[str, ModelAdapter | None]
    modules: dict[str, nn.Module]
    probe_size: int
    figures: FigureWorker
    timings: dict[str, float] = field(default_factory=dict)
    partner: Tensor | None = None
    rank: Tensor | None = None
    figure_position: int = 0
    _full_weights: dict[str, dict[str, tuple[Tensor | None, Tensor | None]]] = field(default_factory=dict, repr=False)

    def subset(self, index: Tensor, k: int | None) -> Tensor:
        """Rows of a batch with probe positions ``index`` that belong to the random subset of ``k`` samples.

        A stand-in batch (empty ``index``) has no row in any subset.
        """
        if k is None or self.rank is None:
            return torch.arange(len(index), device=index.device)
        return (self.rank.to(index.device)[index] < k).nonzero().flatten()

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.pl_module.device

    def full_weights(self, key: str = MODEL) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """``{layer name: (W_O, W_V)}`` of model ``key``, whole even when the model is sharded, detached.

        Read once per probe, for every layer at once, and shared by every callback of the probe: a sharded
        (``DTensor``) weight is gathered here (a collective: every rank calls this at the same point of a probe; see
        :mod:`pdelightning.probing.sharding`), never per callback, and never outside a probe. Either matrix is
        ``None`` where the layer has none.
        """
        if key not in self._full_weights:
            out: dict[str, tuple[Tensor | None, Tensor | None]] = {}
            with torch.no_grad():
                for layer in self.targets[key].layers:
                    w_o, w_v = full(layer.out_proj_weight()), full(layer.value_proj_weight())
                    out[layer.name] = (
                        w_o.detach() if w_o is not None else None,
                        w_v.detach() if w_v is not None else None,
                    )
            self._full_weights[key] = out
        return self._full_weights[key]


@dataclass
class ProbeBatch:
    """One probe batch with everything the shared forwards captured.

    Attributes:
        batch: the collated batch on the model's device.
        index: ``[B']`` positions of the samples in the probe set (``B' < B`` only for a rank's stand-in batch).
        labels: the labels, or ``None``.
        valid: ``[B, T]`` valid-token mask of the model's residual stream (prefix tokens valid), or ``None``.
        logits: the model's logits.
        loss: per-sample loss ``[B]`` (see :func:`~pdelightning.probing.batch.per_sample_loss`), or ``None``.
        captured: what each model key's forward captured.
        session: the probe session.
    """

    batch: Any
    index: Tensor
    labels: Tensor | None
    valid: Tensor | None
    logits: Tensor
    loss: Tensor | None
    captured: dict[str, Captured]
    session: ProbeSession

    def take(self, rows: Tensor) -> ProbeBatch:
        """The samples ``rows`` of this batch (captures, logits, losses and mask cut alike; layer inputs dropped).

        With no row selected, the first sample is kept as a stand-in with an empty index, so the caller still runs its
        code and contributes zero rows to its gather.
        """
        index = self.index[rows] if len(self.index) else self.index[:0]
        if len(rows) == 0:
            rows = torch.zeros(1, dtype=torch.long, device=self.logits.device)
        n = self.logits.shape[0]

        def cut(t: Tensor | None) -> Tensor | None:
            return t[rows] if t is not None and t.dim() > 0 and t.shape[0] == n else t

        captured = {
            key: Captured(
                hidden={k: cut(v) for k, v in c.hidden.items()},
                embedding=cut(c.embedding),
                attention={k: cut(v) for k, v in c.attention.items()},
                resid_pre={k: cut(v) for k, v in c.resid_pre.items()},
                attn_out={k: cut(v) for k, v in c.attn_out.items()},
                mlp_out={k: cut(v) for k, v in c.mlp_out.items()},
                valid=cut(c.valid),
            )  # type: ignore[arg-type]
            for key, c in self.captured.items()
        }
        return ProbeBatch(
            take_rows(self.batch, rows, n),
            index,
            cut(self.labels),
            cut(self.valid),
            cut(self.logits),  # type: ignore[arg-type]
            cut(self.loss),
            captured,
            self.session,
        )

    def forward(
        self,
        batch: Any = None,
        request: Request | None = None,
        rows: slice | None = None,
        edit: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Captured]:
        """An extra forward of the model (e.g. perturbed): ``(logits, captured)``.

        Args:
            batch: the inputs (default: this batch).
            request: what to capture (default: nothing).
            rows: capture only these rows.
            edit: rewrite the embedding ``u_0`` with ``edit(u_0)`` during the forward.
        """
        s = self.session
        targets, adapter = s.targets[MODEL], s.adapters[MODEL]
        with Capture(adapter, targets, request or Request(), rows) as cap:
            if edit is not None:
                with EmbeddingEdit(targets) as e:
                    e.fn = edit
                    out = call_model(s.pl_module, self.batch if batch is None else batch)
            else:
                out = call_model(s.pl_module, self.batch if batch is None else batch)
            return extract_logits(out), cap.pop()


def _to(batch: Any, device: torch.device) -> Any:
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def forward_batch(
    session: ProbeSession, models: dict[str, tuple[nn.Module, Request]], raw: Any, index: Tensor
) -> ProbeBatch:
    """One probe batch through the model (and each extra model) with the union of the requested captures."""
    pl_module, device, targets, adapters = session.pl_module, session.device, session.targets, session.adapters
    batch = _to(raw, device)
    labels = labels_of(batch)
    captured: dict[str, Captured] = {}
    logits: Tensor | None = None
    for key, (module, req) in models.items():
        inputs = batch
        if key != MODEL and req.samples is not None:  # only the random subset (a stand-in row if none)
            rows = session.subset(index, req.samples)
            rows = rows if len(rows) else torch.zeros(1, dtype=torch.long)
            inputs = take_rows(batch, rows.to(device))
        with Capture(adapters[key], targets[key], req) as cap:
            out = call_model(module, inputs)
            captured[key] = cap.pop()
        if key == MODEL:
            logits = extract_logits(out)
    assert logits is not None
    main = captured[MODEL]
    valid = main.valid if main.valid is not None else valid_from_batch(batch)
    length = next((h.shape[1] for h in main.hidden.values() if h.dim() == 3), None)
    if length is None and main.embedding is not None and main.embedding.dim() == 3:
        length = main.embedding.shape[1]
    if valid is not None and length is not None:
        valid = pad_prefix(valid.to(device), length)
    loss = per_sample_loss(pl_module, batch, logits, labels)
    return ProbeBatch(batch, index.to(device), labels, valid, logits, loss, captured, session)
