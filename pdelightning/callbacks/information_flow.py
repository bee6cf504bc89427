"""Information flow across depth (paper section 3.1, Tables 2 and 3, Figures 1 and 2).

For a fixed probe set, every layer's representation (the embedding ``u_0`` as layer 0, then each block's
output ``u_l``) is pooled over tokens into one vector per sample. From these ``[n, d]`` matrices the
callback measures how much consecutive layers resemble each other (Table 2), how much the same layer of two
models resemble each other (Table 3, e.g. the Transformer against the PDE model), and linear CKA with the
unbiased HSIC estimator (a similarity index that, unlike a raw correlation, is invariant to rotations and
scaling of the feature space), and draws per-layer heatmaps as in Figure 1.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.registry import TargetNotFoundError, resolve, unwrap
from pdelightning.adapters.windowed import skip_once
from pdelightning.analysis.representation import (
    CORRELATION_MODES,
    CorrelationMode,
    compare_representations,
    pool_tokens,
)
from pdelightning.callbacks._reference import import_lightning_module_class, load_reference_checkpoint
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.plots import cka_figure, heatmap_figure
from pdelightning.probing.capture import Request
from pdelightning.probing.hub import ProbeBatch, ProbeHub, ProbeSession
from pdelightning.probing.store import GatherStore

Pooling = Literal["mean", "flatten"]
POOLINGS = ("mean", "flatten")
EMBEDDING = "embedding"
DEFAULT_REFERENCE_CLASS = "pdelightning.task.ClassificationTask"
"""The class of a ``reference_checkpoint`` written by ``pdelightning fit`` (resolved only when one is loaded)."""
_REF = "reference/"


# ---- the callback ----------------------------------------------------------------------------------------
class InformationFlow(ProbeCallback):
    r"""Layer-by-layer similarity of representations, within one model and against a reference model.

    On each probe, every layer's output on the fixed probe set is pooled into one vector per sample
    (:func:`pool_tokens`: the mean over valid tokens, padding masked, or all tokens flattened) and gathered
    over ranks into ``R_l`` ``[n, d]``, ``l = 0`` being the input embedding ``u_0`` (eq. 6's initial
    condition) when the model exposes one, ``l >= 1`` the outputs ``u_l`` of the blocks (one explicit Euler
    step, eq. 20, in the PDE model). Then:

    * **consecutive correlation** (Table 2): Pearson's ``r`` between ``vec(R_{l-1})`` and ``vec(R_l)``, over
      all probe samples and features jointly (``correlation="flattened"``). The paper does not define it;
      ``correlation="per_sample"`` instead averages over samples the correlation across features of each
      sample (see :func:`layer_correlation`). Logged under the later layer ``l``.
    * **linear CKA** with the unbiased HSIC estimator (:func:`~pdelightning.analysis.cka.linear_cka`;
      Kornblith et al. 2019, Song et al. 2012, Nguyen et al. 2021) between every pair of layers: the
      consecutive values as scalars, the whole ``(L+1) x (L+1)`` matrix as a figure.
    * **against a reference model** (Table 3), run on the same probe inputs: Pearson's ``r`` and Spearman's
      ``ρ`` (``torchmetrics.functional``) between the same layer of both models, and linear CKA (which also
      compares layers of different widths; the correlations are skipped there). Layers pair by depth: the
      embeddings with each other when both models have one, block ``i`` with reference block ``i`` for
      ``i < min(L, L_ref)``. Logged under this model's layer name.
    * **heatmaps** (Figure 1): for the first ``heatmap_samples`` probe samples, one panel per layer (samples
      x features, colour scale shared along a row so that shrinking activations show), the reference model
      on a second row (Figure 2).

    Padding is the mask the model itself uses (read by its adapter) or the batch's ``attention_mask``; class and
    register tokens count as tokens. Layer outputs must be batch first, ``[B, T, d]``.

    Cost per probe: the model's forward is shared with the other callbacks, the reference's runs once; then (rank
    zero) the correlations and CKA matrices over the pooled ``[n, d]`` representations. ``pooling="flatten"`` on
    28 x 64 tokens x features costs seconds (Spearman's ranking of ``n*T*d`` values). Nothing is kept between
    probes but the probe counters.

    Args:
        reference: a second model to compare with, run on the same probe inputs (moved to this model's
            device and run in eval mode at each probe; never trained: it is not part of the LightningModule).
        reference_checkpoint: path of a checkpoint to load the reference from, with
            ``reference_class.load_from_checkpoint`` (a checkpoint written under ``pdelightning fit`` records
            its model's config; for one written outside the CLI pass ``reference=
            ClassificationTask.load_from_checkpoint(path, model=...)`` instead).
        reference_class: dotted path of the ``LightningModule`` class of ``reference_checkpoint``; default: the
            class the checkpoint names, else ``pdelightning.task.ClassificationTask``.
        reference_layers: glob of the reference's layer modules (as ``layers``, for stock reference models).
        reference_embedding: name/glob of the reference's embedding module.
        pooling: ``"mean"`` (masked mean over tokens, ``[n, d]``) or ``"flatten"`` (``[n, T*d]``, for images).
        correlation: ``"flattened"`` or ``"per_sample"``, see above; applies to all three correlations.
        unbiased: unbiased (default) or biased HSIC in CKA. The unbiased estimator needs 4 probe samples.
        heatmap_samples: probe samples (rows) in each heatmap panel.
        figures: draw the heatmaps and the CKA matrix (TensorBoard only).
        trust_checkpoint: load ``reference_checkpoint`` with ``weights_only=False``, running its pickle code; only
            for a file whose author you trust (by default it is loaded as data, and a file holding any other
            pickle global is refused with ``UntrustedFileError``).
        **kwargs: the :class:`~pdelightning.callbacks.ProbeCallback` arguments (``every_n_steps``,
            ``every_n_epochs``, ``probe_at_start``, ``probe_size``, ``probe_batch_size``, ``layers``, ``attention``,
            ``embedding``, ``seed``, ``figure_every_n_probes``).

    Raises:
        ValueError: for an unknown ``pooling`` or ``correlation``, both ``reference`` and
            ``reference_checkpoint``, a ``reference_class`` without a checkpoint or that is not a
            ``LightningModule``, ``heatmap_samples < 1``, ``probe_size < 4`` with ``unbiased``, or bad
            cadence/probe arguments.
        TargetNotFoundError: at setup, when the model (or the reference) has no layers to analyse, e.g. an
            MLP, with the list of modules seen; pass ``layers``/``embedding`` globs for other models.

    Logged metrics:
        With ``<layer>`` the later layer of each consecutive pair (``blocks.0`` is the pair
        ``embedding -> blocks.0``), or the layer of this model in a pair with the reference:

        - ``analysis/information_flow/consecutive_corr/<layer>``: Pearson ``r(R_{l-1}, R_l)`` (Table 2).
        - ``analysis/information_flow/cka_consecutive/<layer>``: ``CKA(R_{l-1}, R_l)``.
        - ``analysis/information_flow/pearson_vs_reference/<layer>``: Pearson ``r`` against the reference (Table 3).
        - ``analysis/information_flow/spearman_vs_reference/<layer>``: Spearman ``ρ`` against the reference (Table 3).
        - ``analysis/information_flow/cka_vs_reference/<layer>``: CKA against the reference's same layer.
        - figure ``analysis/information_flow/heatmaps``: per-layer heatmaps (reference on a second row).
        - figure ``analysis/information_flow/cka_matrix``: the layer x layer CKA matrix (and this model x
          reference when there is one).

    Example::

        from pdelightning.models import PDEClassifier, TransformerClassifier
        from pdelightning.task import ClassificationTask

        transformer = ClassificationTask.load_from_checkpoint("transformer.ckpt")  # or any nn.Module
        pde = ClassificationTask(PDEClassifier(num_classes=10, d_model=64, n_layers=10, image_size=28))
        trainer = L.Trainer(callbacks=[InformationFlow(reference=transformer, probe_size=256)])
        trainer.fit(pde, datamodule=mnist)  # Tables 2 and 3 as curves over training, Figure 1 as images

    or in YAML (``trainer: callbacks+:``)::

        - class_path: pdelightning.callbacks.InformationFlow
          init_args: {reference_checkpoint: logs/transformer/checkpoints/last.ckpt, every_n_epochs: 1}
    """

    name = "information_flow"
    needs = ("layers",)

    def __init__(
        self,
        reference: nn.Module | None = None,
        reference_checkpoint: str | None = None,
        reference_class: str | None = None,
        reference_layers: str | None = None,
        reference_embedding: str | None = None,
        pooling: Pooling = "mean",
        correlation: CorrelationMode = "flattened",
        unbiased: bool = True,
        heatmap_samples: int = 8,
        figures: bool = True,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("pooling", pooling, POOLINGS)
        check_choice("correlation", correlation, CORRELATION_MODES)
        if reference is not None and reference_checkpoint is not None:
            raise ValueError("give either reference (a module) or reference_checkpoint (a path), not both")
        if reference is not None and not isinstance(reference, nn.Module):
            raise ValueError(f"reference must be an nn.Module, got {type(reference).__name__}")
        if reference_class is not None and reference_checkpoint is None:
            raise ValueError(
                f"reference_class={reference_class!r} is only used with reference_checkpoint, which is not set"
            )
        if heatmap_samples < 1:
            raise ValueError(f"heatmap_samples={heatmap_samples} must be at least 1")
        if unbiased and self.probe_size < 4:
            raise ValueError(
                f"probe_size={self.probe_size} is too small: unbiased CKA needs at least 4 samples (or unbiased=False)"
            )
        self.reference_checkpoint = reference_checkpoint
        self.reference_class = reference_class
        self.trust_checkpoint = bool(trust_checkpoint)
        self._reference_cls = import_lightning_module_class(reference_class) if reference_class is not None else None
        self.reference_patterns = {"layers": reference_layers, "embedding": reference_embedding}
        self.pooling = pooling
        self.correlation = correlation
        self.unbiased = unbiased
        self.heatmap_samples = heatmap_samples
        self.figures = figures
        self._reference = reference

    # ---- setup -------------------------------------------------------------------------------------------
    @property
    def reference(self) -> nn.Module | None:
        """The reference model (loaded from ``reference_checkpoint`` at setup), or ``None``."""
        return self._reference

    def _load_reference(self) -> nn.Module:
        # without reference_class: the class the checkpoint names, else the default (a dotted path resolved like a
        # user's reference_class: no import of the task layer)
        return load_reference_checkpoint(
            self.reference_checkpoint,
            self._reference_cls,
            default=import_lightning_module_class(DEFAULT_REFERENCE_CLASS),
            hint="pass the module itself as reference=",  # type: ignore[arg-type]
            trust=self.trust_checkpoint,
        )

    def reference_targets(self, reference: nn.Module) -> AnalysisTargets:
        """Resolve the reference model's layers (``reference_layers``/``reference_embedding`` globs first)."""
        try:
            return resolve(reference, need=("layers",), **self.reference_patterns)[1]
        except TargetNotFoundError as err:
            raise TargetNotFoundError(
                f"reference model: {err} (set reference_layers / reference_embedding for the reference)"
            ) from err

    @override
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().check(trainer, pl_module)
        if self._reference is None and self.reference_checkpoint is not None:
            self._reference = self._load_reference()
        if self._reference is not None:
            self.reference_targets(self._reference)  # fail fast, before any training

    # ---- measuring ---------------------------------------------------------------------------------------
    @staticmethod
    def layer_names(targets: AnalysisTargets) -> list[str]:
        """``["embedding", <layer names>...]`` (no ``"embedding"`` when the model exposes none)."""
        return ([EMBEDDING] if targets.embedding is not None else []) + [t.name for t in targets.layers]

    @override
    def request(self) -> Request:
        return Request(hidden=True, embedding=True)

    @override
    def extra_models(self, pl_module: nn.Module) -> dict[str, tuple[nn.Module, Request]]:
        if self._reference is None:
            return {}
        return {f"reference:{id(self._reference)}": (unwrap(self._reference), Request(hidden=True, embedding=True))}

    @override
    def begin(self, session: ProbeSession) -> None:
        self._names = self.layer_names(session.targets["model"])
        self._ref_key = f"reference:{id(self._reference)}" if self._reference is not None else None
        self._ref_names: list[str] = []
        if self._ref_key is not None:
            if any(v is not None for v in self.reference_patterns.values()):
                session.targets[self._ref_key] = self.reference_targets(session.modules[self._ref_key])
            self._ref_names = self.layer_names(session.targets[self._ref_key])
        keys = self._names + [_REF + n for n in self._ref_names]
        self._store = GatherStore(keys).to(session.device)

    def _pool(self, captured: Any, names: list[str], pad: Tensor | None) -> dict[str, Tensor]:
        hidden = dict(captured.hidden)
        if captured.embedding is not None:
            hidden[EMBEDDING] = captured.embedding
        missing = [n for n in names if n not in hidden]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: layers {missing} produced no output in the probe forward")
        out = {}
        for n in names:
            h = hidden[n]
            mask = pad if pad is not None and h.dim() == 3 and pad.shape == h.shape[:2] else None
            out[n] = pool_tokens(h, mask, self.pooling).float()
        return out

    @override
    def consume(self, pb: ProbeBatch) -> None:
        pad = ~pb.valid if pb.valid is not None else None
        pooled = self._pool(pb.captured["model"], self._names, pad)
        if self._ref_key is not None:
            ref = self._pool(pb.captured[self._ref_key], self._ref_names, pad)
            pooled |= {_REF + k: v for k, v in ref.items()}
        self._store.update(pb.index, **pooled)

    def gather(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """Pooled representations of the whole probe set, ``{layer: [n, d]}``, identical on every rank.

        Reference layers are prefixed ``"reference/"``. Runs a probe of this callback alone (a collective).
        """
        captured: dict[str, dict[str, Tensor]] = {}
        original = self.finish

        def keep(session: ProbeSession) -> None:
            captured["reps"] = self._store.gather()

        self.finish = keep  # type: ignore[method-assign]
        try:
            ProbeHub.of(trainer).run(trainer, pl_module, [self], final=False)
        finally:
            self.finish = original  # type: ignore[method-assign]
        return captured["reps"]

    def measure(self, reps: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """Scalars ``{key: value}``, the layer CKA matrix and the model x reference CKA matrix from :meth:`gather`."""
        names = [k for k in reps if not k.startswith(_REF)]
        ref_names = [k[len(_REF) :] for k in reps if k.startswith(_REF)]
        ys = [reps[_REF + r] for r in ref_names]
        cmp = compare_representations([reps[n] for n in names], names, ys, ref_names, self.correlation, self.unbiased)
        for later in cmp.mismatched:
            skip_once(
                self,
                f"consecutive_corr of {later}",
                "it and the layer before differ in width (patch "
                "merging between stages); cka_consecutive, which compares any widths, is logged",
            )
        return {self.key(q, layer): v for q, layer, v in cmp.values}, cmp.matrix, cmp.cross

    @override
    def finish(self, session: ProbeSession) -> None:
        reps = self._store.gather()  # collective on every rank; the rest is rank-zero output
        self._store = None  # type: ignore[assignment]
        self.last_reps = reps
        trainer = session.trainer
        if not trainer.is_global_zero:
            return
        # float64 math below: stay on CUDA (fast ranking for Spearman), else the CPU (MPS has no float64)
        reps = {k: v if v.device.type in ("cpu", "cuda") else v.cpu() for k, v in reps.items()}
        n = next(iter(reps.values())).shape[0]
        if n < (4 if self.unbiased else 2):
            rank_zero_warn(f"{type(self).__name__}: only {n} probe samples, too few for CKA; CKA is skipped")
        scalars, matrix, cross = self.measure(reps)
        self.log_scalars(trainer, scalars, session.step)
        if self.figures and self.figures_due:
            names = [k for k in reps if not k.startswith(_REF)]
            ref_names = [k[len(_REF) :] for k in reps if k.startswith(_REF)]
            k = self.heatmap_samples
            rows = [("model", [reps[n][:k].cpu() for n in names], names)]
            if ref_names:
                rows.append(("reference", [reps[_REF + r][:k].cpu() for r in ref_names], ref_names))
            self.figure(session, self.key("heatmaps"), heatmap_figure, rows, k)
            if matrix is not None:
                m, c = matrix.cpu(), cross.cpu() if cross is not None else None
                self.figure(session, self.key("cka_matrix"), cka_figure, names, m, ref_names, c)

    # ---- output ----------------------------------------------------------------------------------------
    @override
    def layout(self) -> dict[str, list[str]]:
        prefix = f"analysis/{self.name}"
        charts = {
            "consecutive-layer correlation": [rf"{prefix}/consecutive_corr/.*"],
            "consecutive-layer CKA": [rf"{prefix}/cka_consecutive/.*"],
        }
        if self._reference is not None or self.reference_checkpoint is not None:
            charts |= {
                "Pearson vs reference": [rf"{prefix}/pearson_vs_reference/.*"],
                "Spearman vs reference": [rf"{prefix}/spearman_vs_reference/.*"],
                "CKA vs reference": [rf"{prefix}/cka_vs_reference/.*"],
            }
        return charts
