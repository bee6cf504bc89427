"""Perturbation sensitivity: loss and accuracy on the probe set against the noise strength ε (paper section 3.5).

The paper's experiment 5 adds disturbances of strength ε to the inputs of a Transformer and a PDE model trained
on 20 Newsgroups and reports the average loss against ε: both models are alike below ε ≈ 1e-3, the PDE model's
loss rises faster beyond, and the two diverge near ε ≈ 1e-2 ("a critical point"). Token ids cannot be perturbed
continuously, so for text the noise goes on the embedding output ``u_0`` (the initial condition of eq. 6),
scaled to its root-mean-square. :class:`PerturbationEval` measures that curve during training, finds the critical
ε, compares random noise with the worst-case sign-of-gradient direction (FGSM), and shows where in the depth a
perturbation grows: the per-layer amplification ``||δh_l|| / ||δh_0||``, the discrete counterpart of the
cumulative perturbation effect the paper suspects in the PDE model's continuous dynamics (eq. 20 iterated).

The math lives in module-level functions (:func:`gaussian_noise`, :func:`per_sample_rms`,
:func:`critical_epsilon`, :func:`amplification`, :func:`format_eps`); the callback is a thin adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Literal

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from pdelightning.analysis.perturbation import (  # noqa: F401 (moved there; the old import path keeps working)
    amplification,
    critical_epsilon,
    format_eps,
    gaussian_noise,
    masked_frobenius,
    per_sample_rms,
    sample_seed,
)
from pdelightning.analysis.perturbation import (
    mask_like as _mask_like,
)
from pdelightning.callbacks._capture import Capture, first_tensor
from pdelightning.callbacks._probe import GatherStore, ProbeCallback, split_batch, tensorboard, validation_loader
from pdelightning.callbacks._targets import TargetNotFoundError, clean_name, glob_to_regex, resolve_targets
from pdelightning.models.embedding import InputEmbedding
from pdelightning.models.protocol import AnalysisTargets

PerturbationMode = Literal["auto", "input", "embedding"]
MODES = ("auto", "input", "embedding")
DEFAULT_EPSILONS: tuple[float, ...] = tuple(float(e) for e in np.logspace(-4, 0, 9))


# ---- pure functions --------------------------------------------------------------------------------------------


def resolve_mode(mode: str, x: Any) -> Literal["input", "embedding"]:
    """Where noise goes for a batch of inputs ``x``: ``"input"`` for float tensors, ``"embedding"`` for token ids.

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


# ---- the embedding hook ------------------------------------------------------------------------------------------
class _EmbeddingEdit:
    """Forward hook on the embedding module that rewrites its output ``u_0`` with ``fn(u_0)`` while ``fn`` is set."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module = module
        self.fn: Callable[[Tensor], Tensor] | None = None
        self._stack = ExitStack()

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.fn is None:
            return None
        u0 = self.fn(first_tensor(output))
        if isinstance(output, Tensor):
            return u0
        return type(output)([u0, *output[1:]])

    def __enter__(self) -> _EmbeddingEdit:
        if self.module is not None:
            self._stack.callback(self.module.register_forward_hook(self._hook).remove)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.fn = None
        self._stack.close()


def _find_pad_id(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, InputEmbedding) and m.input_kind == "tokens":
            return int(m.pad_id)
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            return int(m.padding_idx)
    return 0


def _peek_inputs(trainer: L.Trainer) -> Any | None:
    """One collated sample of the run's data (to tell images from token ids at setup); ``None`` if unreachable."""
    try:
        loader = validation_loader(trainer)
        if loader is None:
            return None
        x, _ = split_batch(loader.collate_fn([loader.dataset[0]]))
        return x
    except Exception:  # an iterable or lazy dataset: decide at the first probe instead
        return None


class PerturbationEval(ProbeCallback):
    """Loss and accuracy on the probe set under perturbations of strength ε (paper section 3.5, experiment 5).

    For every ε of ``epsilons`` the probe set is evaluated with Gaussian noise added, giving the loss-vs-ε curve
    of the paper's Figure 6, the critical ε where the loss departs from the clean loss, optionally the FGSM
    (worst-case) curve, and per-layer amplification of a perturbation.

    Where the noise goes (``mode``):

    - ``"input"``: ``x' = x + ε z``, ``z ~ N(0, I)``: absolute noise of standard deviation ε on float inputs
      (images). Integer inputs (token ids) raise a ``ValueError`` at setup.
    - ``"embedding"``: a forward hook on the embedding module (the model's ``AnalysisTargets.embedding``, e.g. our
      ``hook_embed``; for other models give ``embedding``, a module name/glob such as ``"proj"``) replaces its
      output ``u_0`` with ``u_0 + ε rms(u_0) z``: noise relative to the embedding's scale, where ``rms`` is taken
      per sample over its valid (non-padding) tokens. Padding positions (``x == pad_id`` for integer inputs) get no
      noise.
    - ``"auto"`` (default): ``"input"`` for float inputs, ``"embedding"`` for integer token ids (reported once).

    Noise is common across ε (one ``z`` per sample, scaled) and across probes, and is drawn per sample from a
    generator seeded by ``(seed, probe index)`` (:func:`gaussian_noise`): identical for any world size, probe
    batch size and padding length.

    With ``fgsm=True`` the sign-of-gradient direction ``sign(∇ CE)`` (with respect to the input, or to ``u_0`` in
    embedding mode, where it is scaled by ``rms(u_0)`` like the random noise) is evaluated at each ε too. The
    gradient is taken with ``torch.autograd.grad`` with respect to that tensor only: parameters' ``.grad`` are not
    touched.

    The critical ε is the smallest grid ε with ``loss(ε) > critical_factor * loss_clean`` (or a non-finite loss);
    ``nan`` when none departs (:func:`critical_epsilon`).

    The amplification of layer ``l`` is ``||h_l(x + δ) - h_l(x)||_F / ||δh_0||_F`` per sample (over valid tokens),
    averaged over the probe set, at ``ε = amplification_eps`` with the random noise. ``δh_0`` is the change of
    the embedding output ``u_0`` when an embedding module is known (always in embedding mode); in input mode without
    one it is the input perturbation ``ε z`` itself. A model without layers (an MLP) is evaluated without
    amplification; ``amplification_eps=None`` turns it off.

    Every per-sample loss, correctness and amplification goes through a :class:`GatherStore`, so under DDP the
    logged values equal those of one process. Nothing is kept between probes (no checkpoint state).

    Args:
        epsilons: perturbation strengths, positive (default 9 log-spaced values from 1e-4 to 1).
        mode: ``"auto"``, ``"input"`` or ``"embedding"`` (see above).
        fgsm: also evaluate the FGSM direction at every ε.
        critical_factor: departure factor ``> 1`` of the critical ε.
        amplification_eps: ε of the per-layer amplification, or ``None`` for none.
        pad_id: padding id of integer inputs (default: the model's ``InputEmbedding.pad_id`` or
            ``nn.Embedding.padding_idx``, else 0).
        **kwargs: :class:`~pdelightning.callbacks._probe.ProbeCallback` arguments (cadence, probe set size, globs
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
        - ``analysis/perturbation_eval/loss/eps=<ε>``, ``analysis/perturbation_eval/acc/eps=<ε>`` for each ε
          (labels from :func:`format_eps`, e.g. ``eps=1e-03``)
        - ``analysis/perturbation_eval/critical_eps`` (``nan`` when no ε departs)
        - ``analysis/perturbation_eval/amplification/<layer>`` for each layer (models with layers)
        - ``analysis/perturbation_eval/fgsm_loss/eps=<ε>``, ``analysis/perturbation_eval/fgsm_acc/eps=<ε>``
          (``fgsm=True``)
        - figure ``analysis/perturbation_eval/loss_vs_eps``: loss and accuracy against ε (log axis), clean values
          as horizontal lines, critical ε marked (TensorBoard).

    Example::

        trainer = L.Trainer(callbacks=[PerturbationEval(every_n_epochs=1, fgsm=True)])
        # a stock model: noise on the output of its `proj` input projection
        PerturbationEval(mode="embedding", embedding="proj", layers="encoder.layers.*")
    """

    name = "perturbation_eval"
    needs = ()

    def __init__(
        self,
        epsilons: Sequence[float] = DEFAULT_EPSILONS,
        mode: PerturbationMode = "auto",
        fgsm: bool = False,
        critical_factor: float = 2.0,
        amplification_eps: float | None = 1e-2,
        pad_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        eps = [float(e) for e in epsilons]
        if not eps:
            raise ValueError("epsilons is empty: give at least one perturbation strength, e.g. [1e-3, 1e-2]")
        bad = [e for e in eps if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"epsilons must be positive and finite (the ε axis is logarithmic); got {bad}")
        eps = sorted(eps)
        labels = [format_eps(e) for e in eps]
        if len(set(labels)) != len(labels):
            raise ValueError(f"epsilons {eps} give repeated metric keys {labels}: use distinct values")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
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
        self.pad_id = pad_id
        self.last_metrics: dict[str, float] = {}
        self._mode: Literal["input", "embedding"] | None = None

    # ---- targets and mode --------------------------------------------------------------------------------------
    @override
    def targets(self, pl_module: nn.Module) -> AnalysisTargets:
        """Layers (possibly none) and embedding; requires an embedding module once the mode is ``"embedding"``."""
        emb = self.patterns["embedding"]
        try:
            targets = resolve_targets(pl_module, **self.patterns, need=())
        except TargetNotFoundError:
            if self.patterns["layers"] is not None:
                raise
            targets = AnalysisTargets(layers=[], embedding=self._match_embedding(pl_module, emb))
        if self._mode == "embedding" and targets.embedding is None:
            raise TargetNotFoundError(
                f"PerturbationEval in embedding mode needs the input-embedding module of {type(pl_module).__name__}: "
                "it implements no analysis_targets() with an embedding and has no hook_embed; give `embedding`, the "
                "name/glob of the module whose output is u_0 (e.g. embedding='proj'). Modules seen: "
                + ", ".join(clean_name(n) for n, _ in pl_module.named_modules() if n)
            )
        return targets

    @staticmethod
    def _match_embedding(pl_module: nn.Module, pattern: str | None) -> nn.Module | None:
        if pattern is None:
            return None
        rx = glob_to_regex(pattern)
        for n, m in pl_module.named_modules():
            if n and rx.match(clean_name(n)):
                return m
        raise TargetNotFoundError(
            f"embedding={pattern!r} matched no module. Modules seen: "
            + ", ".join(clean_name(n) for n, _ in pl_module.named_modules() if n)
        )

    def _resolve_mode(self, x: Any) -> None:
        if self._mode is None:
            self._mode = resolve_mode(self.mode, x)
            if self.mode == "auto":
                kind = "float inputs" if self._mode == "input" else "integer token ids"
                rank_zero_info(f"PerturbationEval(mode='auto'): {kind}, so noise goes on the {self._mode}")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        x = _peek_inputs(trainer)
        if x is not None:
            self._resolve_mode(x)
        self.targets(pl_module)  # fail fast

    # ---- probe -------------------------------------------------------------------------------------------------
    @override
    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets: AnalysisTargets | None = None
        store: GatherStore | None = None
        pad_id = self.pad_id if self.pad_id is not None else _find_pad_id(pl_module)
        for x, y, idx in self.iter_probe(trainer, pl_module):
            if y is None:
                raise ValueError("PerturbationEval needs labelled probe batches (x, y) to compute the loss")
            if targets is None:
                self._resolve_mode(x)
                targets = self.targets(pl_module)
                store = GatherStore(self._store_keys(targets)).to(pl_module.device)
            store.update(idx, **self._measure(pl_module, targets, x, y, idx, pad_id))  # type: ignore[union-attr]
        if store is None:  # an empty shard still takes part in the gather
            targets = self.targets(pl_module)
            store = GatherStore(self._store_keys(targets)).to(pl_module.device)
        out = store.compute()
        self._report(trainer, targets, out)  # type: ignore[arg-type]

    def _amp_layers(self, targets: AnalysisTargets) -> list[str]:
        return [t.name for t in targets.layers] if self.amplification_eps is not None else []

    def _store_keys(self, targets: AnalysisTargets) -> list[str]:
        keys = ["loss_clean", "correct_clean"]
        for i in range(len(self.epsilons)):
            keys += [f"loss/{i}", f"correct/{i}"]
            if self.fgsm:
                keys += [f"fgsm_loss/{i}", f"fgsm_correct/{i}"]
        return keys + [f"amp/{n}" for n in self._amp_layers(targets)]

    def _measure(
        self, pl_module: L.LightningModule, targets: AnalysisTargets, x: Tensor, y: Tensor, idx: Tensor, pad_id: int
    ) -> dict[str, Tensor]:
        """Per-sample losses, correctness and amplifications of one probe batch."""
        out: dict[str, Tensor] = {}
        mode = self._mode
        valid = (x != pad_id) if isinstance(x, Tensor) and not x.is_floating_point() and x.dim() == 2 else None
        amp_layers = self._amp_layers(targets)
        want_emb = targets.embedding is not None and (mode == "embedding" or bool(amp_layers))

        def score(logits: Any, prefix: str) -> None:
            logits = first_tensor(logits)
            out[f"loss{prefix}"] = F.cross_entropy(logits.float(), y, reduction="none")
            out[f"correct{prefix}"] = (logits.argmax(-1) == y).float()

        with _EmbeddingEdit(targets.embedding if mode == "embedding" else None) as edit, torch.no_grad():
            # clean pass: logits, u_0 and the layer outputs of reference
            with Capture(targets, layers=bool(amp_layers), embedding=want_emb) as cap:
                score(self.forward(pl_module, x), "_clean")
                clean_hidden, _ = cap.pop()
            u0 = clean_hidden.get("embedding")
            if mode == "embedding":
                assert u0 is not None  # targets() guarantees an embedding module in embedding mode
                valid_u = valid if _mask_like(u0, valid) is not None else None
                z = gaussian_noise(idx, u0.shape[1:], self.seed, valid_u).to(u0.device, u0.dtype)
                unit = per_sample_rms(u0, valid_u).view(-1, *([1] * (u0.dim() - 1))) * z

                def perturbed(direction: Tensor, eps: float) -> Any:
                    edit.fn = lambda u: u + eps * direction
                    try:
                        return self.forward(pl_module, x)
                    finally:
                        edit.fn = None

            else:
                unit = gaussian_noise(idx, x.shape[1:], self.seed).to(x.device, x.dtype)

                def perturbed(direction: Tensor, eps: float) -> Any:
                    return self.forward(pl_module, x + eps * direction)

            for i, eps in enumerate(self.epsilons):
                score(perturbed(unit, eps), f"/{i}")

            if amp_layers:
                eps_a = float(self.amplification_eps)  # type: ignore[arg-type]
                with Capture(targets, layers=True, embedding=want_emb) as cap:
                    perturbed(unit, eps_a)
                    hidden, _ = cap.pop()
                dh0 = hidden["embedding"] - u0 if u0 is not None else eps_a * unit
                for n in amp_layers:
                    out[f"amp/{n}"] = amplification(hidden[n] - clean_hidden[n], dh0, valid)
            del clean_hidden

            if self.fgsm:
                direction = self._fgsm_direction(pl_module, edit, x, y, valid, u0 if mode == "embedding" else None)
                for i, eps in enumerate(self.epsilons):
                    logits = perturbed(direction, eps)
                    out[f"fgsm_loss/{i}"] = F.cross_entropy(first_tensor(logits).float(), y, reduction="none")
                    out[f"fgsm_correct/{i}"] = (first_tensor(logits).argmax(-1) == y).float()
        return out

    def _fgsm_direction(
        self, pl_module: L.LightningModule, edit: _EmbeddingEdit, x: Tensor, y: Tensor, valid: Tensor | None,
        u0: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """``sign(∇ CE)`` with respect to the input (input mode) or to ``u_0``, times ``rms(u_0)`` (embedding mode)."""
        with torch.enable_grad():
            if u0 is None:
                leaf = x.detach().clone().requires_grad_(True)
                logits = self.forward(pl_module, leaf)
            else:
                leaves: list[Tensor] = []

                def make_leaf(u: Tensor) -> Tensor:
                    leaves.append(u.detach().requires_grad_(True))
                    return leaves[-1]

                edit.fn = make_leaf
                try:
                    logits = self.forward(pl_module, x)
                finally:
                    edit.fn = None
                leaf = leaves[0]
            loss = F.cross_entropy(first_tensor(logits).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, leaf)
        direction = grad.sign()
        if u0 is not None:
            valid_u = valid if _mask_like(u0, valid) is not None else None
            m = _mask_like(u0, valid_u)
            direction = direction * per_sample_rms(u0, valid_u).view(-1, *([1] * (u0.dim() - 1)))
            if m is not None:
                direction = direction * m
        return direction.detach()

    # ---- output ------------------------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, targets: AnalysisTargets, out: dict[str, Tensor]) -> None:
        mean = {k: float(v.double().mean()) if v.numel() else float("nan") for k, v in out.items()}
        metrics = {self.key("loss_clean"): mean["loss_clean"], self.key("acc_clean"): mean["correct_clean"]}
        losses = [mean[f"loss/{i}"] for i in range(len(self.epsilons))]
        accs = [mean[f"correct/{i}"] for i in range(len(self.epsilons))]
        for label, loss, acc in zip(self.labels, losses, accs, strict=True):
            metrics[self.key("loss", f"eps={label}")] = loss
            metrics[self.key("acc", f"eps={label}")] = acc
        critical = critical_epsilon(self.epsilons, losses, mean["loss_clean"], self.critical_factor)
        metrics[self.key("critical_eps")] = critical
        fgsm_losses, fgsm_accs = [], []
        if self.fgsm:
            fgsm_losses = [mean[f"fgsm_loss/{i}"] for i in range(len(self.epsilons))]
            fgsm_accs = [mean[f"fgsm_correct/{i}"] for i in range(len(self.epsilons))]
            for label, loss, acc in zip(self.labels, fgsm_losses, fgsm_accs, strict=True):
                metrics[self.key("fgsm_loss", f"eps={label}")] = loss
                metrics[self.key("fgsm_acc", f"eps={label}")] = acc
        for n in self._amp_layers(targets):
            v = out[f"amp/{n}"].double()
            v = v[torch.isfinite(v)]
            metrics[self.key("amplification", n)] = float(v.mean()) if v.numel() else float("nan")
        self.last_metrics = metrics
        self.log_scalars(trainer, metrics)
        if tensorboard(trainer) is not None and self.figures_due:
            figure = loss_vs_eps_figure(
                self.epsilons, losses, accs, mean["loss_clean"], mean["correct_clean"], critical,
                fgsm_losses or None, fgsm_accs or None, title=f"{self._mode} noise, step {trainer.global_step}",
            )  # fmt: skip
            self.add_figure(trainer, self.key("loss_vs_eps"), figure)

    @override
    def layout(self) -> dict[str, list[str]]:
        k = f"analysis/{self.name}"
        charts = {
            f"{k}/loss": [rf"^{k}/loss/eps=.*", rf"^{k}/loss_clean$"],
            f"{k}/acc": [rf"^{k}/acc/eps=.*", rf"^{k}/acc_clean$"],
            f"{k}/critical_eps": [rf"^{k}/critical_eps$"],
            f"{k}/amplification": [rf"^{k}/amplification/.*"],
        }
        if self.fgsm:
            charts[f"{k}/fgsm_loss"] = [rf"^{k}/fgsm_loss/eps=.*", rf"^{k}/loss_clean$"]
            charts[f"{k}/fgsm_acc"] = [rf"^{k}/fgsm_acc/eps=.*", rf"^{k}/acc_clean$"]
        return charts


def loss_vs_eps_figure(
    epsilons: Sequence[float],
    losses: Sequence[float],
    accs: Sequence[float],
    clean_loss: float,
    clean_acc: float,
    critical: float,
    fgsm_losses: Sequence[float] | None = None,
    fgsm_accs: Sequence[float] | None = None,
    title: str = "",
) -> Any:
    """Loss and accuracy against ε (log axis) with the clean values as horizontal lines and the critical ε marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))  # fixed margins: a layout engine costs more than the plot
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.87, wspace=0.28)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, values, fgsm, clean, label in (
        (ax_loss, losses, fgsm_losses, clean_loss, "loss"),
        (ax_acc, accs, fgsm_accs, clean_acc, "accuracy"),
    ):
        ax.plot(epsilons, values, "o-", label="Gaussian noise")
        if fgsm is not None:
            ax.plot(epsilons, fgsm, "s--", label="FGSM")
        ax.axhline(clean, color="gray", linestyle=":", label=f"clean {label}")
        if math.isfinite(critical):
            ax.axvline(critical, color="red", linestyle="--", label=f"critical ε = {critical:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("perturbation strength ε")
        ax.set_ylabel(f"mean {label}")
        ax.grid(True, which="both", alpha=0.3)
    ax_loss.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
