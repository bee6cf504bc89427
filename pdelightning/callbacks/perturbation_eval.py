"""Perturbation sensitivity: loss and accuracy on the probe set against the noise strength ε (paper section 3.5).

The paper's experiment 5 adds disturbances of strength ε to the inputs of a Transformer and a PDE model trained
on 20 Newsgroups and reports the average loss against ε: both models are alike below ε ≈ 1e-3, the PDE model's
loss rises faster beyond, and the two diverge near ε ≈ 1e-2 ("a critical point"). Token ids cannot be perturbed
continuously, so for text the noise goes on the embedding output ``u_0`` (the initial condition of eq. 6),
scaled to its root-mean-square. :class:`PerturbationEval` measures that curve during training, finds the critical
ε, compares random noise with the worst-case sign-of-gradient direction (FGSM), and shows where in the depth a
perturbation grows: the per-layer amplification ``||δh_l|| / ||δh_0||``, the discrete counterpart of the
cumulative perturbation effect the paper suspects in the PDE model's continuous dynamics (eq. 20 iterated).

The math lives in :mod:`pdelightning.analysis.perturbation` (``gaussian_noise``, ``per_sample_rms``,
``critical_epsilon``, ``amplification``, ``eps_tags``), the batched forwards in ``callbacks/_perturbation.py``;
the callback is a thin adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.analysis.perturbation import (
    DEFAULT_EPSILONS,
    amplification,
    correct_predictions,
    finite_mean,
    gaussian_noise,
    loss_departure,
    mask_like,
    per_sample_rms,
)
from pdelightning.callbacks._perturbation import check_epsilons, fgsm_direction, peek_inputs, perturbed_losses
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.plots import loss_vs_eps_figure
from pdelightning.probing.batch import primary_input
from pdelightning.probing.capture import Captured, Request
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.store import GatherStore

PerturbationMode = Literal["auto", "input", "embedding"]
MODES = ("auto", "input", "embedding")


def resolve_mode(mode: str, x: Any) -> Literal["input", "embedding"]:
    """Where noise goes for a batch whose main input is ``x``: ``"input"`` for float tensors, ``"embedding"`` for ids.

    Raises:
        ValueError: ``mode="input"`` with integer (token id) inputs, or inputs that are not a tensor.
    """
    if mode == "embedding":
        return "embedding"
    is_float = isinstance(x, Tensor) and x.is_floating_point()
    if mode == "input" and not is_float:
        what = f"integer tensors (dtype {x.dtype}), i.e. token ids" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"PerturbationEval(mode='input') adds Gaussian noise to float inputs but this model's inputs are {what}: "
            "use mode='embedding' (noise on the embedding output u_0, scaled to its RMS) or mode='auto'"
        )
    return "input" if is_float else "embedding"


class PerturbationEval(ProbeCallback):
    """Loss and accuracy on the probe set under perturbations of strength ε (paper section 3.5, experiment 5).

    For every ε of ``epsilons`` the probe set is evaluated with Gaussian noise added, giving the loss-vs-ε curve
    of the paper's Figure 6, the critical ε where the loss departs from the clean loss, optionally the FGSM
    (worst-case) curve, and per-layer amplification of a perturbation.

    Where the noise goes (``mode``):

    - ``"input"``: ``x' = x + ε z``, ``z ~ N(0, I)``: absolute noise of standard deviation ε on the float input
      (the batch's first input, or its ``pixel_values``). Integer inputs (token ids) raise a ``ValueError`` at setup.
    - ``"embedding"``: ``u_0``, the input embedding the model's adapter locates (our ``hook_embed``, the first
      block's input for other families, or the output of an ``embedding`` module glob), is replaced during the
      forward by ``u_0 + ε rms(u_0) z``: noise relative to the embedding's scale, where ``rms`` is taken per sample
      over its valid tokens. Padding positions (the mask the model uses) get no noise.
    - ``"auto"`` (default): ``"input"`` for float inputs, ``"embedding"`` for integer token ids (reported once).

    All ε levels of a probe batch run in ONE forward: the batch is repeated once per ε along the batch axis and
    each copy gets its own strength (split into chunks of at most ``max_rows`` rows); the clean pass is the shared
    probe forward, so the clean loss is exactly the model's own validation loss on the same samples (the forward
    contract of :mod:`pdelightning.probing.batch`).

    Noise is common across ε (one ``z`` per sample, scaled) and across probes, and is drawn per sample from a
    generator seeded by ``(seed, probe index)`` (:func:`gaussian_noise`): identical for any world size, probe
    batch size and padding length.

    With ``fgsm=True`` the sign-of-gradient direction ``sign(∇ CE)`` (with respect to the input, or to ``u_0`` in
    embedding mode, where it is scaled by ``rms(u_0)`` like the random noise) is evaluated at each ε too. The
    gradient is taken with ``torch.autograd.grad`` with respect to that tensor only: parameters' ``.grad`` are not
    touched.

    The critical ε is the smallest grid ε with ``loss(ε) > critical_factor * loss_clean`` (or a non-finite loss);
    ``nan`` when none departs (:func:`~pdelightning.analysis.perturbation.critical_epsilon`). So that a run whose
    grid stops short of the threshold still shows where it stands, every probe also logs ``departure_ratio``
    (largest loss on the grid over the clean loss) and ``threshold_fraction`` (how much of the way from the clean
    loss to the threshold the curve got; ``>= 1``: crossed), from
    :func:`~pdelightning.analysis.perturbation.loss_departure`.

    The amplification of layer ``l`` is ``||h_l(x + δ) - h_l(x)||_F / ||δh_0||_F`` per sample (over valid tokens),
    averaged over the probe set, at ``ε = amplification_eps`` with the random noise. ``δh_0`` is the change of
    the embedding output ``u_0`` when an embedding module is known (always in embedding mode); in input mode without
    one it is the input perturbation ``ε z`` itself. A model without layers (an MLP) is evaluated without
    amplification; ``amplification_eps=None`` turns it off.

    Every per-sample loss, correctness and amplification goes through a :class:`GatherStore`, so under DDP the
    logged values equal those of one process. Nothing is kept between probes (no checkpoint state).

    Args:
        epsilons: perturbation strengths, positive (default 11 values, half a decade apart, from 1e-4 to 10).
        mode: ``"auto"``, ``"input"`` or ``"embedding"`` (see above).
        fgsm: also evaluate the FGSM direction at every ε.
        critical_factor: departure factor ``> 1`` of the critical ε.
        amplification_eps: ε of the per-layer amplification, or ``None`` for none.
        max_samples: how many probe samples the curves are measured on (a random subset of the probe set, the same at
            every probe and on any number of processes; ``None``: all). With 11 ε each sample costs 11 forwards.
        max_rows: the most rows of one batched perturbation forward (copies beyond it go to further forwards; long
            sequences get fewer, so that one forward's explicit attention stays within ``2^25 T^-2`` rows).
        **kwargs: :class:`~pdelightning.callbacks.ProbeCallback` arguments (cadence, probe set size, globs
            ``layers``/``attention``/``embedding``, ``seed``, which also seeds the noise).

    Raises:
        ValueError: on an empty, non-positive, non-finite or ambiguous (same key) ``epsilons``, an unknown
            ``mode``, ``critical_factor <= 1``, a non-positive ``amplification_eps``; at setup, for
            ``mode="input"`` with token-id inputs.
        TargetNotFoundError: at setup, for embedding mode on a model without a known embedding module.

    Attributes:
        last_metrics: ``{key: value}`` of the latest probe (on every rank).

    Logged metrics:
        - ``analysis/perturbation_eval/loss_clean``, ``analysis/perturbation_eval/acc_clean``
        - ``analysis/perturbation_eval/loss/eps_<ε>``, ``analysis/perturbation_eval/acc/eps_<ε>`` for each ε
          (labels from :func:`~pdelightning.analysis.perturbation.eps_tags`, fixed point with a zero-padded
          integer part so that they sort by size: ``eps_00.0001`` ... ``eps_03.16``, ``eps_10``)
        - ``analysis/perturbation_eval/critical_eps`` (not logged while no ε departs: it is undefined then)
        - ``analysis/perturbation_eval/amplification/<layer>`` for each layer (models with layers)
        - ``analysis/perturbation_eval/fgsm_loss/eps_<ε>``, ``analysis/perturbation_eval/fgsm_acc/eps_<ε>``
          (``fgsm=True``)
        - secondary: ``analysis/perturbation_eval/detail/departure_ratio`` (largest loss on the grid over the clean
          loss), ``analysis/perturbation_eval/detail/threshold_fraction`` (how much of the way from the clean loss
          to the departure threshold the curve got; ``>= 1``: crossed)
        - figure ``analysis/perturbation_eval/loss_vs_eps``: loss and accuracy against ε (log axis), clean values
          as horizontal lines, critical ε marked (TensorBoard).

    Example::

        trainer = L.Trainer(callbacks=[PerturbationEval(every_n_epochs=1, fgsm=True)])
        # a stock model: noise on the output of its `proj` input projection
        PerturbationEval(mode="embedding", embedding="proj", layers="encoder.layers.*")
    """

    name = "perturbation_eval"
    detail = ("departure_ratio", "threshold_fraction")
    undefined: ClassVar[dict[str, str]] = {
        "critical_eps": "no ε of the grid raises the loss above critical_factor × the clean loss (yet); "
        "detail/threshold_fraction says how far along the way the curve got",
        "amplification": "no probe sample gave a finite amplification",
    }
    needs = ()

    def __init__(
        self,
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        mode: PerturbationMode = "auto",
        fgsm: bool = False,
        critical_factor: float = 2.0,
        amplification_eps: float | None = 1e-2,
        max_samples: int | None = 64,
        max_rows: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        eps, labels = check_epsilons(epsilons)
        check_choice("mode", mode, MODES)
        if not (math.isfinite(critical_factor) and critical_factor > 1):
            raise ValueError(f"critical_factor={critical_factor} must be a finite number > 1 (e.g. 2.0: loss doubles)")
        if amplification_eps is not None and not (math.isfinite(amplification_eps) and amplification_eps > 0):
            raise ValueError(f"amplification_eps={amplification_eps} must be positive and finite, or None")
        self.epsilons = eps
        self.labels = labels
        self.mode = mode
        self.fgsm = bool(fgsm)
        self.critical_factor = float(critical_factor)
        self.amplification_eps = amplification_eps
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows} must be positive")
        self.max_rows = max_rows
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be positive, or None for the whole probe set")
        self.max_samples = max_samples
        self.last_metrics: dict[str, float] = {}
        self._mode: Literal["input", "embedding"] | None = None

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _resolve_mode(self, x: Any) -> None:
        if self._mode is None:
            self._mode = resolve_mode(self.mode, x)
            if self.mode == "auto":
                kind = "float inputs" if self._mode == "input" else "integer token ids"
                rank_zero_info(f"PerturbationEval(mode='auto'): {kind}, so noise goes on the {self._mode}")

    @override
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().check(trainer, pl_module)
        x = peek_inputs(trainer)
        if x is not None:
            self._resolve_mode(x)
        if self._mode == "embedding" and self.targets(pl_module).embedding is None:
            from pdelightning.adapters.registry import TargetNotFoundError, describe

            raise TargetNotFoundError(
                f"PerturbationEval in embedding mode needs the input embedding of {type(pl_module).__name__}, and no "
                "adapter located it; give `embedding`, the name/glob of the module whose output is u_0 (e.g. "
                f"embedding='proj'). Modules seen: {describe(pl_module)}"
            )

    def _amp_layers(self, targets: AnalysisTargets) -> list[str]:
        return [t.name for t in targets.layers] if self.amplification_eps is not None else []

    @override
    def request(self) -> Request:
        return Request(hidden=self.amplification_eps is not None, embedding=True)

    @override
    def begin(self, session: ProbeSession) -> None:
        self._layers = self._amp_layers(session.targets["model"])
        keys = ["loss_clean", "correct_clean"]
        for i in range(len(self.epsilons)):
            keys += [f"loss/{i}", f"correct/{i}"] + ([f"fgsm_loss/{i}", f"fgsm_correct/{i}"] if self.fgsm else [])
        self._store = GatherStore(keys + [f"amp/{n}" for n in self._layers]).to(session.device)
        self._num_classes: int | None = None

    # ---- probe -------------------------------------------------------------------------------------------------
    @override
    def consume(self, pb: ProbeBatch) -> None:
        if pb.labels is None or pb.loss is None:
            raise ValueError("PerturbationEval needs labelled probe batches to compute the loss")
        pb = pb.take(pb.session.subset(pb.index, self.max_samples))
        x = primary_input(pb.batch)
        self._resolve_mode(x)
        if pb.logits.dim() == 2:
            self._num_classes = pb.logits.shape[-1]
        clean = pb.captured["model"]
        n = pb.logits.shape[0]
        index = pb.index if len(pb.index) == n else torch.zeros(n, dtype=torch.long, device=pb.logits.device)
        valid = pb.valid
        u0 = clean.embedding
        if self._mode == "embedding":
            assert u0 is not None
            valid_u = valid if mask_like(u0, valid) is not None else None
            z = gaussian_noise(index, u0.shape[1:], self.seed, valid_u).to(u0.device, u0.dtype)
            unit = per_sample_rms(u0, valid_u).view(-1, *([1] * (u0.dim() - 1))) * z
        else:
            assert x is not None
            unit = gaussian_noise(index, x.shape[1:], self.seed).to(x.device, x.dtype)
        amp_at: int | None = None
        if self._layers:
            match = [i for i, e in enumerate(self.epsilons) if math.isclose(e, float(self.amplification_eps))]  # type: ignore[arg-type]
            amp_at = match[0] if match else len(self.epsilons)
        out: dict[str, Tensor] = {"loss_clean": pb.loss, "correct_clean": correct_predictions(pb.logits, pb.labels)}
        losses, correct, amp = self._batched(pb, unit, u0, amp_at)
        for i in range(len(self.epsilons)):
            out[f"loss/{i}"], out[f"correct/{i}"] = losses[i], correct[i]
        if self._layers and amp is not None:
            eps_a = float(self.amplification_eps)  # type: ignore[arg-type]
            if self._mode == "input" and amp.embedding is not None and u0 is not None:
                dh0 = amp.embedding - u0  # the input noise as it reaches u_0
            else:
                dh0 = eps_a * unit  # the perturbation itself (on u_0, or on the input without a known u_0)
            for name in self._layers:
                out[f"amp/{name}"] = amplification(amp.hidden[name] - clean.hidden[name], dh0, valid)
        if self.fgsm:
            direction = fgsm_direction(pb, self._mode, u0, valid)  # type: ignore[arg-type]
            f_losses, f_correct, _ = self._batched(pb, direction, u0, None)
            for i in range(len(self.epsilons)):
                out[f"fgsm_loss/{i}"], out[f"fgsm_correct/{i}"] = f_losses[i], f_correct[i]
        self._store.update(pb.index, **out)

    def _batched(
        self, pb: ProbeBatch, direction: Tensor, u0: Tensor | None, amp_at: int | None
    ) -> tuple[list[Tensor], list[Tensor], Captured | None]:
        """Per-ε losses and correctness (and the amplification forward's capture) of one direction."""
        eps = list(self.epsilons) + ([float(self.amplification_eps)] if amp_at == len(self.epsilons) else [])  # type: ignore[arg-type]
        return perturbed_losses(pb, self._mode, eps, direction, u0, amp_at, self.max_rows)  # type: ignore[arg-type]

    # ---- output ------------------------------------------------------------------------------------------------
    @override
    def finish(self, session: ProbeSession) -> None:
        out = self._store.gather()
        self._store = None  # type: ignore[assignment]
        mean = {k: float(v.double().nanmean()) if v.numel() else float("nan") for k, v in out.items()}
        metrics = {self.key("loss_clean"): mean["loss_clean"], self.key("acc_clean"): mean["correct_clean"]}
        losses = [mean[f"loss/{i}"] for i in range(len(self.epsilons))]
        accs = [mean[f"correct/{i}"] for i in range(len(self.epsilons))]
        for label, loss, acc in zip(self.labels, losses, accs, strict=True):
            metrics[self.key("loss", label)] = loss
            metrics[self.key("acc", label)] = acc
        departure = loss_departure(self.epsilons, losses, mean["loss_clean"], self.critical_factor)
        critical = departure.critical_eps
        metrics[self.key("critical_eps")] = critical
        metrics[self.key("departure_ratio")] = departure.departure_ratio
        metrics[self.key("threshold_fraction")] = departure.threshold_fraction
        fgsm_losses, fgsm_accs = [], []
        if self.fgsm:
            fgsm_losses = [mean[f"fgsm_loss/{i}"] for i in range(len(self.epsilons))]
            fgsm_accs = [mean[f"fgsm_correct/{i}"] for i in range(len(self.epsilons))]
            for label, loss, acc in zip(self.labels, fgsm_losses, fgsm_accs, strict=True):
                metrics[self.key("fgsm_loss", label)] = loss
                metrics[self.key("fgsm_acc", label)] = acc
        for n in self._layers:
            metrics[self.key("amplification", n)] = finite_mean(out[f"amp/{n}"])
        self.last_metrics = metrics
        self.log_scalars(session.trainer, metrics, session.step)
        if self.figures_due:
            eps, clean_l, clean_a = list(self.epsilons), mean["loss_clean"], mean["correct_clean"]
            title = f"{self._mode} noise, step {session.step}"
            curves = (eps, losses, accs, clean_l, clean_a, critical, fgsm_losses or None, fgsm_accs or None)
            self.figure(session, self.key("loss_vs_eps"), loss_vs_eps_figure, *curves, title=title)

    @override
    def layout(self) -> dict[str, list[str]]:
        k = f"analysis/{self.name}"
        charts = {
            "loss vs ε (clean loss beside)": [rf"^{k}/loss/eps_[^/]+$", rf"^{k}/loss_clean$"],
            "accuracy vs ε (clean accuracy beside)": [rf"^{k}/acc/eps_[^/]+$", rf"^{k}/acc_clean$"],
            "critical ε": [rf"^{k}/critical_eps$"],
            "amplification per layer": [rf"^{k}/amplification/[^/]+$"],
        }
        if self.fgsm:
            charts["FGSM loss vs ε"] = [rf"^{k}/fgsm_loss/eps_[^/]+$", rf"^{k}/loss_clean$"]
            charts["FGSM accuracy vs ε"] = [rf"^{k}/fgsm_acc/eps_[^/]+$", rf"^{k}/acc_clean$"]
        return charts
