"""The measured bias of the ``I(T;Y)`` estimators, and lookups to flag estimates whose bias is known to be large.

The numbers come from :mod:`~pdelightning.analysis.mi_benchmark` (class-conditional Gaussians with a known
``I(T;Y)``); they are re-exported by :mod:`~pdelightning.analysis.information`.
"""

from __future__ import annotations

import math

ESTIMATOR_BIAS: dict[str, dict[tuple[int, int], float]] = {
    "probe": {
        (256, 8): -0.156,
        (512, 8): -0.036,
        (1024, 8): -0.014,
        (256, 64): -0.542,
        (512, 64): -0.250,
        (1024, 64): -0.124,
    },
    "probe_logistic": {
        (256, 8): -0.351,
        (512, 8): -0.113,
        (1024, 8): -0.062,
        (256, 64): -0.878,
        (512, 64): -0.627,
        (1024, 64): -0.508,
    },
    "binning": {
        (256, 8): -0.620,
        (512, 8): -0.827,
        (1024, 8): -0.983,
        (256, 64): -1.068,
        (512, 64): -1.338,
        (1024, 64): -1.521,
    },
    "binning_quantile": {
        (256, 8): -0.138,
        (512, 8): -0.499,
        (1024, 8): -0.759,
        (256, 64): -0.577,
        (512, 64): -0.947,
        (1024, 64): -1.284,
    },
    "kde": {
        (256, 8): +0.811,
        (512, 8): +0.823,
        (1024, 8): +0.829,
        (256, 64): +0.499,
        (512, 64): +0.511,
        (1024, 64): +0.517,
    },
    "kde_relative": {
        (256, 8): -0.062,
        (512, 8): -0.172,
        (1024, 8): -0.286,
        (256, 64): +0.339,
        (512, 64): +0.215,
        (1024, 64): +0.010,
    },
}
"""Measured mean error (bits) of each ``I(T;Y)`` estimator: ``ESTIMATOR_BIAS[name][(N, d)]``.

From ``python -m pdelightning.analysis.mi_benchmark`` (10 probe sets each, standard errors 0.001 to 0.05 bits):
``C = 10`` equiprobable classes, ``T | Y=c ~ N(μ_c, I_d)``, true ``I(T;Y)`` = 2.486 bits at ``d = 8`` and 2.799
bits at ``d = 64`` (Monte Carlo, 400k samples, ± 0.002). The estimators at their defaults
(``mi_benchmark.ESTIMATORS``): ``"probe"``, cross-fitted shrinkage LDA (5 folds); ``"probe_logistic"``, logistic
regression fitted on one half and scored on the other; ``"binning"`` / ``"binning_quantile"``, 2 principal
components, 10 equal-width / quantile bins; ``"kde"``, ``noise_variance=0.1`` absolute (saturated at ``H(Y)``: its
bias is ``H(Y) - I``); ``"kde_relative"``, ``0.12 tr Cov(T)``. Negative: an underestimate. One mixture family:
read the magnitudes as an indication for other data, not a guarantee.
"""
LARGE_BIAS_BITS = 0.25
"""|bias| above which :func:`bias_is_large` flags an estimate (about 10 % of the test bed's ``I(T;Y)``)."""


def known_bias(estimator: str, n: int, d: int) -> float:
    """The measured bias (bits) of ``estimator`` at the tabulated ``(N, d)`` nearest to ``(n, d)`` (log scale).

    From :data:`ESTIMATOR_BIAS`; outside the table the nearest corner is used (e.g. ``N = 2048`` reads ``N = 1024``,
    which understates the drift of equal-width binning).

    Raises:
        ValueError: for an estimator not in the table.

    Example::

        >>> known_bias("probe", 256, 64) == ESTIMATOR_BIAS["probe"][(256, 64)]
        True
        >>> known_bias("probe", 300, 50) == known_bias("probe", 256, 64)
        True
    """
    if estimator not in ESTIMATOR_BIAS:
        raise ValueError(f"estimator={estimator!r} is not one of {sorted(ESTIMATOR_BIAS)}")
    table = ESTIMATOR_BIAS[estimator]
    key = min(table, key=lambda k: (math.log(k[0] / max(n, 1))) ** 2 + (math.log(k[1] / max(d, 1))) ** 2)
    return table[key]


def bias_is_large(estimator: str, n: int, d: int, tol: float = LARGE_BIAS_BITS) -> bool:
    """Whether :func:`known_bias` of ``estimator`` at ``(n, d)`` exceeds ``tol`` bits in magnitude.

    Example::

        >>> bias_is_large("probe_logistic", 256, 64), bias_is_large("probe", 1024, 8)
        (True, False)
    """
    return abs(known_bias(estimator, n, d)) > tol
