"""``I(T;Y)`` as a lower bound on the probe set (issue 18, item 2): the quantities the IB rules read.

The rules' earlier estimate (``I_TY``: a probe fitted on training-split features, scored on test posts) is a
train/test-shift estimate: it ends at -1.50 / -0.76 bits, which no lower bound can mean. The quantities here are
valid lower bounds on test data (:mod:`pdelightning.analysis.ib_bound`), each with one-sided ``1 - IB_ALPHA``
confidence limits, so a verdict can say "inconclusive" and never reads a value outside the estimator's valid range
as a decline of information. ``I_TY`` stays in the summary as context.

Quantities (bits; ``{layer}`` = ``blocks.i``, pooled over valid tokens; the embedding is skipped like ``I_TY``).
The names follow the rules of :mod:`pdelightning_reproduce.rules` (``IB_LOWER_QUANTITY = "I_TY_lower"``):

* ``I_TY_lower[layer]``: cross-fitted lower bound ``H(Y) - CE`` of a shrinkage-LDA probe on the probe set alone,
  ``IB_FOLDS`` stratified folds, each probe tempered toward its folds' prior by a ``τ`` from an ``IB_INNER_FOLDS``
  inner cross-fit (:func:`~pdelightning.analysis.ib_bound.crossfit_bound`). Its estimand is ``<= I(T;Y)`` and
  ``>= 0`` up to ``O(C / N)`` (measured: 0.000 [-0.003, +0.002] bits on pure noise at ``N = 1000``, ``d = 128``,
  ``C = 20``, where v2's uncalibrated ``I_TY_crossfit`` reads -1.87).
* ``I_TY_lower_lcb[layer]`` / ``I_TY_lower_ucb[layer]``: its one-sided ``1 - IB_ALPHA`` lower / upper confidence
  limits (Student's t over the per-example scores, within one run). ``lcb > 0``: ``I(T;Y) > 0`` at that
  confidence; ``ucb < 0``: outside the estimator's valid range (the probe is worse than the prior), never a decline.
* ``I_TY_lower_tau[layer]``: the mean calibration exponent (0: the probe was shrunk to the prior; 1: left as is).
* ``I_TY_head`` (``_lcb``, ``_ucb``): the model's own head, ``softmax(logits)``, on the probe set; a lower bound on
  ``I(T_l;Y)`` of every layer (data processing). Can be genuinely below 0 (an over-confident head).
* ``I_TY_head_calibrated`` (``_lcb``, ``_ucb``): the head tempered toward the prior, ``τ`` cross-fitted over
  ``IB_FOLDS`` folds of the probe set; ``>= 0`` up to sampling error.

:func:`bound_status` of ``(lcb, ucb)`` names what a value says (``informative``, ``inconclusive``,
``outside_valid_range``, ``not_finite``). A fall of a lower bound is not a fall of ``I(T;Y)`` (the probe's gap can
grow instead): a "decline" rule can hold only where the bound at the start is informative, and its end is read
against the start's interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pdelightning.analysis.ib_bound import IBBound, bound_status, crossfit_bound, head_bound
from pdelightning_reproduce.probe import forward_capture

IB_FOLDS = 5
"""Outer cross-fitting folds ``K`` of every bound here (and of the head's calibration)."""
IB_INNER_FOLDS = 4
"""Inner folds of the calibration exponent ``τ`` inside each probe's fitting folds."""
IB_ALPHA = 0.05
"""One-sided level of ``*_lcb`` and ``*_ucb`` (each a 95 % one-sided limit)."""
IB_PROBE = "lda"
"""The probe: Ledoit-Wolf shrinkage LDA (closed form; ``"logistic"`` is about 10x slower)."""
IB_INTERVAL = "examples"
"""Student's t over the per-example scores (``"folds"``: over the ``K`` fold means)."""
IB_SEED = 0
"""Seed of the fold assignments (they depend only on the probe labels and this seed)."""

ITY_LAYER_KEYS = ("I_TY_lower", "I_TY_lower_lcb", "I_TY_lower_ucb", "I_TY_lower_tau")
ITY_SCALAR_KEYS = (
    "I_TY_head",
    "I_TY_head_lcb",
    "I_TY_head_ucb",
    "I_TY_head_calibrated",
    "I_TY_head_calibrated_lcb",
    "I_TY_head_calibrated_ucb",
)
DEFINITIONS: dict[str, str] = {
    "I_TY_lower": f"I(T;Y) >= H(Y) - CE in bits on the probe set alone: a shrinkage-LDA probe cross-fitted over "
    f"{IB_FOLDS} stratified folds, each probe tempered toward its fitting folds' prior (log q_tau = tau log q + "
    f"(1 - tau) log pi, tau from a {IB_INNER_FOLDS}-fold inner cross-fit), q floored at 1e-4 "
    "(analysis.ib_bound.crossfit_bound); a lower bound up to sampling error, >= 0 up to O(C/N)",
    "I_TY_lower_lcb": f"one-sided {1 - IB_ALPHA:.0%} lower confidence limit of I_TY_lower (Student's t over "
    "the per-example scores log2 q(y|t) - log2 p(y))",
    "I_TY_lower_ucb": f"one-sided {1 - IB_ALPHA:.0%} upper confidence limit of I_TY_lower; below 0: outside "
    "the estimator's valid range (the probe is worse than the prior), not a decline of information",
    "I_TY_lower_tau": "mean calibration exponent tau of I_TY_lower's probes (0: shrunk to the prior)",
    "I_TY_head": "H(Y) - CE of the model's own head softmax(logits) on the probe set, floored at 1e-4 "
    "(analysis.ib_bound.head_bound); a lower bound on I(T_l;Y) of every layer; can be genuinely < 0",
    "I_TY_head_lcb": f"one-sided {1 - IB_ALPHA:.0%} lower confidence limit of I_TY_head",
    "I_TY_head_ucb": f"one-sided {1 - IB_ALPHA:.0%} upper confidence limit of I_TY_head",
    "I_TY_head_calibrated": f"I_TY_head with the head tempered toward the prior, tau cross-fitted over {IB_FOLDS} "
    "folds of the probe set",
    "I_TY_head_calibrated_lcb": f"one-sided {1 - IB_ALPHA:.0%} lower confidence limit of I_TY_head_calibrated",
    "I_TY_head_calibrated_ucb": f"one-sided {1 - IB_ALPHA:.0%} upper confidence limit of I_TY_head_calibrated",
}
"""The exact definition of every key, for the rules' ``Quantity`` texts."""

__all__ = [
    "DEFINITIONS",
    "IB_ALPHA",
    "IB_FOLDS",
    "IB_INNER_FOLDS",
    "IB_INTERVAL",
    "IB_PROBE",
    "IB_SEED",
    "ITY_LAYER_KEYS",
    "ITY_SCALAR_KEYS",
    "bound_status",
    "ib_values",
    "ib_values_from",
]


def _layer_bound(t: Tensor, y: Tensor, n_classes: int) -> IBBound:
    return crossfit_bound(
        t,
        y,
        folds=IB_FOLDS,
        inner_folds=IB_INNER_FOLDS,
        probe=IB_PROBE,
        alpha=IB_ALPHA,
        method=IB_INTERVAL,
        seed=IB_SEED,
        n_classes=n_classes,
    )


def ib_values_from(
    pooled: Mapping[str, Tensor],
    logits: Tensor,
    y: Tensor,
    n_classes: int,
    layers: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The bounds of one checkpoint from its pooled probe-set representations and logits (no model needed).

    Args:
        pooled: ``{layer: [N, d]}`` (e.g. :attr:`~pdelightning_reproduce.probe.Capture.pooled`).
        logits: the model's logits ``[N, C]`` on the same samples.
        y: their labels ``[N]``.
        n_classes: ``C``.
        layers: the layers to bound (default: every key of ``pooled`` but ``embedding``).

    Returns:
        ``{key: {layer: value}}`` for :data:`ITY_LAYER_KEYS` and ``{key: value}`` for :data:`ITY_SCALAR_KEYS`
        (the shape :func:`~pdelightning_reproduce.summary.rows_from` takes); nan where features are non-finite.
    """
    y = y.detach().long().cpu()
    names = [n for n in pooled if n != "embedding"] if layers is None else list(layers)
    v: dict[str, Any] = {k: {} for k in ITY_LAYER_KEYS}
    for name in names:
        b = _layer_bound(pooled[name], y, n_classes)
        v["I_TY_lower"][name], v["I_TY_lower_lcb"][name] = b.estimate, b.lower
        v["I_TY_lower_ucb"][name], v["I_TY_lower_tau"][name] = b.upper, b.tau
    kw = {"folds": IB_FOLDS, "alpha": IB_ALPHA, "method": IB_INTERVAL, "seed": IB_SEED}
    for key, calibrate in (("I_TY_head", False), ("I_TY_head_calibrated", True)):
        h = head_bound(logits, y, calibrate=calibrate, **kw)
        v[key], v[f"{key}_lcb"], v[f"{key}_ucb"] = h.estimate, h.lower, h.upper
    return v


@torch.no_grad()
def ib_values(model: nn.Module, pdata: Any, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every quantity of this module for one model on the probe set (one forward pass; see the module docstring).

    Args:
        model: one of our classifiers, in eval mode.
        pdata: a :class:`~pdelightning_reproduce.probe.ProbeData` (``x``, ``y``, ``num_classes``, ``pad_id``).
        device: where to run the forward pass.
    """
    cap = forward_capture(model, pdata.x, device, pdata.pad_id, erank=False)
    return ib_values_from(cap.pooled, cap.logits, pdata.y, int(pdata.num_classes))
