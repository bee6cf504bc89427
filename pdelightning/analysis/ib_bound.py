"""``I(T;Y)`` on test data as a valid variational lower bound, with a one-sided confidence bound (paper §3.3).

Eqs. (3) and (14) move the parameters against ``β ∇θ I(X;T)`` and eq. (16) replaces the mutual information by a
variational bound with a parameterised ``q``; §3.3 (Figure 4) and Figure 8 then read ``I(T;Y)`` of each layer over
training. This module gives that ``I(T;Y)`` a meaning that survives a finite test set: a *lower bound* with a stated
sampling error.

**The bound** (Barber & Agakov, 2003). For any conditional distribution ``q(y|t)`` (a *probe*),

    ``I(T;Y) = H(Y) - H(Y|T) >= H(Y) - E[-log q(Y|T)] = E[log q(Y|T) - log p(Y)]``,

with gap ``E_T KL(p(·|T) || q(·|T)) >= 0``, zero iff ``q`` is the true posterior. The estimate is the mean of the
per-example scores ``s_i = log2 q(y_i|t_i) - log2 p̂(y_i)`` over examples the probe never saw, ``p̂`` the plug-in
label frequencies of the scored examples (their mean is ``H(p̂) - CE``, in bits).

* :func:`crossfit_bound`: the probe (shrinkage LDA or multinomial logistic regression) is *cross-fitted*: the
  examples are dealt into ``K`` stratified folds (default ``K = 5``); each fold is scored by a probe fitted on the
  other ``K - 1``. Each probe is then *calibrated* on its own fitting folds: ``log q_τ = τ log q + (1 - τ) log π``
  (``π`` the fitting folds' label frequencies), with ``τ >= 0`` chosen to minimise the cross-entropy of an inner
  ``K_in``-fold cross-fit of the same probe (default ``K_in = 4``). At ``τ = 0`` the probe is the prior, so an
  over-fitted probe on an uninformative ``T`` is shrunk to it instead of scoring far below 0.
* :func:`head_bound`: ``q`` is the model's own classifier head (its logits on test data). The head was fitted on
  training data only, so no cross-fitting is needed; ``calibrate=True`` cross-fits the same ``τ`` on the test folds.
  By data processing the head bound is a lower bound on ``I(T_l;Y)`` of *every* layer ``l`` the logits are a
  function of (token-level ``T_l``, not the pooled one a probe reads).

**Valid range and bias.** The estimand ``E[s]`` is ``I(T;Y) - gap`` minus the bias of the plug-in ``H(p̂)``
(``-(C-1) / (2 N ln 2)`` bits to first order, ``C`` classes, ``N`` examples: downward, i.e. conservative). It is a
lower bound up to the sampling error, never an unbiased estimate of ``I(T;Y)``; a larger value from a better probe is
closer to the truth. Each probe's ``q`` is mixed with the uniform distribution (``floor``, :data:`Q_FLOOR`) so one
example costs at most ``log2((1 + C floor) / floor)`` bits and the scores have finite variance. With calibration the
estimand is ``>= 0`` up to ``O(C / N)`` (the prior of ``N (K-1)/K`` labels) and the choice of ``τ``; a raw head
bound's estimand can be genuinely negative (a head worse than the prior). So an estimate below 0 is sampling error
while its interval covers 0 (status ``"inconclusive"``), and a value whose *upper* confidence limit is below 0 is
reported as ``"outside_valid_range"``: it says the probe is worse than the prior, **never** that information
declined. Likewise a fall of a lower bound is not a fall of ``I(T;Y)``: the gap can grow instead.

**Intervals** (:func:`bound_from_scores`), one-sided at level ``1 - alpha`` each (``lower`` and ``upper`` together
form a two-sided ``1 - 2 alpha`` interval): ``method="examples"`` is Student's t over the ``N`` per-example scores
(the cross-validation interval of Bayle et al., 2020; it holds each fold's fitted probe fixed, valid when the fits
are stable), ``method="folds"`` Student's t over the ``K`` fold means (``K - 1`` degrees of freedom: wider, and it
includes the fold-to-fold variation of the fitted probes). ``lower > 0`` means ``I(T;Y) > 0`` at confidence
``1 - alpha`` (status ``"informative"``).

**Measured** (``crossfit_bound`` defaults, 5 draws each). On the Gaussian classes of
:mod:`~pdelightning.analysis.mi_benchmark` (true 2.49 bits at ``d = 8``, 2.80 at ``d = 64``) the estimate's error is
-0.12 / +0.01 / -0.00 bits at ``N`` = 256 / 512 / 1024 (``d = 8``) and -0.43 / -0.23 / -0.10 (``d = 64``), against
-0.13 / +0.02 / -0.00 and -0.51 / -0.25 / -0.10 for the uncalibrated
:func:`~pdelightning.analysis.linear_probe.crossfit_probe_information`: the same where the probe does not over-fit.
Where it does, the calibration is what keeps the bound valid: on pure noise at the reproduction's size (``N = 1000``,
``d = 128``, ``C = 20``) the estimate is 0.000 [-0.003, +0.002] (``τ = 0.01``) against -1.87 uncalibrated, and on
weakly separated classes there 0.81 [0.75, 0.88] (``τ = 0.38``) against 0.13. The tests check the bound against
exact ``I(T;Y)`` (a discrete channel by hand, a Gaussian mixture by numerical integration) and the coverage of
``lower`` over seeds.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize, stats
from torch import Tensor

from pdelightning._checks import check_choice
from pdelightning.analysis.linear_probe import fit_lda, stratified_folds

PROBES = ("lda", "logistic")
INTERVALS = ("examples", "folds")
STATUSES = ("informative", "inconclusive", "outside_valid_range", "not_finite")
Q_FLOOR = 1e-4
"""Each class keeps at least ``Q_FLOOR / (1 + C Q_FLOOR)`` probability under every probe (a uniform mixture)."""
TAU_MAX = 10.0
"""The largest calibration exponent ``τ`` searched (``τ > 1`` sharpens an under-confident probe)."""
_LOG2 = math.log(2.0)


class IBBound(NamedTuple):
    """An ``I(T;Y)`` lower-bound estimate in bits with its one-sided confidence limits.

    Attributes:
        estimate: mean per-example score ``H(p̂) - CE``.
        lower: one-sided ``1 - alpha`` lower confidence limit (``I(T;Y) >= lower`` at that confidence).
        upper: one-sided ``1 - alpha`` upper confidence limit of the *bound* (not of ``I(T;Y)``).
        h_y: plug-in label entropy ``H(p̂)`` of the scored examples.
        cross_entropy: ``-mean log2 q(y|t)`` of the scored examples.
        n: number of scored examples.
        folds: cross-fitting folds ``K`` (0 where no probe was fitted).
        alpha: the one-sided level.
        method: ``"examples"`` or ``"folds"``.
        tau: mean calibration exponent over the folds (``1.0`` uncalibrated).
    """

    estimate: float
    lower: float
    upper: float
    h_y: float
    cross_entropy: float
    n: int
    folds: int
    alpha: float
    method: str
    tau: float = 1.0

    @property
    def status(self) -> str:
        """:func:`bound_status` of the confidence limits."""
        return bound_status(self.lower, self.upper)


def bound_status(lower: float, upper: float) -> str:
    """What a lower bound with one-sided confidence limits ``lower``, ``upper`` says about ``I(T;Y)``.

    ``"informative"``: ``lower > 0``, ``I(T;Y) > 0`` at the stated confidence. ``"inconclusive"``: the interval
    covers 0 (a lower bound can never show ``I(T;Y) = 0``). ``"outside_valid_range"``: ``upper < 0``, the probe is
    worse than the label prior, which says nothing about ``I(T;Y)``. ``"not_finite"``: a limit is nan.

    Example::

        >>> bound_status(0.2, 0.5), bound_status(-0.1, 0.1), bound_status(-0.9, -0.4)
        ('informative', 'inconclusive', 'outside_valid_range')
    """
    if not (math.isfinite(lower) and math.isfinite(upper)):
        return "not_finite"
    if lower > 0:
        return "informative"
    return "outside_valid_range" if upper < 0 else "inconclusive"


def label_log2_marginal(y: Tensor, n_classes: int | None = None) -> Tensor:
    """``log2 p̂(y_i)`` of every example under the plug-in frequencies of ``y``; ``-mean`` of it is ``H(p̂)``.

    Example::

        >>> -float(label_log2_marginal(torch.tensor([0, 0, 1, 2])).mean())  # H = 1/2 + 2 * 1/4 * 2 = 1.5 bits
        1.5
    """
    y = y.detach().long().cpu()
    counts = torch.bincount(y, minlength=n_classes or 0).double()
    return (counts / counts.sum()).log2()[y]


def bound_from_scores(
    scores: Tensor, h_y: float, alpha: float = 0.05, method: str = "examples", groups: Tensor | None = None
) -> IBBound:
    """The estimate and one-sided ``1 - alpha`` confidence limits from per-example scores ``s_i`` in bits.

    Args:
        scores: ``[N]`` ``log2 q(y_i|t_i) - log2 p̂(y_i)``.
        h_y: ``H(p̂)`` in bits (reported; ``CE = h_y - mean(scores)``).
        alpha: one-sided level in ``(0, 0.5)``.
        method: ``"examples"`` (t over the ``N`` scores) or ``"folds"`` (t over the group means).
        groups: ``[N]`` fold index of each score (needed by ``"folds"``; its count is reported as ``folds``).

    Raises:
        ValueError: for another ``method``, ``alpha`` outside ``(0, 0.5)``, fewer than 2 scores or groups.

    Example::

        >>> b = bound_from_scores(torch.tensor([0.5, 1.5, 1.0, 1.0]), h_y=1.0)  # mean 1, sd sqrt(1/6)
        >>> round(b.estimate, 3), round(b.lower, 3), b.status  # 1 - t(0.95, 3) * 0.2041
        (1.0, 0.52, 'informative')
    """
    check_choice("method", method, INTERVALS)
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha={alpha} must be in (0, 0.5) (a one-sided level, e.g. 0.05)")
    s = scores.detach().double().cpu()
    if len(s) < 2:
        raise ValueError(f"a confidence bound needs at least 2 scored examples, got {len(s)}")
    estimate = float(s.mean())
    k = 0 if groups is None else int(torch.unique(groups).numel())
    if method == "folds":
        if groups is None or k < 2:
            raise ValueError(f"method='folds' needs groups with at least 2 folds, got {k}")
        g = torch.unique(groups.cpu(), return_inverse=True)[1]
        means = torch.zeros(k, dtype=torch.float64).index_add_(0, g, s) / torch.bincount(g, minlength=k).double()
        se, dof = float(means.std()) / math.sqrt(k), k - 1
    else:
        se, dof = float(s.std()) / math.sqrt(len(s)), len(s) - 1
    half = float(stats.t.ppf(1.0 - alpha, dof)) * se if math.isfinite(se) else math.nan
    return IBBound(estimate, estimate - half, estimate + half, h_y, h_y - estimate, len(s), k, alpha, method)


def _floored(log_q: Tensor, floor: float) -> Tensor:
    """``log((q + floor) / (1 + C floor))``: a distribution with every class at least ``floor / (1 + C floor)``."""
    if floor <= 0:
        return log_q
    return torch.logaddexp(log_q, torch.full_like(log_q, math.log(floor))) - math.log1p(log_q.shape[1] * floor)


def _log_prior(y: Tensor, n_classes: int) -> Tensor:
    counts = torch.bincount(y, minlength=n_classes).double()
    return (counts / counts.sum()).log()  # -inf for a class absent from y


def _tempered(log_q: Tensor, log_prior: Tensor, tau: float) -> Tensor:
    """``log_softmax(τ log q + (1 - τ) log π)``: the prior at ``τ = 0``, ``q`` at ``τ = 1``; absent classes stay 0."""
    absent = ~torch.isfinite(log_prior)
    mixed = tau * log_q.clamp_min(-1e4) + (1.0 - tau) * log_prior.masked_fill(absent, 0.0)
    return torch.log_softmax(mixed.masked_fill(absent, -math.inf), dim=-1)


def _mean_ce(log_q: Tensor, y: Tensor, floor: float) -> float:
    return float(-_floored(log_q, floor).gather(1, y[:, None]).mean())


def fit_temperature(log_q: Tensor, y: Tensor, log_prior: Tensor, floor: float = Q_FLOOR) -> float:
    """The ``τ`` in ``[0, TAU_MAX]`` minimising the cross-entropy of ``_tempered(log_q, log_prior, τ)`` on ``y``.

    Any ``τ`` keeps the bound valid (``q_τ`` is a distribution chosen without the scored examples); the fit only
    makes it tighter. Bounded Brent search; ``τ = 0`` (the prior) is returned when nothing beats it.

    Example::

        >>> log_q = torch.log(torch.tensor([[0.99, 0.01], [0.01, 0.99]] * 10, dtype=torch.float64))
        >>> y = torch.tensor([0, 1] * 5 + [1, 0] * 5)  # the probe is right half the time: worthless
        >>> fit_temperature(log_q, y, torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))) < 0.01
        True
    """
    y = y.long()

    def loss(tau: float) -> float:
        return _mean_ce(_tempered(log_q, log_prior, tau), y, floor)

    res = optimize.minimize_scalar(loss, bounds=(0.0, TAU_MAX), method="bounded", options={"xatol": 1e-4})
    tau = float(res.x)
    return 0.0 if loss(0.0) <= loss(tau) else tau


def _standardize(t_fit: Tensor, t_eval: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = t_fit.mean(0), t_fit.std(0, unbiased=False).clamp_min(1e-8)
    return (t_fit - mean) / std, (t_eval - mean) / std


def probe_log_proba(
    t_fit: Tensor, y_fit: Tensor, t_eval: Tensor, n_classes: int, probe: str = "lda", l2: float = 1e-3
) -> Tensor:
    """Natural-log ``q(y|t)`` ``[N_eval, C]`` of a probe fitted on ``(t_fit, y_fit)``; ``-inf`` for unseen classes.

    ``"lda"``: :func:`~pdelightning.analysis.linear_probe.fit_lda` (Ledoit-Wolf shrinkage, closed form; the Bayes
    posterior for Gaussian classes with a shared covariance). ``"logistic"``: multinomial logistic regression
    (scikit-learn, L-BFGS, ``mean CE + l2 ||W||²`` on standardized features; contains every posterior that is a
    softmax of an affine function, e.g. any table over one-hot ``T``). One class seen: the prior.
    """
    check_choice("probe", probe, PROBES)
    seen = torch.unique(y_fit)
    if len(seen) < 2:
        return _log_prior(y_fit, n_classes).expand(len(t_eval), n_classes).clone()
    if probe == "lda":
        return fit_lda(t_fit, y_fit, n_classes).log_proba(t_eval, floor=0.0)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    z_fit, z_eval = _standardize(t_fit, t_eval)
    clf = LogisticRegression(C=1.0 / (2.0 * l2 * len(y_fit)), max_iter=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable data: the optimum is far, the fit is fine
        clf.fit(z_fit.numpy(), y_fit.numpy())
    out = torch.full((len(t_eval), n_classes), -math.inf, dtype=torch.float64)
    out[:, torch.from_numpy(clf.classes_).long()] = torch.from_numpy(clf.predict_log_proba(z_eval.numpy())).double()
    return out


def _calibrated_log_q(
    t: Tensor, y: Tensor, t_eval: Tensor, n_classes: int, probe: str, l2: float, inner: int, seed: int, floor: float
) -> tuple[Tensor, float]:
    """A probe fitted on ``(t, y)`` scored on ``t_eval``, tempered toward the prior by an inner cross-fit of ``τ``."""
    log_prior = _log_prior(y, n_classes)
    raw = probe_log_proba(t, y, t_eval, n_classes, probe, l2)
    if inner < 2:
        return raw, 1.0
    fold = stratified_folds(y, min(inner, len(y)), seed)
    oof = torch.empty(len(y), n_classes, dtype=torch.float64)
    for g in range(int(fold.max()) + 1):
        held = fold == g
        oof[held] = probe_log_proba(t[~held], y[~held], t[held], n_classes, probe, l2)
    tau = fit_temperature(oof, y, log_prior, floor)
    return _tempered(raw, log_prior, tau), tau


def crossfit_bound(
    t: Tensor,
    y: Tensor,
    *,
    folds: int = 5,
    inner_folds: int = 4,
    probe: str = "lda",
    calibrate: bool = True,
    alpha: float = 0.05,
    method: str = "examples",
    seed: int = 0,
    n_classes: int | None = None,
    floor: float = Q_FLOOR,
    l2: float = 1e-3,
) -> IBBound:
    """Cross-fitted ``I(T;Y) >= H(Y) - CE`` in bits on test data, with one-sided confidence limits.

    Every example is scored once by a probe fitted on the other ``folds - 1`` stratified folds
    (:func:`~pdelightning.analysis.linear_probe.stratified_folds`); with ``calibrate`` each probe is tempered toward
    its fitting folds' prior by ``τ`` chosen on an ``inner_folds`` cross-fit inside those folds (see the module
    docstring for the valid range, the bias and the statuses). Cost: ``folds x (inner_folds + 1)`` probe fits.

    Args:
        t: representations ``[N, d]``.
        y: integer labels ``[N]``.
        folds: outer folds ``K >= 2``.
        inner_folds: inner folds ``K_in >= 2`` for the calibration.
        probe: ``"lda"`` or ``"logistic"`` (:func:`probe_log_proba`).
        calibrate: temper each probe toward the prior (``False``: ``τ = 1``, the raw cross-fitted probe).
        alpha: one-sided level of the confidence limits.
        method: ``"examples"`` or ``"folds"`` (:func:`bound_from_scores`).
        seed: seed of the fold assignments.
        n_classes: number of classes ``C`` (default ``max(y) + 1``).
        floor: uniform-mixture floor of every probe (:data:`Q_FLOOR`).
        l2: L2 penalty of the logistic probe.

    Returns:
        An :class:`IBBound`; all fields nan when ``t`` has non-finite values.

    Raises:
        ValueError: on mismatched shapes, ``folds < 2``, fewer than ``2 folds`` examples, or a bad choice.

    Example::

        >>> y = torch.arange(60) % 3
        >>> b = crossfit_bound(torch.eye(3, dtype=torch.float64)[y] * 4 + 0.01 * torch.randn(60, 3), y)
        >>> round(b.h_y, 4), b.estimate > 1.5, b.status
        (1.585, True, 'informative')
    """
    check_choice("probe", probe, PROBES)
    check_choice("method", method, INTERVALS)
    y = y.detach().long().cpu()
    if t.dim() != 2 or y.shape != (t.shape[0],):
        raise ValueError(f"expected t [N, d] and y [N], got {tuple(t.shape)} and {tuple(y.shape)}")
    if folds < 2 or len(y) < 2 * folds:
        raise ValueError(f"folds={folds} needs folds >= 2 and at least 2 * folds examples, got N={len(y)}")
    if calibrate and inner_folds < 2:
        raise ValueError(f"inner_folds={inner_folds} must be >= 2 (or calibrate=False)")
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    t = t.detach().double().cpu()
    marginal = label_log2_marginal(y, n_classes)
    h_y = float(-marginal.mean())
    if not torch.isfinite(t).all():
        nan = math.nan
        return IBBound(nan, nan, nan, h_y, nan, len(y), folds, alpha, method, nan)
    fold = stratified_folds(y, folds, seed)
    log_q = torch.empty(len(y), n_classes, dtype=torch.float64)
    taus = []
    for f in range(folds):
        held = fold == f
        inner = inner_folds if calibrate else 0
        log_q[held], tau = _calibrated_log_q(t[~held], y[~held], t[held], n_classes, probe, l2, inner, seed + 1, floor)
        taus.append(tau)
    scores = _floored(log_q, floor).gather(1, y[:, None]).squeeze(1) / _LOG2 - marginal
    return bound_from_scores(scores, h_y, alpha, method, fold)._replace(tau=float(np.mean(taus)))


def head_bound(
    logits: Tensor,
    y: Tensor,
    *,
    calibrate: bool = False,
    folds: int = 5,
    alpha: float = 0.05,
    method: str = "examples",
    seed: int = 0,
    floor: float = Q_FLOOR,
) -> IBBound:
    """The model's own head bound ``H(Y) - CE(head)`` in bits on test data, with one-sided confidence limits.

    ``q(y|t) = softmax(logits)`` mixed with the uniform ``floor``. The head was fitted on training data, so on test
    data the scores are independent given the model and the bound is valid as it stands (``calibrate=False``: the
    model's own ``q``); it is a lower bound on ``I(T_l;Y)`` of every layer the logits are computed from (data
    processing). It can be genuinely below 0 (a head worse than the prior, e.g. over-confident and wrong): then
    :func:`bound_status` says ``"outside_valid_range"``. ``calibrate=True`` cross-fits ``τ`` of
    ``τ log q + (1 - τ) log π`` over ``folds`` stratified folds of the test data (``τ`` and ``π`` from the other
    folds), which keeps the estimand ``>= 0`` up to ``O(C / N)``.

    Args:
        logits: the model's logits ``[N, C]`` on test data.
        y: labels ``[N]``.
        calibrate: temper the head toward the prior, cross-fitted.
        folds: folds of the calibration and of ``method="folds"``.
        alpha: one-sided level.
        method: ``"examples"`` or ``"folds"``.
        seed: seed of the folds.
        floor: uniform-mixture floor (:data:`Q_FLOOR`).

    Example::

        >>> y = torch.tensor([0, 1, 2, 3] * 5)
        >>> b = head_bound(20.0 * torch.eye(4)[y], y)  # a perfect head: the bound is H(Y) = 2 bits, less the floor
        >>> round(b.estimate, 3), b.status
        (2.0, 'informative')
    """
    check_choice("method", method, INTERVALS)
    y = y.detach().long().cpu()
    logits = logits.detach().double().cpu()
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [N, C] and y [N], got {tuple(logits.shape)} and {tuple(y.shape)}")
    n_classes = logits.shape[1]
    marginal = label_log2_marginal(y, n_classes)
    h_y = float(-marginal.mean())
    if not torch.isfinite(logits).all():
        nan = math.nan
        return IBBound(nan, nan, nan, h_y, nan, len(y), 0, alpha, method, nan)
    raw = torch.log_softmax(logits, dim=-1)
    fold = stratified_folds(y, min(folds, len(y)), seed)
    log_q, tau = raw, 1.0
    if calibrate:
        log_q, taus = torch.empty_like(raw), []
        for f in range(int(fold.max()) + 1):
            held = fold == f
            prior = _log_prior(y[~held], n_classes)
            taus.append(fit_temperature(raw[~held], y[~held], prior, floor))
            log_q[held] = _tempered(raw[held], prior, taus[-1])
        tau = float(np.mean(taus))
    scores = _floored(log_q, floor).gather(1, y[:, None]).squeeze(1) / _LOG2 - marginal
    b = bound_from_scores(scores, h_y, alpha, method, fold)
    return b._replace(folds=b.folds if calibrate or method == "folds" else 0, tau=tau)
