"""Per-layer mutual information I(X;T_l) and I(T_l;Y) over training: the information plane (paper section 3.3).

The paper tracks "the mutual information between each layer's output and the input labels over the course
of training" (section 3.3.3, Figure 4) to test the information-bottleneck picture of eq. (3), in which
training trades the task loss against the compression term ``I(X; T_theta(X))``. For a deterministic
network and continuous activations both quantities are ill-posed (``I(X;T)`` is infinite, or ``log2 N``
for any plug-in estimate on ``N`` distinct samples), so every number here comes from an *estimator* whose
meaning is spelled out below, and estimates stuck at that ceiling are flagged instead of being read as
compression.

The math lives in plain functions (:func:`binning_mutual_information`, :func:`kde_mutual_information`,
:func:`probe_mutual_information`, :func:`is_saturated`, :func:`pool_tokens`, :func:`information_plane_figure`);
:class:`LayerMutualInformation` is the Lightning adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pdelightning.analysis.information import (  # noqa: F401 (moved there; the old import path keeps working)
    _codes,
    bin_codes,
    binning_mutual_information,
    entropy_bits,
    fit_linear_probe,
    is_saturated,
    kde_entropy_bits,
    kde_mutual_information,
    principal_components,
    probe_mutual_information,
    split_halves,
    subsample,
)
from pdelightning.analysis.representation import pool_tokens
from pdelightning.callbacks._probe import GatherStore, ProbeCallback
from pdelightning.probing.capture import Request
from pdelightning.probing.hub import ProbeBatch, ProbeSession

Estimator = Literal["probe", "kde", "binning"]
Pooling = Literal["mean", "flatten"]
ESTIMATORS = ("probe", "kde", "binning")
POOLINGS = ("mean", "flatten")


# ---- the figure ----------------------------------------------------------------------------------------
def information_plane_figure(
    history: Sequence[Mapping[str, Any]], layers: Sequence[str], title: str = "Information plane"
) -> Any:
    """The information plane: ``x = I(X;T)``, ``y = I(T;Y)``, one coloured trajectory per layer over training.

    Each history entry is ``{"step", "I_XT": {layer: bits}, "I_TY": {...}, "saturated": {...}, "log2_N", "H_Y"}``.
    Points grow more opaque with training time, arrows join consecutive probes, the last point is ringed;
    saturated points are drawn hollow. The ``log2 N`` ceiling (dashed, vertical) and ``H(Y)`` (dotted,
    horizontal) of the latest probe are drawn as reference lines.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"]
    n_points = len(history)
    any_saturated = False
    for li, layer in enumerate(layers):
        color = cmap(li / max(1, len(layers) - 1))
        pts = [(h["I_XT"].get(layer), h["I_TY"].get(layer), bool(h["saturated"].get(layer, False))) for h in history]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "-", color=color, alpha=0.35, lw=1, label=layer)
        for k in range(1, len(pts)):
            ax.annotate(
                "", xy=(xs[k], ys[k]), xytext=(xs[k - 1], ys[k - 1]),
                arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6, "lw": 1},
            )  # fmt: skip
        for k, (x, y, sat) in enumerate(pts):
            alpha = 0.3 + 0.7 * (k + 1) / max(1, n_points)
            any_saturated |= sat
            ax.scatter(
                [x], [y], s=36, edgecolors=[color], facecolors="none" if sat else [color], alpha=alpha, linewidths=1.5,
                zorder=3,
            )  # fmt: skip
        ax.scatter([xs[-1]], [ys[-1]], s=120, facecolors="none", edgecolors="black", linewidths=0.8, zorder=4)
    if history:
        last = history[-1]
        ax.axvline(last["log2_N"], color="gray", ls="--", lw=1, label=f"log2 N = {last['log2_N']:.2f} (ceiling)")
        ax.axhline(last["H_Y"], color="gray", ls=":", lw=1, label=f"H(Y) = {last['H_Y']:.2f}")
    if any_saturated:
        ax.scatter([], [], s=36, facecolors="none", edgecolors="gray", label="saturated (at log2 N)")
    ax.set_xlabel("I(X;T) [bits]")
    ax.set_ylabel("I(T;Y) [bits]")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ---- the callback -------------------------------------------------------------------------------------
class LayerMutualInformation(ProbeCallback):
    """Track ``I(X;T_l)`` and ``I(T_l;Y)`` of every layer over training and draw the information plane.

    Paper experiment 3 (section 3.3, Figure 4): the mutual information between each layer's output and the
    labels over training, read against the information-bottleneck objective of eq. (3). On each probe the
    layer outputs of the fixed probe set are pooled into ``T_l`` (:func:`pool_tokens`: masked mean over
    tokens, padding as the model itself masks it; or ``pooling="flatten"``), gathered across
    ranks with a :class:`~pdelightning.callbacks._probe.GatherStore` (so a DDP run gives the one-process
    numbers), and passed to the chosen estimator. All values are in bits.

    Estimators (see each function for what it really measures):

    * ``"probe"`` (default): ``I(T;Y)`` is the variational lower bound ``H(Y) - CE`` of a linear softmax
      probe fitted on one half of the probe set and scored on the other (:func:`probe_mutual_information`;
      the halves are a seeded class-stratified split of the probe positions, :func:`split_halves`, hence the
      same for any world size), clipped at ``0``; ``H(Y)`` is the label entropy of the scoring half. The
      probe gives no bound on ``I(X;T)``: the x-axis of the information plane is the Gaussian-KDE *upper*
      bound of :func:`kde_mutual_information` (with ``noise_variance`` and ``kde_max_samples``), so a probe
      point pairs a lower bound on ``I(T;Y)`` with an upper bound on ``I(X;T)``.
    * ``"kde"``: both from the Gaussian-KDE pairwise-distance bound with noise variance ``noise_variance``
      (:func:`kde_mutual_information`). ``O(N^2)``: at most ``kde_max_samples`` probe samples (a seeded
      subset) enter it; ``log2_N`` then refers to that capped ``N`` and the cap is reported in the logs.
    * ``"binning"``: plug-in entropies after ``n_bins`` equal-width bins on the top ``n_components``
      principal components (:func:`binning_mutual_information`); ``I(X;T) = H(T_binned)``.

    Saturation: for continuous activations, plain binning over all units and small-variance KDE report
    ``I(X;T) = log2 N`` and ``I(T;Y) = H(Y)`` no matter what the layer does. Estimates within
    ``saturation_tol`` bits of ``log2 N`` are flagged (:func:`is_saturated`), drawn hollow against the
    dashed ``log2 N`` ceiling in the figure, and a warning is issued once.

    The trajectory ``(step, I(X;T), I(T;Y), saturated)`` per layer is kept for the figure and saved in
    checkpoints (``state_dict``), so a resumed run continues its curves.

    Args:
        estimator: ``"probe"``, ``"kde"`` or ``"binning"`` (above).
        noise_variance: KDE noise variance ``sigma^2`` (``"kde"``, and ``I(X;T)`` of ``"probe"``).
        kde_max_samples: at most this many samples enter the ``O(N^2)`` KDE (``None``: all).
        n_bins: bins per component for ``"binning"``.
        n_components: principal components binned (``None``: every unit, which saturates).
        probe_l2: L2 penalty of the probe classifier.
        probe_max_iter: L-BFGS iterations of the probe classifier (scikit-learn ``LogisticRegression``).
        pooling: ``"mean"`` (masked mean over tokens) or ``"flatten"`` (all tokens; fixed length only).
        saturation_tol: bits below ``log2 N`` within which an ``I(X;T)`` estimate counts as saturated.
        **kwargs: the :class:`~pdelightning.callbacks._probe.ProbeCallback` arguments (cadence or budget, probe set,
            globs, ``seed``, which also draws the KDE subset and the probe classifier's halves).

    Raises:
        ValueError: for an unknown ``estimator`` or ``pooling``, or non-positive sizes / variances.
        TargetNotFoundError: at ``setup`` when the model has no layers to analyse (e.g. a plain MLP) and no
            ``layers`` glob is given.
        RuntimeError: when the probe batches carry no labels.

    Example::

        trainer = L.Trainer(callbacks=[LayerMutualInformation(estimator="probe", every_n_epochs=1)])
        # a stock nn.TransformerEncoder: LayerMutualInformation(layers="encoder.layers.*")

    **Logged metrics** (``<layer>`` is the layer name, e.g. ``blocks.0``):

    * ``analysis/layer_mutual_information/I_XT/<layer>``: ``I(X;T_l)`` estimate [bits].
    * ``analysis/layer_mutual_information/I_TY/<layer>``: ``I(T_l;Y)`` estimate [bits].
    * ``analysis/layer_mutual_information/saturated/<layer>``: ``1`` if the estimate is at the ``log2 N``
      ceiling, else ``0``.
    * ``analysis/layer_mutual_information/H_Y``: label entropy, the ceiling of ``I(T;Y)`` [bits].
    * ``analysis/layer_mutual_information/log2_N``: the ``I(X;T)`` ceiling ``log2 N`` of the samples used.
    * ``analysis/layer_mutual_information/N``: the number of probe samples the estimates used.
    * ``analysis/layer_mutual_information/information_plane``: the figure (TensorBoard image).
    """

    name = "layer_mutual_information"
    needs = ("layers",)

    def __init__(
        self,
        estimator: Estimator = "probe",
        noise_variance: float = 0.1,
        kde_max_samples: int | None = 1000,
        n_bins: int = 10,
        n_components: int | None = 2,
        probe_l2: float = 1e-3,
        probe_max_iter: int = 200,
        pooling: Pooling = "mean",
        saturation_tol: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator={estimator!r} is not one of {ESTIMATORS}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
        if not noise_variance > 0:
            raise ValueError(f"noise_variance={noise_variance} must be positive")
        if kde_max_samples is not None and kde_max_samples < 2:
            raise ValueError(f"kde_max_samples={kde_max_samples} must be at least 2 (or None for no cap)")
        if n_bins < 2:
            raise ValueError(f"n_bins={n_bins} must be at least 2")
        if n_components is not None and n_components < 1:
            raise ValueError(f"n_components={n_components} must be a positive integer or None (all units)")
        if not probe_l2 > 0:
            raise ValueError(f"probe_l2={probe_l2} must be positive")
        if probe_max_iter < 1:
            raise ValueError(f"probe_max_iter={probe_max_iter} must be positive")
        if saturation_tol < 0:
            raise ValueError(f"saturation_tol={saturation_tol} must be non-negative")
        self.estimator = estimator
        self.noise_variance = noise_variance
        self.kde_max_samples = kde_max_samples
        self.n_bins = n_bins
        self.n_components = n_components
        self.probe_l2 = probe_l2
        self.probe_max_iter = probe_max_iter
        self.pooling = pooling
        self.saturation_tol = saturation_tol
        self.history: list[dict[str, Any]] = []
        self._warned_saturation = False
        self._told_cap = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            estimator=self.estimator, pooling=self.pooling, every_n_steps=self.every_n_steps,
            every_n_epochs=self.every_n_epochs, **self.patterns,
        )  # fmt: skip

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
            "I(X;T) per layer [bits]": [self.key("I_XT") + "/.*", self.key("log2_N")],
            "I(T;Y) per layer [bits]": [self.key("I_TY") + "/.*", self.key("H_Y")],
            "saturated estimate per layer": [self.key("saturated") + "/.*"],
        }

    # ---- measuring ---------------------------------------------------------------------------------
    @override
    def request(self) -> Request:
        return Request(hidden=True)

    @override
    def begin(self, session: ProbeSession) -> None:
        self._names = [t.name for t in session.targets["model"].layers]
        self._store = GatherStore(["y"] + [f"t/{n}" for n in self._names]).to(session.device)
        self._widths: dict[str, int] = {}

    @override
    def consume(self, pb: ProbeBatch) -> None:
        if pb.labels is None:
            raise RuntimeError(
                "LayerMutualInformation needs labels: the validation batches must be (x, y) pairs "
                "(or dicts with a 'labels'/'label'/'y' entry)"
            )
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
        self._store.update(pb.index, y=pb.labels.long().reshape(-1)[: len(pb.logits)], **pooled)

    def estimate(self, t: Tensor, y: Tensor) -> tuple[float, float, float, float]:
        """``(I(X;T), I(T;Y), log2 N, H(Y))`` of one layer's gathered representations with this estimator."""
        n = len(y)
        if self.estimator == "binning":
            i_xt, i_ty = binning_mutual_information(t, y, self.n_bins, self.n_components)
            return i_xt, i_ty, math.log2(n), entropy_bits(y)
        keep = subsample(n, self.kde_max_samples, self.seed)
        i_xt, i_ty = kde_mutual_information(t[keep], y[keep], self.noise_variance)
        if self.estimator == "kde":
            return i_xt, i_ty, math.log2(len(keep)), entropy_bits(y[keep])
        fit = split_halves(y, self.seed)
        i_ty, h_y = probe_mutual_information(t, y, fit, l2=self.probe_l2, max_iter=self.probe_max_iter)
        return i_xt, i_ty, math.log2(len(keep)), h_y

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
        # history is identical everywhere; only rank zero writes. The estimators solve small problems on the CPU,
        # where multi-threaded BLAS would only spin against the training process: run them on one thread.
        from threadpoolctl import threadpool_limits

        entry: dict[str, Any] = {"step": session.step, "I_XT": {}, "I_TY": {}, "saturated": {}, "N": n}
        with threadpool_limits(limits=1):
            for name in names:
                i_xt, i_ty, log2_n, h_y = self.estimate(gathered[f"t/{name}"].cpu().double(), y)
                entry["I_XT"][name], entry["I_TY"][name] = i_xt, i_ty
                entry["saturated"][name] = is_saturated(i_xt, log2_n, self.saturation_tol)
                entry["log2_N"], entry["H_Y"] = log2_n, h_y
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
                    else "Use a larger noise_variance (it is in the units of T squared)."
                )
            )
            self._warned_saturation = True
        metrics: dict[str, float] = {
            self.key("H_Y"): entry["H_Y"], self.key("log2_N"): entry["log2_N"], self.key("N"): float(n),
        }  # fmt: skip
        for name in names:
            metrics[self.key("I_XT", name)] = entry["I_XT"][name]
            metrics[self.key("I_TY", name)] = entry["I_TY"][name]
            metrics[self.key("saturated", name)] = float(entry["saturated"][name])
        self.log_scalars(trainer, metrics, session.step)
        if self.figures_due:
            history, title = [dict(h) for h in self.history], f"Information plane ({self.estimator})"
            self.figure(session, self.key("information_plane"), lambda: information_plane_figure(history, names, title))
