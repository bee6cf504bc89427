"""Class-conditional Gaussians with a known ``I(T;Y)``: the test bed behind the estimators' bias tables.

``Y`` is uniform over ``C`` classes and ``T | Y=c ~ N(μ_c, I_d)``, with the class means drawn once (seeded) as
``μ_c ~ N(0, s²/d I_d)`` so that two means lie ``≈ s √2`` apart whatever the width ``d``. For such a mixture

    ``I(T;Y) = log2 C + E[log2 p(Y|T)]``,  ``p(c|t) = softmax_c(-||t - μ_c||² / 2)``,

which :func:`true_label_information` evaluates by Monte Carlo on a large sample (standard error reported).
:func:`estimator_bias` draws ``repeats`` probe sets of ``N`` samples and returns each estimator's mean error
against that value; ``python -m pdelightning.analysis.mi_benchmark`` prints the table recorded in
:data:`~pdelightning.analysis.estimator_bias.ESTIMATOR_BIAS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from pdelightning.analysis.information import (
    KDE_RELATIVE_NOISE,
    binning_mutual_information,
    kde_mutual_information,
    probe_mutual_information,
    split_halves,
)
from pdelightning.analysis.linear_probe import crossfit_probe_information

SEPARATION = 3.0
"""Default ``s``: ``I(T;Y) =`` 2.49 bits (of ``log2 10 = 3.32``) at ``d = 8`` and 2.80 at ``d = 64``."""


class GaussianClasses(NamedTuple):
    """A mixture of ``C`` unit-covariance Gaussians with equal weights: its class means ``[C, d]``."""

    means: Tensor

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` draws ``(t [n, d], y [n])`` (float64, labels uniform over the classes), seeded."""
        g = torch.Generator().manual_seed(seed)
        c, d = self.means.shape
        y = torch.randint(c, (n,), generator=g)
        return self.means[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y

    def log2_posterior(self, t: Tensor) -> Tensor:
        """``log2 p(c|t)`` ``[n, C]`` under the mixture (equal priors, unit covariance)."""
        logits = -0.5 * torch.cdist(t, self.means).square()
        return torch.log_softmax(logits, dim=-1) / math.log(2.0)


def gaussian_classes(d: int, n_classes: int = 10, separation: float = SEPARATION, seed: int = 0) -> GaussianClasses:
    """Class means ``μ_c ~ N(0, s²/d I_d)``, seeded: :class:`GaussianClasses`."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return GaussianClasses(torch.randn(n_classes, d, generator=g, dtype=torch.float64) * separation / math.sqrt(d))


def true_label_information(mix: GaussianClasses, n_mc: int = 400_000, seed: int = 12345) -> tuple[float, float]:
    """Monte-Carlo ``I(T;Y) = log2 C + E[log2 p(Y|T)]`` in bits, and its standard error.

    Example::

        >>> mix = GaussianClasses(torch.tensor([[-50.0], [50.0]], dtype=torch.float64))  # far apart: I = H(Y)
        >>> round(true_label_information(mix, n_mc=1000)[0], 6)
        1.0
    """
    total, total_sq, done, chunk = 0.0, 0.0, 0, 50_000
    while done < n_mc:
        t, y = mix.sample(min(chunk, n_mc - done), seed + done)
        v = mix.log2_posterior(t).gather(1, y[:, None]).squeeze(1)
        total, total_sq, done = total + float(v.sum()), total_sq + float(v.square().sum()), done + len(y)
    mean = total / done
    se = math.sqrt(max(total_sq / done - mean**2, 0.0) / done)
    return math.log2(mix.means.shape[0]) + mean, se


def _probe_logistic(t: Tensor, y: Tensor) -> float:
    return probe_mutual_information(t, y, split_halves(y))[0]


ESTIMATORS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "probe": lambda t, y: crossfit_probe_information(t, y)[0],
    "probe_logistic": _probe_logistic,
    "binning": lambda t, y: binning_mutual_information(t, y)[1],
    "binning_quantile": lambda t, y: binning_mutual_information(t, y, bins="quantile")[1],
    "kde": lambda t, y: kde_mutual_information(t, y, 0.1)[1],
    "kde_relative": lambda t, y: kde_mutual_information(t, y, KDE_RELATIVE_NOISE, relative=True)[1],
}
"""The ``I(T;Y)`` estimators as used by default: name -> ``f(t, y) -> bits``."""


def estimator_bias(
    name: str, n: int, d: int, repeats: int = 5, mix: GaussianClasses | None = None, truth: float | None = None
) -> tuple[float, float, float]:
    """``(mean error, its standard error, truth)`` in bits of estimator ``name`` on ``repeats`` probe sets of ``n``.

    Raises:
        ValueError: for an unknown estimator name.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r} is not one of {sorted(ESTIMATORS)}")
    mix = gaussian_classes(d) if mix is None else mix
    truth = true_label_information(mix)[0] if truth is None else truth
    errors = torch.tensor([ESTIMATORS[name](*mix.sample(n, seed=r)) - truth for r in range(repeats)])
    se = float(errors.std() / math.sqrt(repeats)) if repeats > 1 else float("nan")
    return float(errors.mean()), se, truth


def main(sizes: tuple[int, ...] = (256, 512, 1024), widths: tuple[int, ...] = (8, 64), repeats: int = 10) -> None:
    """Print the bias table: one row per estimator, ``N`` and ``d``."""
    for d in widths:
        mix = gaussian_classes(d)
        truth, se = true_label_information(mix)
        print(f"d={d}: I(T;Y) = {truth:.4f} ± {se:.4f} bits (Monte Carlo, 400k samples)", flush=True)
        for name in ESTIMATORS:
            for n in sizes:
                bias, bse, _ = estimator_bias(name, n, d, repeats, mix, truth)
                print(
                    f"  {name:18s} N={n:5d} d={d:3d} bias {bias:+.3f} ± {bse:.3f} bits ({bias / truth:+.0%})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
