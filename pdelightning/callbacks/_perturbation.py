"""The forwards of :class:`~pdelightning.callbacks.PerturbationEval`: every ε of a probe batch, and the FGSM direction.

All ε levels of a probe batch run in one forward: the batch is repeated once per ε along the batch axis, each copy
scaled by its own ε (:func:`~pdelightning.analysis.perturbation.scale_rows`), in chunks of whole copies
(:func:`~pdelightning.analysis.perturbation.copies_per_forward`). The noise goes on the float input or on the
embedding output ``u_0`` (replaced during the probe forward through its ``edit`` hook).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor

from pdelightning.analysis.perturbation import (
    copies_per_forward,
    correct_predictions,
    eps_tags,
    mask_like,
    per_sample_rms,
    scale_rows,
)
from pdelightning.probing.batch import per_sample_loss, primary_input, repeat_batch, with_primary_input
from pdelightning.probing.capture import Captured, Request
from pdelightning.probing.hub import ProbeBatch
from pdelightning.probing.loaders import validation_loader

Mode = Literal["input", "embedding"]


def check_epsilons(epsilons: Sequence[float]) -> tuple[list[float], list[str]]:
    """The sorted ε grid and its metric labels (``ValueError`` for an empty, bad or ambiguous grid)."""
    eps = [float(e) for e in epsilons]
    if not eps:
        raise ValueError("epsilons is empty: give at least one perturbation strength, e.g. [1e-3, 1e-2]")
    bad = [e for e in eps if not (math.isfinite(e) and e > 0)]
    if bad:
        raise ValueError(f"epsilons must be positive and finite (the ε axis is logarithmic); got {bad}")
    eps = sorted(eps)
    labels = eps_tags(eps)
    if len(set(labels)) != len(labels):
        raise ValueError(f"epsilons {eps} give repeated metric keys {labels}: use distinct values")
    return eps, labels


def peek_inputs(trainer: L.Trainer) -> Any | None:
    """One collated sample's main input (to tell images from token ids at setup); ``None`` if unreachable."""
    try:
        loader = validation_loader(trainer)
        if loader is None:
            return None
        return primary_input(loader.collate_fn([loader.dataset[0]]))
    except Exception:  # an iterable or lazy dataset: decide at the first probe instead
        return None


def perturbed_losses(
    pb: ProbeBatch,
    mode: Mode,
    epsilons: list[float],
    direction: Tensor,
    u0: Tensor | None,
    amp_at: int | None,
    max_rows: int,
) -> tuple[list[Tensor], list[Tensor], Captured | None]:
    """Per-ε losses and correctness of ``direction`` scaled by every ε, in chunks of whole copies of the batch.

    Returns ``(losses, correct, captured)``: one ``[n]`` tensor per ε of each, and the layer outputs captured for
    the copy at position ``amp_at`` of ``epsilons`` (``None`` for none).
    """
    n = pb.logits.shape[0]
    length = u0.shape[1] if u0 is not None and u0.dim() == 3 else 1
    per_chunk = copies_per_forward(n, length, max_rows)  # probes form the explicit attention
    losses: list[Tensor] = []
    correct: list[Tensor] = []
    amp_capture: Captured | None = None
    assert pb.labels is not None
    for start in range(0, len(epsilons), per_chunk):
        chunk = epsilons[start : start + per_chunk]
        k = len(chunk)
        eps = torch.tensor(chunk).repeat_interleave(n)
        batch = repeat_batch(pb.batch, k)
        labels = pb.labels.repeat(k, *([1] * (pb.labels.dim() - 1)))
        hit = amp_at is not None and start <= amp_at < start + k
        rows_at = slice((amp_at - start) * n, (amp_at - start + 1) * n) if hit else None  # type: ignore[operator]
        request = Request(hidden=True, embedding=True) if rows_at is not None else Request()
        if mode == "embedding":
            assert u0 is not None
            shift = scale_rows(eps, u0) * direction.repeat(k, *([1] * (direction.dim() - 1)))

            def edit(u: Tensor, shift: Tensor = shift) -> Tensor:
                return u + shift.to(u.dtype)

            logits, cap = pb.forward(batch, request, rows_at, edit)
        else:
            x = primary_input(batch)
            assert x is not None
            x = x + scale_rows(eps, x) * direction.repeat(k, *([1] * (direction.dim() - 1))).to(x.dtype)
            logits, cap = pb.forward(with_primary_input(batch, x), request, rows_at)
        loss = per_sample_loss(pb.session.pl_module, batch, logits, labels)
        assert loss is not None
        losses += list(loss.view(k, n))
        correct += list(correct_predictions(logits, labels).view(k, n))
        if rows_at is not None:
            amp_capture = cap
    return losses, correct, amp_capture


def fgsm_direction(pb: ProbeBatch, mode: Mode, u0: Tensor | None, valid: Tensor | None) -> Tensor:
    """``sign(∇ loss)`` with respect to the input (input mode) or ``u_0`` times ``rms(u_0)`` (embedding mode).

    The gradient is taken with ``torch.autograd.grad`` with respect to that tensor only: parameters' ``.grad`` are
    not touched.
    """
    assert pb.labels is not None
    with torch.enable_grad():
        if mode == "embedding":
            leaves: list[Tensor] = []

            def make_leaf(u: Tensor) -> Tensor:
                leaves.append(u.detach().requires_grad_(True))
                return leaves[-1]

            logits, _ = pb.forward(edit=make_leaf)
            leaf = leaves[0]
        else:
            x = primary_input(pb.batch)
            assert x is not None
            leaf = x.detach().clone().requires_grad_(True)
            logits, _ = pb.forward(with_primary_input(pb.batch, leaf))
        loss = per_sample_loss(pb.session.pl_module, pb.batch, logits, pb.labels)
        assert loss is not None
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    direction = grad.sign()
    if mode == "embedding" and u0 is not None:
        valid_u = valid if mask_like(u0, valid) is not None else None
        m = mask_like(u0, valid_u)
        direction = direction * per_sample_rms(u0, valid_u).view(-1, *([1] * (u0.dim() - 1)))
        if m is not None:
            direction = direction * m
    return direction.detach()
