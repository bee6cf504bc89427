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

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.base import OUT_PROJ_NAMES, QKV_NAMES, VALUE_NAMES
from pdelightning.adapters.windowed import skip_once
from pdelightning.analysis.cka import cka_matrix
from pdelightning.analysis.representation import pool_tokens
from pdelightning.analysis.stability import (  # noqa: F401 (moved there; the old import path keeps working)
    LossScan,
    eq21_number,
    exact_spectral_norm,
    relative_drift,
    scan_losses,
    spectral_norm_power,
)
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.probing.capture import Request
from pdelightning.probing.guard import agree
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.store import GatherStore
from pdelightning.utils import warn_once

ACTIONS = ("warn", "stop")
_EMBEDDING = "embedding"


# ---- pure math ------------------------------------------------------------------------------------------


def _sample_stats(name: str, h: Tensor, u0: Tensor | None, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample sums that add up, over the gathered probe set, to the representation statistics of one layer.

    Over the valid (non-padding) tokens when ``valid`` ``[B, T]`` matches ``h``. ``sq``: sum of squares; ``cnt``:
    number of values; ``bad``: number of non-finite values; ``pool``: the token-averaged vector (for CKA); ``diff``:
    ``||h - u_0||²`` (``-1`` when ``h`` and ``u_0`` differ in shape).
    """
    keep = valid.to(h.dtype)[..., None] if valid is not None and h.dim() == 3 and valid.shape == h.shape[:2] else None
    masked = h if keep is None else torch.where(keep > 0, h, torch.zeros_like(h))
    flat = masked.flatten(1)
    per_token = h.shape[-1] if h.dim() == 3 else 1
    count = keep.sum((1, 2)) * per_token if keep is not None else torch.full((h.shape[0],), float(flat.shape[1]))
    stats = {
        f"sq/{name}": flat.pow(2).sum(1),
        f"cnt/{name}": count.to(h.device).float(),
        f"bad/{name}": (~torch.isfinite(flat)).sum(1).float(),
        f"pool/{name}": pool_tokens(h, None if keep is None else ~valid.bool()),  # type: ignore[union-attr]
    }
    if u0 is not None:
        same = h.shape == u0.shape
        diff = (masked - (u0 if keep is None else u0 * keep)).flatten(1) if same else None
        stats[f"diff/{name}"] = diff.pow(2).sum(1) if diff is not None else torch.full_like(stats[f"sq/{name}"], -1.0)
    return stats


# ---- the callback ---------------------------------------------------------------------------------------
class StabilityMonitor(ProbeCallback):
    """Watch the quantities that decide whether the layer map stays stable, and warn or stop when one crosses its bound.

    At each probe (cadence of :class:`~pdelightning.callbacks._probe.ProbeCallback`, step 0 included):

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
        **kwargs: the :class:`~pdelightning.callbacks._probe.ProbeCallback` arguments (``every_n_steps``,
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
        check_choice("action", action, ACTIONS)
        if not threshold > 0:
            raise ValueError(f"threshold={threshold} must be positive (eq. 21 bounds the step number by 1)")
        if not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps!r} must be a positive integer")
        if spike_factor is not None and not spike_factor > 1:
            raise ValueError(f"spike_factor={spike_factor} must be > 1, or None to disable spike detection")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
        if spike_warmup < 0:
            raise ValueError(f"spike_warmup={spike_warmup} must be >= 0")
        if spike_atol < 0:
            raise ValueError(f"spike_atol={spike_atol} must be >= 0")
        self.spike_atol = spike_atol
        self.threshold = threshold
        self.action = action
        self.check_every_n_steps = check_every_n_steps
        self.spike_factor = spike_factor
        self.ema_decay = ema_decay
        self.spike_warmup = spike_warmup
        self.stop_reason: str | None = None
        # history (state_dict)
        self.loss_ema: float | None = None
        self.ema_count = 0
        self.last_spike_step: int | None = None
        # per-window loss buffer (not persisted: at most check_every_n_steps - 1 losses)
        self._buffer: Tensor | None = None
        self._slots: list[int | None] = []  # global step of each buffered loss, None where a batch had none
        self._batch_step = 0
        self._backward: list[Tensor] = []  # losses given to manual_backward in this batch (manual optimisation)
        self._active: set[str] = set()
        self._restored_window: tuple[list[float], list[int | None]] = ([], [])
        self._last_check: tuple[int, dict[str, float]] | None = None

    # ---- state -----------------------------------------------------------------------------------------
    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "loss_ema": self.loss_ema,
            "ema_count": self.ema_count,
            "last_spike_step": self.last_spike_step,
            "active": sorted(self._active),
            # the losses buffered since the last check: a resumed run checks them too (a NaN there is not lost)
            "window": [float(v) for v in self._buffer[: len(self._slots)].tolist()] if self._buffer is not None else [],
            "slots": list(self._slots),
            "last_check": list(self._last_check) if self._last_check is not None else None,
        }

    @override
    def load_extra_state(self, state_dict: dict[str, Any]) -> None:
        self.loss_ema = state_dict["loss_ema"]
        self.ema_count = state_dict["ema_count"]
        self.last_spike_step = state_dict["last_spike_step"]
        self._active = set(state_dict.get("active", []))
        self._restored_window = (list(state_dict.get("window", [])), list(state_dict.get("slots", [])))
        last = state_dict.get("last_check")
        self._last_check = (int(last[0]), dict(last[1])) if last else None

    def layout(self) -> dict[str, list[str]]:
        """Custom-scalars charts: one per per-layer quantity, and one for the loss checks (only those logged show)."""
        titles = {
            "eq21": "eq. (21) per PDE layer (stable <= 1)",
            "W_O_spectral": "||W^O||_2 per layer",
            "W_VO_spectral": "||W^O W^V||_2 per layer",
            "drift": "relative drift from u_0 per layer",
            "cka_to_embedding": "CKA to u_0 per layer",
            "rms_growth": "rms growth rms_l / rms_0 per layer",
        }
        charts = {title: [rf"^{self.key(q)}/[^/]+$"] for q, title in titles.items()}
        charts["loss checks"] = [rf"^{self.key(q)}$" for q in ("loss_ema", "loss_spike", "nonfinite")]
        return charts

    # ---- events ----------------------------------------------------------------------------------------
    def _act(self, trainer: L.Trainer, events: list[tuple[str, str]], scope: tuple[str, ...]) -> None:
        """Warn about new events and, for ``action="stop"``, share the stop decision across ranks.

        ``events`` are ``(flag, message)`` pairs, identical on every rank (computed from gathered or reduced
        values); every rank calls this at the same points. A flag warns when it turns on and stays quiet while
        it stays on; ``scope`` lists the flag prefixes this call is authoritative for (flags of that scope that
        are absent now are cleared). Spikes warn every time.
        """
        step = trainer.global_step
        for flag, message in events:
            if flag not in self._active or flag == "spike":
                rank_zero_warn(f"{message} at step {step}" + ("; stopping training" if self.action == "stop" else ""))
        self._active = {f for f in self._active if not f.startswith(scope)} | {f for f, _ in events if f != "spike"}
        if self.action == "stop":
            stop = trainer.strategy.reduce_boolean_decision(bool(events), all=False)
            if stop:
                trainer.should_stop = True
                if self.stop_reason is None:
                    self.stop_reason = events[0][1] if events else "StabilityMonitor: stop requested by another rank"

    # ---- probe -----------------------------------------------------------------------------------------
    @staticmethod
    def _norm(matrix: Tensor) -> float:
        if not bool(torch.isfinite(matrix).all()):
            return float("inf")
        return float(exact_spectral_norm(matrix.detach()).sigma)

    def _weights(self, session: ProbeSession, metrics: dict[str, float], events: list[tuple[str, str]]) -> None:
        targets = session.targets["model"]
        weights = session.full_weights()  # whole even under FSDP: gathered once per probe, shared
        no_o = [name for name, (w_o, _) in weights.items() if w_o is None]
        no_v = [name for name, (w_o, w_v) in weights.items() if w_o is not None and w_v is None]
        if no_o:
            warn_once(
                self,
                "W_O",
                f"StabilityMonitor: no attention output projection W^O found for layers {no_o} (looked for children "
                f"of their attention module named {list(OUT_PROJ_NAMES)}, and BERT's output.dense); W_O_spectral, "
                "W_VO_spectral and eq21 are not logged for them",
            )
        if no_v:
            warn_once(
                self,
                "W_V",
                f"StabilityMonitor: no value projection W_V found for layers {no_v} (looked for children of their "
                f"attention module named {list(VALUE_NAMES)} or a fused {list(QKV_NAMES)}); W_VO_spectral is not "
                "logged for them",
            )
        for layer in targets.layers:
            w_o, w_v = weights[layer.name]
            if w_o is None:
                continue
            with torch.no_grad():
                s_o = self._norm(w_o.detach().float())
                metrics[self.key("W_O_spectral", layer.name)] = s_o
                if w_v is not None and w_v.shape[0] == w_o.shape[1]:
                    w_vo = w_o.detach().float() @ w_v.detach().float()
                    metrics[self.key("W_VO_spectral", layer.name)] = self._norm(w_vo)
            if layer.pde is not None:
                p = layer.pde
                number = eq21_number(p.diffusion, p.alpha, p.dt, p.dx, s_o)
                exceeded = not number <= self.threshold
                metrics[self.key("eq21", layer.name)] = number
                metrics[self.key("eq21_exceeded", layer.name)] = float(exceeded)
                if exceeded:
                    events.append(
                        (
                            f"eq21:{layer.name}",
                            f"StabilityMonitor: {layer.name} eq21_number={number:.4g} > {self.threshold}",
                        )
                    )

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
        update = _sample_stats(_EMBEDDING, u0, None, pb.valid)
        for n in self._names[1:]:
            update.update(_sample_stats(n, captured.hidden[n].float(), u0, pb.valid))
        self._store.update(pb.index, **update)

    @override
    def finish(self, session: ProbeSession) -> None:
        trainer, names = session.trainer, self._names
        metrics: dict[str, float] = {}
        events: list[tuple[str, str]] = []
        self._weights(session, metrics, events)
        out = self._store.gather()  # collective: every rank, same values
        self._store = None  # type: ignore[assignment]
        rms0 = math.sqrt(float(out[f"sq/{_EMBEDDING}"].sum() / out[f"cnt/{_EMBEDDING}"].sum().clamp_min(1)))
        metrics[self.key("rms", _EMBEDDING)] = rms0
        n_samples = out[f"pool/{_EMBEDDING}"].shape[0]
        cka = (
            cka_matrix([out[f"pool/{_EMBEDDING}"]], [out[f"pool/{n}"] for n in names[1:]])[0]
            if n_samples >= 4
            else None
        )
        no_drift: list[str] = []
        for i, n in enumerate(names):
            count = float(out[f"cnt/{n}"].sum())
            bad = float(out[f"bad/{n}"].sum())
            metrics[self.key("nonfinite", n)] = bad / max(count, 1.0)
            if bad > 0 and not any(f.startswith("act:") for f, _ in events):  # name the first layer only
                events.append(
                    (f"act:{n}", f"StabilityMonitor: {n} nonfinite_activations={bad:g} > 0 (of {count:g} values)")
                )
            if n == _EMBEDDING:
                continue
            rms = math.sqrt(float(out[f"sq/{n}"].sum()) / max(count, 1.0))
            metrics[self.key("rms", n)] = rms
            metrics[self.key("rms_growth", n)] = rms / rms0 if rms0 > 0 else float("nan")
            diff = out[f"diff/{n}"]
            if bool((diff < 0).any()):
                no_drift.append(n)
            else:
                metrics[self.key("drift", n)] = math.sqrt(float(diff.sum())) / max(
                    math.sqrt(float(out[f"sq/{_EMBEDDING}"].sum())), 1e-30
                )
            if cka is not None:
                metrics[self.key("cka_to_embedding", n)] = float(cka[i - 1])
        if no_drift:
            skip_once(
                self,
                "drift",
                f"the outputs of {no_drift} differ in shape from the embedding u_0 (stages after "
                "patch merging have other tokens and width); their rms_growth and cka_to_embedding are logged",
            )
        self._act(trainer, events, scope=("eq21:", "act:"))
        self.log_scalars(trainer, metrics, session.step)

    # ---- the training loss -----------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._buffer, self._slots = None, []
        window, slots = self._restored_window
        if slots:  # resumed: the losses of the unfinished window come first
            self._buffer = torch.zeros(self.check_every_n_steps, device=pl_module.device)
            self._buffer[: len(window)] = torch.tensor(window, device=pl_module.device)
            self._slots = slots
        self._restored_window = ([], [])
        if self._last_check is not None and 0 < trainer.global_step == self._last_check[0]:
            self.log_scalars(trainer, self._last_check[1])  # purged at the resume step with the next batch's logs
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = (
            trainer.global_step
        )  # the step this batch's loss belongs to (``self.global_step`` in training_step)
        self._backward = []

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """Under manual optimisation, the losses the step gives to ``manual_backward`` (a device copy, no sync)."""
        if not pl_module.automatic_optimization and isinstance(loss, Tensor) and loss.numel() == 1:
            self._backward.append(loss.detach().float().reshape(()))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) and self._backward:  # manual optimisation, training_step returned no loss
            loss = torch.stack(self._backward).mean()
        self._backward = []
        if isinstance(loss, Tensor):
            if self._buffer is None:
                self._buffer = torch.zeros(self.check_every_n_steps, device=loss.device)
            self._buffer[len(self._slots)] = loss.detach().reshape(())  # a device copy, no sync
            self._slots.append(self._batch_step)
        else:
            self._slots.append(None)
        if len(self._slots) >= self.check_every_n_steps:
            self._check_losses(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._slots:
            self._check_losses(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def _check_losses(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = len(self._slots)
        with self.guarded("the loss check", trainer):  # rank-local; the ranks agree on failures before the reduce
            device = self._buffer.device if self._buffer is not None else pl_module.device
            have = torch.tensor([s is not None for s in self._slots], dtype=torch.float32, device=device)
            values = self._buffer[:n] if self._buffer is not None else torch.zeros(n, device=device)
            both = torch.stack([torch.where(have > 0, values, torch.zeros_like(values)), have])
        if trainer.world_size > 1:
            agree(trainer, [self])
        if self.failed:
            return
        both = trainer.strategy.reduce(both, reduce_op="sum")  # all ranks: the global mean loss of each batch
        sums, counts = both.tolist()
        if self._buffer is not None:
            self._buffer.zero_()
        steps = self._slots
        self._slots = []
        kept = [(s / c, steps[i]) for i, (s, c) in enumerate(zip(sums, counts, strict=True)) if c > 0]
        scan = scan_losses(
            [v for v, _ in kept], self.loss_ema, self.ema_count, self.ema_decay, self.spike_factor, self.spike_warmup,
            self.spike_atol,
        )  # fmt: skip
        self.loss_ema, self.ema_count = scan.ema, scan.count
        events: list[tuple[str, str]] = []
        if scan.nonfinite:
            i, value = scan.nonfinite[0]
            events.append(
                ("loss:nonfinite", f"StabilityMonitor: loss={value} is non-finite (batch of step {kept[i][1]})")
            )
        if scan.spikes:
            i, value, ema = scan.spikes[0]
            self.last_spike_step = kept[scan.spikes[-1][0]][1]
            more = f" (+{len(scan.spikes) - 1} more since the last check)" if len(scan.spikes) > 1 else ""
            events.append((
                "spike",
                f"StabilityMonitor: loss={value:.4g} > spike_factor={self.spike_factor:g} x loss_ema={ema:.4g} "
                f"(and by more than spike_atol={self.spike_atol:g}) "
                f"(loss spike, batch of step {kept[i][1]}){more}",
            ))  # fmt: skip
        self._act(trainer, events, scope=("loss:",))
        if not kept:  # no rank had a loss in this window: nothing was checked, so nothing is logged
            if self.loss_ema is None:
                warn_once(
                    self,
                    "loss",
                    "StabilityMonitor: no training loss to check: training_step returned no loss (outputs has no "
                    "'loss') and none went through manual_backward; loss_ema, loss_spike and nonfinite are not "
                    "logged (return the loss from training_step to have it checked)",
                )
            return
        metrics = {self.key("loss_spike"): float(bool(scan.spikes)), self.key("nonfinite"): float(bool(scan.nonfinite))}
        if self.loss_ema is not None:
            metrics[self.key("loss_ema")] = self.loss_ema
        self.log_scalars(trainer, metrics)
        self._last_check = (trainer.global_step, metrics)
