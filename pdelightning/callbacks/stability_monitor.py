"""Numerical stability of the layer map during training: eq. (21), spectral norms, drift, and the loss.

Theorem 2 of the paper (appendix A.5) bounds the explicit Euler step of eq. (20):

    2 D_l Δt / Δx² + α_l Δt ||W^O||_2 <= 1,                                        (21)

with ``||W^O||_2`` the spectral norm of the attention output projection. The v2 thesis is that in a
Transformer the residual connections and LayerNorm play the stabilizer's role; :class:`StabilityMonitor`
therefore also tracks, for any attention model, the spectral norms of ``W^O`` and of the composed value-output
map ``W^O W^V``, how far each layer's representation drifts from the input embedding ``u_0``, how its RMS
grows with depth, and the training loss (non-finite values, spikes against a running average).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning.pytorch as L
from torch import Tensor
from typing_extensions import override

from pdelightning.adapters.windowed import skip_once
from pdelightning.analysis.stability import (
    attention_spectra,
    eq21_number,
    representation_sums,
    scan_losses,
    summarize_representations,
)
from pdelightning.callbacks._stability import (
    CHART_TITLES,
    NO_DRIFT,
    NO_LOSS,
    Flags,
    LossWindow,
    check_arguments,
    loss_events,
    warn_missing_weights,
)
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.probing.capture import Request
from pdelightning.probing.guard import agree
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.store import GatherStore
from pdelightning.utils import warn_once

_EMBEDDING = "embedding"


class StabilityMonitor(ProbeCallback):
    """Watch the quantities that decide whether the layer map stays stable, and warn or stop when one crosses its bound.

    At each probe (cadence of :class:`~pdelightning.callbacks.ProbeCallback`, step 0 included):

    * **eq. (21)** on PDE layers (``LayerTarget.pde`` set): ``2 D Δt / Δx² + |α| Δt ||W^O||_2`` with ``D`` the
      largest diffusion coefficient, flagged when above ``threshold`` (default 1, the theorem's bound).
    * **spectral norms** ``||W^O||_2`` and ``||W^O W^V||_2`` (composed value-output map; nn.Linear convention
      ``W_O @ W_V``, grouped key/value heads repeated) for every layer with attention, exact
      (:func:`~pdelightning.analysis.stability.exact_spectral_norm`: an SVD up to 512 x 512, above it a subspace
      iteration run to a relative tolerance of 1e-4; a warm-started power iteration of a fixed few steps reads
      low when the top singular values are close, and eq. (21) would read low with it). ``W^O`` is found by the model's
      adapter (``out_proj``, ``o_proj``, ``c_proj``, ``proj``, BERT's ``attention.output.dense``, TransformerLens'
      ``W_O``). Layers without an attention output projection are skipped.
    * **representations** on the fixed probe set, over the valid (non-padding) tokens: relative drift
      ``||h_l - u_0||_F / ||u_0||_F`` over the whole probe set (:func:`relative_drift`; only for layers whose
      output has ``u_0``'s shape), linear CKA (unbiased HSIC) between token-averaged ``h_l`` and ``u_0``, RMS
      ``sqrt(mean h_l²)`` and its growth ``rms_l / rms_0``, and the fraction of non-finite values (the first
      layer, in depth order, that has any is named). ``u_0`` is the input of the first layer as the adapter
      defines it (our ``hook_embed``; the first block's input, class tokens included, for other families).

    The training loss (``outputs["loss"]`` of ``on_train_batch_end``) is examined for EVERY batch without a
    host sync: each batch's loss is copied into a small device buffer, and every ``check_every_n_steps`` batches
    (and at epoch end) the buffer is read once (summed across ranks under DDP, so all ranks judge the global
    mean loss) and scanned by :func:`scan_losses` for non-finite values and spikes (``loss > spike_factor ×
    EMA``). ``check_every_n_steps=1`` reacts on the very batch at the cost of one device sync per batch; the
    default 10 keeps the hot path sync-free at a delay of at most 9 batches. With gradient accumulation the
    loss is Lightning's (divided by the number of accumulated batches). Under manual optimisation
    (``automatic_optimization = False``) a ``training_step`` that returns no loss is checked on the losses it gives
    to ``manual_backward`` (their mean, when it calls it more than once); with neither, the loss checks log nothing
    and say so once.

    ``action="warn"`` warns (once per layer while a flag stays on; every spike window) naming the layer and
    quantity, e.g. ``StabilityMonitor: blocks.2 eq21_number=1.37 > 1.0``. ``action="stop"`` also sets
    ``trainer.should_stop`` (the decision shared across ranks with ``reduce_boolean_decision``), so training
    ends through Lightning's normal path (checkpoints and logs kept); :attr:`stop_reason` keeps the message.
    Every detected event acts: eq. (21) exceeded, non-finite loss or activations, and loss spikes (set
    ``spike_factor=None`` to stop only on the others).

    Needs layers: a model without any (a plain MLP) fails at ``setup`` with
    :class:`~pdelightning.callbacks._targets.TargetNotFoundError` unless a ``layers`` glob is given, in which case
    the attention quantities are skipped and the representation quantities are logged.

    Args:
        threshold: bound for the eq. (21) number.
        action: ``"warn"`` or ``"stop"``.
        check_every_n_steps: read the buffered training losses every ``n`` batches.
        spike_factor: a loss above ``spike_factor × EMA`` is a spike (``> 1``); ``None`` disables spike detection.
        ema_decay: decay of the loss EMA, in ``[0, 1)``.
        spike_warmup: losses the EMA must have seen before spikes are flagged.
        spike_atol: a spike must also rise at least this much above the EMA (in loss units; 1 nat by default).
        **kwargs: the :class:`~pdelightning.callbacks.ProbeCallback` arguments (``every_n_steps``,
            ``every_n_epochs``, ``probe_at_start``, ``probe_size``, ``probe_batch_size``, ``layers``, ``attention``,
            ``embedding``, ``seed``, ``figure_every_n_probes``).

    Raises:
        ValueError: for an unknown ``action`` or out-of-range numbers (and the base class's checks).
        TargetNotFoundError: at ``setup`` when no layers can be found.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[StabilityMonitor(action="stop", every_n_steps=100, probe_size=128)])

    Logged metrics:
        At probes (rank zero, at ``global_step``):

        * ``analysis/stability_monitor/eq21/<layer>``: PDE layers only.
        * ``analysis/stability_monitor/W_O_spectral/<layer>``, ``analysis/stability_monitor/W_VO_spectral/<layer>``:
          layers with attention.
        * ``analysis/stability_monitor/drift/<layer>``, ``analysis/stability_monitor/cka_to_embedding/<layer>``,
          ``analysis/stability_monitor/rms_growth/<layer>``.
        * secondary, under ``analysis/stability_monitor/detail/``: ``eq21_exceeded/<layer>`` (0/1, PDE layers
          only); ``rms/<layer>`` (and ``rms/embedding`` for ``u_0``); ``nonfinite/<layer>`` (and
          ``nonfinite/embedding``): fraction of non-finite values in the layer's output over the probe set.

        At loss checks (every ``check_every_n_steps`` batches and at epoch end), under
        ``analysis/stability_monitor/detail/``:

        * ``loss_ema``: the running average of the training loss.
        * ``loss_spike``: 1 if a loss since the last check was a spike, else 0.
        * ``nonfinite``: 1 if a loss since the last check was non-finite, else 0.

        A value that is undefined (e.g. drift of a layer whose output is not finite) is not logged (said once in
        the log); the ``nonfinite`` fractions say why.
    """

    name = "stability_monitor"
    needs = ("layers",)
    detail = ("eq21_exceeded", "rms", "nonfinite", "loss_ema", "loss_spike")
    undefined: ClassVar[dict[str, str]] = {
        "rms_growth": "the embedding u_0 has RMS 0 (or a non-finite one)",
        "drift": "the layer's output or u_0 holds non-finite values (see detail/nonfinite)",
        "cka_to_embedding": "the layer's output or u_0 holds non-finite values, or has no variance",
        "rms": "the layer's output holds non-finite values (see detail/nonfinite)",
        "loss_ema": "the training loss was non-finite",
    }

    def __init__(
        self,
        threshold: float = 1.0,
        action: Literal["warn", "stop"] = "warn",
        check_every_n_steps: int = 10,
        spike_factor: float | None = 3.0,
        ema_decay: float = 0.98,
        spike_warmup: int = 20,
        spike_atol: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_arguments(threshold, action, check_every_n_steps, spike_factor, ema_decay, spike_warmup, spike_atol)
        self.spike_atol = spike_atol
        self.threshold = threshold
        self.action = action
        self.check_every_n_steps = check_every_n_steps
        self.spike_factor = spike_factor
        self.ema_decay = ema_decay
        self.spike_warmup = spike_warmup
        # history (state_dict)
        self.loss_ema: float | None = None
        self.ema_count = 0
        self.last_spike_step: int | None = None
        # the losses since the last check, on the device (persisted: a resumed run checks them too)
        self._window = LossWindow(check_every_n_steps)
        self._flags = Flags()  # the events that are on (warned once while on), and why training stopped
        self._last_check: tuple[int, dict[str, float]] | None = None

    # ---- state -----------------------------------------------------------------------------------------
    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "loss_ema": self.loss_ema,
            "ema_count": self.ema_count,
            "last_spike_step": self.last_spike_step,
            "active": sorted(self._flags.active),
            **self._window.state(),  # the losses buffered since the last check (a NaN there is not lost on resume)
            "last_check": list(self._last_check) if self._last_check is not None else None,
        }

    @override
    def load_extra_state(self, state_dict: dict[str, Any]) -> None:
        self.loss_ema = state_dict["loss_ema"]
        self.ema_count = state_dict["ema_count"]
        self.last_spike_step = state_dict["last_spike_step"]
        self._flags.active = set(state_dict.get("active", []))
        self._window.load(state_dict)
        last = state_dict.get("last_check")
        self._last_check = (int(last[0]), dict(last[1])) if last else None

    def layout(self) -> dict[str, list[str]]:
        """Custom-scalars charts: one per per-layer quantity, and one for the loss checks (only those logged show)."""
        charts = {title: [rf"^{self.key(q)}/[^/]+$"] for q, title in CHART_TITLES.items()}
        charts["loss checks"] = [rf"^{self.key(q)}$" for q in ("loss_ema", "loss_spike", "nonfinite")]
        return charts

    @property
    def stop_reason(self) -> str | None:
        """The message of the event that stopped training (``action="stop"``), or ``None``."""
        return self._flags.stop_reason

    # ---- probe -----------------------------------------------------------------------------------------
    def _weights(self, session: ProbeSession, metrics: dict[str, float], events: list[tuple[str, str]]) -> None:
        weights = session.full_weights()  # whole even under FSDP: gathered once per probe, shared
        warn_missing_weights(self, weights)
        for layer in session.targets["model"].layers:
            w_o, w_v = weights[layer.name]
            if w_o is None:
                continue
            s_o, s_vo = attention_spectra(w_o, w_v)
            metrics[self.key("W_O_spectral", layer.name)] = s_o
            if s_vo is not None:
                metrics[self.key("W_VO_spectral", layer.name)] = s_vo
            if layer.pde is not None:
                p = layer.pde
                number = eq21_number(p.diffusion, p.alpha, p.dt, p.dx, s_o)
                exceeded = not number <= self.threshold
                metrics[self.key("eq21", layer.name)] = number
                metrics[self.key("eq21_exceeded", layer.name)] = float(exceeded)
                if exceeded:
                    message = f"StabilityMonitor: {layer.name} eq21_number={number:.4g} > {self.threshold}"
                    events.append((f"eq21:{layer.name}", message))

    @override
    def request(self) -> Request:
        return Request(hidden=True, embedding=True)

    @override
    def begin(self, session: ProbeSession) -> None:
        targets = session.targets["model"]
        self._names = [_EMBEDDING] + [t.name for t in targets.layers]
        keys = [f"{q}/{n}" for n in self._names for q in ("sq", "cnt", "bad", "pool")]
        keys += [f"diff/{n}" for n in self._names[1:]]
        self._store = GatherStore(keys).to(session.device)

    @override
    def consume(self, pb: ProbeBatch) -> None:
        captured = pb.captured["model"]
        if captured.embedding is None:
            raise RuntimeError("StabilityMonitor: the input embedding u_0 produced no output during the probe forward")
        missing = [n for n in self._names[1:] if n not in captured.hidden]
        if missing:
            raise RuntimeError(f"StabilityMonitor: layers {missing} produced no output during the probe forward")
        u0 = captured.embedding.float()
        update = representation_sums(_EMBEDDING, u0, None, pb.valid)
        for n in self._names[1:]:
            update.update(representation_sums(n, captured.hidden[n].float(), u0, pb.valid))
        self._store.update(pb.index, **update)

    @override
    def finish(self, session: ProbeSession) -> None:
        trainer, names = session.trainer, self._names
        metrics: dict[str, float] = {}
        events: list[tuple[str, str]] = []
        self._weights(session, metrics, events)
        out = self._store.gather()  # collective: every rank, same values
        self._store = None  # type: ignore[assignment]
        no_drift: list[str] = []
        for layer in summarize_representations(out, names):
            n = layer.name
            if n == _EMBEDDING:
                metrics[self.key("rms", n)] = layer.rms
            metrics[self.key("nonfinite", n)] = layer.nonfinite
            if layer.bad > 0 and not any(f.startswith("act:") for f, _ in events):  # name the first layer only
                message = f"StabilityMonitor: {n} nonfinite_activations={layer.bad:g} > 0 (of {layer.count:g} values)"
                events.append((f"act:{n}", message))
            if n == _EMBEDDING:
                continue
            metrics[self.key("rms", n)] = layer.rms
            metrics[self.key("rms_growth", n)] = layer.rms_growth  # type: ignore[assignment]
            if layer.drift is None:
                no_drift.append(n)
            else:
                metrics[self.key("drift", n)] = layer.drift
            if layer.cka is not None:
                metrics[self.key("cka_to_embedding", n)] = layer.cka
        if no_drift:
            skip_once(self, "drift", NO_DRIFT.format(no_drift))
        self._flags.act(trainer, events, scope=("eq21:", "act:"), action=self.action)
        self.log_scalars(trainer, metrics, session.step)

    # ---- the training loss -----------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window.start(pl_module.device)  # resumed: the losses of the unfinished window come first
        if self._last_check is not None and 0 < trainer.global_step == self._last_check[0]:
            self.log_scalars(trainer, self._last_check[1])  # purged at the resume step with the next batch's logs
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._window.batch_start(trainer.global_step)  # the step of this batch's loss (``self.global_step``)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """Under manual optimisation, the losses the step gives to ``manual_backward`` (a device copy, no sync)."""
        if not pl_module.automatic_optimization:
            self._window.backward(loss)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._window.batch_end(outputs):
            self._check_losses(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._window.slots:
            self._check_losses(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def _check_losses(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with self.guarded("the loss check", trainer):  # rank-local; the ranks agree on failures before the reduce
            both = self._window.stacked(pl_module.device)
        if trainer.world_size > 1:
            agree(trainer, [self])
        if self.failed:
            return
        both = trainer.strategy.reduce(both, reduce_op="sum")  # all ranks: the global mean loss of each batch
        kept = self._window.drain(*both.tolist())
        spikes = (self.ema_decay, self.spike_factor, self.spike_warmup, self.spike_atol)
        scan = scan_losses([v for v, _ in kept], self.loss_ema, self.ema_count, *spikes)
        self.loss_ema, self.ema_count = scan.ema, scan.count
        if scan.spikes:
            self.last_spike_step = kept[scan.spikes[-1][0]][1]
        events = loss_events(scan, kept, self.spike_factor, self.spike_atol)
        self._flags.act(trainer, events, ("loss:",), self.action)
        if not kept:  # no rank had a loss in this window: nothing was checked, so nothing is logged
            if self.loss_ema is None:
                warn_once(self, "loss", NO_LOSS)
            return
        metrics = {self.key("loss_spike"): float(bool(scan.spikes)), self.key("nonfinite"): float(bool(scan.nonfinite))}
        if self.loss_ema is not None:
            metrics[self.key("loss_ema")] = self.loss_ema
        self.log_scalars(trainer, metrics)
        self._last_check = (trainer.global_step, metrics)
