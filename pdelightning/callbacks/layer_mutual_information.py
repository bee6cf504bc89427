"""Per-layer mutual information I(X;T_l) and I(T_l;Y) over training: the information plane (paper section 3.3).

The paper tracks "the mutual information between each layer's output and the input labels over the course
of training" (section 3.3.3, Figure 4) to test the information-bottleneck picture of eq. (3), in which
training trades the task loss against the compression term ``I(X; T_theta(X))``. For a deterministic
network and continuous activations both quantities are ill-posed (``I(X;T)`` is infinite, or ``log2 N``
for any plug-in estimate on ``N`` distinct samples), so every number here comes from an *estimator* whose
meaning is spelled out below, and estimates stuck at that ceiling are flagged instead of being read as
compression.

The math lives in plain functions (:mod:`pdelightning.analysis.information`, and
:mod:`pdelightning.analysis.information_layers` for all layers at once); :class:`LayerMutualInformation` is the
Lightning adapter.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.analysis.estimator_bias import LARGE_BIAS_BITS, known_bias
from pdelightning.analysis.information import (
    BINNINGS,
    KDE_RELATIVE_NOISE,
    binning_mutual_information,
    distinct_entropy_bits,
    entropy_bits,
    is_saturated,
    subsample,
)
from pdelightning.analysis.information_layers import (
    crossfit_probe_information_layers,
    kde_information_layers,
    kde_mutual_information_layers,
)
from pdelightning.analysis.representation import pool_tokens, sample_labels
from pdelightning.callbacks._input_hash import input_hash
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.plots import information_plane_figure
from pdelightning.probing.capture import Request
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.store import GatherStore

Estimator = Literal["probe", "kde", "binning"]
Pooling = Literal["mean", "flatten"]
ESTIMATORS = ("probe", "kde", "binning")
POOLINGS = ("mean", "flatten")


# ---- the callback -------------------------------------------------------------------------------------
class LayerMutualInformation(ProbeCallback):
    """Track ``I(X;T_l)`` and ``I(T_l;Y)`` of every layer over training and draw the information plane.

    Paper experiment 3 (section 3.3, Figure 4): the mutual information between each layer's output and the labels over
    training, read against the information-bottleneck objective of eq. (3). On each probe the layer outputs of the fixed
    probe set are pooled into ``T_l`` (:func:`~pdelightning.analysis.representation.pool_tokens`: masked mean over
    tokens, padding as the model itself masks it; or ``pooling="flatten"``), gathered across ranks with a
    :class:`~pdelightning.probing.store.GatherStore` (so a DDP run gives the one-process numbers), and passed to the
    chosen estimator. All values are in bits.

    Estimators (see each function for what it really measures; the measured bias of each on class-conditional
    Gaussians with a known answer is tabulated in :mod:`pdelightning.analysis.estimator_bias`):

    * ``"probe"`` (default): ``I(T;Y)`` is the variational lower bound ``H(Y) - CE`` of a closed-form shrinkage-LDA
      probe, cross-fitted over ``probe_folds`` stratified folds so every probe sample is scored once by a probe that
      never saw it (:func:`~pdelightning.analysis.linear_probe.crossfit_probe_information`). It is not clipped at 0, so
      a decline over training is measurable. Measured bias: -0.16 bits at N = 256, d = 8; -0.54 bits at N = 256, d = 64
      (-0.12 at N = 1024): it reads low for wide layers at the default N (flagged: ``known_bias``, ``bias_large`` and
      one warning). The probe gives no bound on ``I(X;T)``: the x-axis of the information plane is the Gaussian-KDE
      *upper* bound of :func:`~pdelightning.analysis.information.kde_mutual_information`.
    * ``"kde"``: both from the Gaussian-KDE pairwise-distance bound
      (:func:`~pdelightning.analysis.information.kde_mutual_information`) with the noise variance ``noise_variance``
      read, by default (``relative_noise=True``), as a fraction of the layer's total variance ``tr Cov(T)``, so
      unit-scale and wide activations do not saturate it. ``O(N^2)``: at most ``kde_max_samples`` probe samples (a
      seeded subset) enter it.
    * ``"binning"``: plug-in entropies after ``n_bins`` bins (quantile bins by default, ``bins="equal_width"`` for the
      classic ones, which stretch with the range and lose more with N) on the top ``n_components`` principal components
      (:func:`~pdelightning.analysis.information.binning_mutual_information`); ``I(X;T) = H(T_binned)``.

    Saturation: any plug-in ``I(X;T)`` is at most the entropy of the distinct probe inputs
    (:func:`~pdelightning.analysis.information.distinct_entropy_bits`; ``log2 N`` only when all inputs differ).
    Estimates within ``saturation_tol`` bits of that ceiling are flagged
    (:func:`~pdelightning.analysis.information.is_saturated`), drawn hollow in the figure, and a warning is issued once:
    there the estimate no longer depends on the layer.

    The trajectory ``(step, I(X;T), I(T;Y), saturated)`` per layer is kept for the figure and saved in
    checkpoints (``state_dict``), so a resumed run continues its curves.

    Args:
        estimator: ``"probe"``, ``"kde"`` or ``"binning"`` (above).
        noise_variance: KDE noise variance ``sigma^2`` (``"kde"``, and ``I(X;T)`` of ``"probe"``); a fraction of
            ``tr Cov(T)`` with ``relative_noise`` (default 0.12), else in the units of ``T`` squared.
        relative_noise: read ``noise_variance`` relative to the layer's total variance.
        kde_max_samples: at most this many samples enter the ``O(N^2)`` KDE (``None``: all).
        n_bins: bins per component for ``"binning"``.
        n_components: principal components binned (``None``: every unit, which saturates).
        bins: ``"quantile"`` or ``"equal_width"`` bins for ``"binning"``.
        probe_folds: folds of the cross-fitted probe (``"probe"``).
        pooling: ``"mean"`` (masked mean over tokens) or ``"flatten"`` (all tokens; fixed length only).
        saturation_tol: bits below the ceiling within which an ``I(X;T)`` estimate counts as saturated.
        **kwargs: the :class:`~pdelightning.callbacks.ProbeCallback` arguments (cadence or budget, probe set,
            globs, ``seed``, which also draws the KDE subset and the probe's folds).

    Raises:
        ValueError: for an unknown ``estimator`` or ``pooling``, or non-positive sizes / variances.
        TargetNotFoundError: at ``setup`` when the model has no layers to analyse (e.g. a plain MLP) and no
            ``layers`` glob is given.
        RuntimeError: when the probe batches carry no labels.
        ValueError: in a probe, when the labels are not one class per sample (e.g. token-level ``[B, T]``).

    Example::

        trainer = L.Trainer(callbacks=[LayerMutualInformation(estimator="probe", every_n_epochs=1)])
        # a stock nn.TransformerEncoder: LayerMutualInformation(layers="encoder.layers.*")

    **Logged metrics** (``<layer>`` is the layer name, e.g. ``blocks.0``):

    * ``analysis/layer_mutual_information/I_XT/<layer>``: ``I(X;T_l)`` estimate [bits].
    * ``analysis/layer_mutual_information/I_TY/<layer>``: ``I(T_l;Y)`` estimate [bits].
    * secondary, under ``analysis/layer_mutual_information/detail/``: ``saturated/<layer>`` (``1`` if the estimate
      is at the ceiling, else ``0``); ``H_Y`` (label entropy, the ceiling of ``I(T;Y)`` [bits]); ``log2_N``
      (``log2 N`` of the samples used); ``I_XT_ceiling`` (the entropy of the distinct probe inputs, <= log2 N);
      ``N`` (the number of probe samples the estimates used); ``known_bias``, ``bias_large`` (the ``I(T;Y)``
      estimator's measured bias at this N and width [bits], and whether it exceeds 0.25 bits).
    * ``analysis/layer_mutual_information/information_plane``: the figure (TensorBoard image).
    """

    name = "layer_mutual_information"
    needs = ("layers",)
    detail = ("saturated", "H_Y", "log2_N", "I_XT_ceiling", "N", "known_bias", "bias_large")

    def __init__(
        self,
        estimator: Estimator = "probe",
        noise_variance: float = KDE_RELATIVE_NOISE,
        relative_noise: bool = True,
        kde_max_samples: int | None = 1000,
        n_bins: int = 10,
        n_components: int | None = 2,
        bins: str = "quantile",
        probe_folds: int = 5,
        pooling: Pooling = "mean",
        saturation_tol: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.probe_size < 4:  # refused at start, as InformationFlow does, not skipped at every probe
            raise ValueError(f"probe_size={self.probe_size} is too small: LayerMutualInformation needs at least 4")
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("pooling", pooling, POOLINGS)
        if not noise_variance > 0:
            raise ValueError(f"noise_variance={noise_variance} must be positive")
        if kde_max_samples is not None and kde_max_samples < 2:
            raise ValueError(f"kde_max_samples={kde_max_samples} must be at least 2 (or None for no cap)")
        if n_bins < 2:
            raise ValueError(f"n_bins={n_bins} must be at least 2")
        if n_components is not None and n_components < 1:
            raise ValueError(f"n_components={n_components} must be a positive integer or None (all units)")
        check_choice("bins", bins, BINNINGS)
        if probe_folds < 2:
            raise ValueError(f"probe_folds={probe_folds} must be at least 2")
        if saturation_tol < 0:
            raise ValueError(f"saturation_tol={saturation_tol} must be non-negative")
        self.estimator = estimator
        self.noise_variance = noise_variance
        self.kde_max_samples = kde_max_samples
        self.n_bins = n_bins
        self.n_components = n_components
        self.relative_noise = relative_noise
        self.bins = bins
        self.probe_folds = probe_folds
        self.pooling = pooling
        self.saturation_tol = saturation_tol
        self.history: list[dict[str, Any]] = []
        self._warned_saturation = False
        self._warned_bias = False
        self._told_cap = False

    @property
    @override
    def state_key(self) -> str:
        cadence = {"every_n_steps": self.every_n_steps, "every_n_epochs": self.every_n_epochs}
        return self._generate_state_key(estimator=self.estimator, pooling=self.pooling, **cadence, **self.patterns)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "history": [dict(h) for h in self.history]}

    @override
    def load_extra_state(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("estimator", self.estimator) != self.estimator:
            rank_zero_warn(
                f"LayerMutualInformation: the checkpoint's trajectory was measured with estimator="
                f"{state_dict['estimator']!r}, this run uses {self.estimator!r}; the curves will mix both"
            )
        self.history = [dict(h) for h in state_dict.get("history", [])]

    @override
    def layout(self) -> dict[str, list[str]]:
        return {
            "I(X;T) per layer and its ceiling [bits]": [self.key("I_XT") + "/.*", self.key("I_XT_ceiling") + "$"],
            "I(T;Y) per layer and H(Y) [bits]": [self.key("I_TY") + "/.*", self.key("H_Y") + "$"],
            "saturated estimate per layer": [self.key("saturated") + "/.*"],
        }

    # ---- measuring ---------------------------------------------------------------------------------
    @override
    def request(self) -> Request:
        return Request(hidden=True)

    @override
    def begin(self, session: ProbeSession) -> None:
        self._names = [t.name for t in session.targets["model"].layers]
        self._store = GatherStore(["y", "x_hash"] + [f"t/{n}" for n in self._names]).to(session.device)
        self._widths: dict[str, int] = {}

    @override
    def consume(self, pb: ProbeBatch) -> None:
        pad = ~pb.valid if pb.valid is not None else None
        pooled = {}
        for n in self._names:
            h = pb.captured["model"].hidden[n]
            mask = pad if pad is not None and h.dim() == 3 and pad.shape == h.shape[:2] else None
            t = pool_tokens(h, mask, self.pooling).float()
            if self._widths.setdefault(n, t.shape[1]) != t.shape[1]:
                raise ValueError(
                    f"pooling='flatten' needs sequences of one length, but layer {n} gave {t.shape[1]} "
                    f"features in one probe batch and {self._widths[n]} in another; use pooling='mean'"
                )
            pooled[f"t/{n}"] = t
        rows = next(iter(pooled.values())).shape[0] if pooled else len(pb.logits)  # one label per pooled row
        y = sample_labels(pb.labels, rows, type(self).__name__)
        self._store.update(pb.index, y=y, x_hash=input_hash(pb), **pooled)

    def estimate(self, ts: dict[str, Tensor], y: Tensor) -> tuple[dict[str, tuple[float, float]], float, float]:
        """``({layer: (I(X;T), I(T;Y))}, log2 N, H(Y))`` of the gathered representations with this estimator.

        Layers of one width are estimated together (:mod:`~pdelightning.analysis.information_layers`).
        """
        n = len(y)
        if self.estimator == "binning":
            bins = {
                k: binning_mutual_information(t, y, self.n_bins, self.n_components, bins=self.bins)
                for k, t in ts.items()
            }
            return bins, math.log2(n), entropy_bits(y)
        keep = subsample(n, self.kde_max_samples, self.seed)
        out: dict[str, tuple[float, float]] = {}
        h_y = entropy_bits(y[keep]) if self.estimator == "kde" else float("nan")  # "probe": the cross-fit's H(Y)
        by_width: dict[int, list[str]] = {}  # the layers of one width are stacked
        for k, t in ts.items():
            by_width.setdefault(t.shape[1], []).append(k)
        nv, rel = self.noise_variance, self.relative_noise
        for names in by_width.values():
            t = torch.stack([ts[k] for k in names])
            if self.estimator == "probe":  # the x-axis is the KDE bound on I(X;T); I(T;Y) is the probe's
                i_xt = kde_information_layers(t[:, keep], nv, rel)
                i_ty, h_y = crossfit_probe_information_layers(t, y, folds=self.probe_folds, seed=self.seed)
            else:
                i_xt, i_ty = kde_mutual_information_layers(t[:, keep], y[keep], nv, rel)
            out.update({k: (float(i_xt[i]), float(i_ty[i])) for i, k in enumerate(names)})
        return {k: out[k] for k in ts}, math.log2(len(keep)), h_y

    def bias_name(self) -> str:
        """This estimator's row in :data:`~pdelightning.analysis.estimator_bias.ESTIMATOR_BIAS` (for ``I(T;Y)``)."""
        if self.estimator == "probe":
            return "probe"
        if self.estimator == "kde":
            return "kde_relative" if self.relative_noise else "kde"
        return "binning_quantile" if self.bins == "quantile" else "binning"

    @override
    def finish(self, session: ProbeSession) -> None:
        trainer, names = session.trainer, self._names
        gathered = self._store.gather()  # a collective: every rank runs it
        self._store = None  # type: ignore[assignment]
        y = gathered["y"].cpu()
        n = len(y)
        if n < 4:
            rank_zero_warn(f"LayerMutualInformation: only {n} probe samples; skipping (need at least 4)")
            return
        capped = self.estimator != "binning" and self.kde_max_samples is not None and n > self.kde_max_samples
        if capped and not self._told_cap:
            rank_zero_info(
                f"LayerMutualInformation: the O(N^2) KDE uses {self.kde_max_samples} of the {n} probe samples "
                f"(kde_max_samples); log2_N = log2({self.kde_max_samples})"
            )
            self._told_cap = True
        # Every rank holds the same gathered tensors and computes the same (deterministic) numbers, so the
        # history is identical everywhere; only rank zero writes.
        entry: dict[str, Any] = {"step": session.step, "I_XT": {}, "I_TY": {}, "saturated": {}, "N": n}
        hashes = gathered["x_hash"].cpu()
        ts = {name: gathered[f"t/{name}"].cpu().double() for name in names}
        estimates, log2_n, h_y = self.estimate(ts, y)
        # the ceiling of any plug-in I(X;T): the entropy of the distinct probe inputs (log2 N when distinct)
        used = hashes if self.estimator == "binning" else hashes[subsample(n, self.kde_max_samples, self.seed)]
        ceiling = min(log2_n, distinct_entropy_bits(used))
        entry["log2_N"], entry["H_Y"], entry["ceiling"], entry["d"] = log2_n, h_y, ceiling, ts[names[-1]].shape[1]
        for name in names:
            i_xt, i_ty = estimates[name]
            entry["I_XT"][name], entry["I_TY"][name] = i_xt, i_ty
            entry["saturated"][name] = is_saturated(i_xt, ceiling, self.saturation_tol)
        entry["known_bias"] = known_bias(self.bias_name(), n, entry["d"])
        if self.history and self.history[-1]["step"] == entry["step"]:
            self.history[-1] = entry  # the probe at a resumed run's first step repeats the checkpoint's last one
        else:
            self.history.append(entry)
        del gathered

        saturated = [n for n in names if entry["saturated"][n]]
        if saturated and not self._warned_saturation:
            rank_zero_warn(
                f"LayerMutualInformation ({self.estimator}): the I(X;T) estimate of {saturated} is at the log2 N = "
                f"{entry['log2_N']:.2f} ceiling, where it no longer depends on the layer (every sample in its own "
                "bin / noise ball); these points are flagged, not compression. "
                + (
                    "Use fewer bins or components, or the 'probe' estimator."
                    if self.estimator == "binning"
                    else "Use a larger noise_variance."
                )
            )
            self._warned_saturation = True
        metrics = {self.key(q): float(entry[q]) for q in ("H_Y", "log2_N", "N", "known_bias")}
        metrics[self.key("I_XT_ceiling")] = entry["ceiling"]
        metrics[self.key("bias_large")] = float(abs(entry["known_bias"]) > LARGE_BIAS_BITS)
        if abs(entry["known_bias"]) > LARGE_BIAS_BITS and not self._warned_bias:
            rank_zero_warn(
                f"LayerMutualInformation ({self.estimator}): at N={n} probe samples and d={entry['d']} features the "
                f"I(T;Y) estimator's measured bias is {entry['known_bias']:+.2f} bits (on Gaussians with known MI); "
                "read trends, not levels, or raise probe_size"
            )
            self._warned_bias = True
        for name in names:
            metrics[self.key("I_XT", name)] = entry["I_XT"][name]
            metrics[self.key("I_TY", name)] = entry["I_TY"][name]
            metrics[self.key("saturated", name)] = float(entry["saturated"][name])
        self.log_scalars(trainer, metrics, session.step)
        if self.figures_due:
            history, title = [dict(h) for h in self.history], f"Information plane ({self.estimator})"
            self.figure(session, self.key("information_plane"), information_plane_figure, history, names, title)
