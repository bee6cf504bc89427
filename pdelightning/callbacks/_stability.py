"""What :class:`~pdelightning.callbacks.StabilityMonitor` keeps between hooks: its loss window and its flags.

Each batch's loss is copied into a small device buffer (no host sync); at a check the buffer is read once as a
``[2, n]`` tensor (losses where a batch had one, and which batches had one) that the callback sums across ranks.
The unfinished window is part of the callback's checkpoint state, so a resumed run checks those losses too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from pdelightning._checks import check_choice
from pdelightning.adapters.base import OUT_PROJ_NAMES, QKV_NAMES, VALUE_NAMES
from pdelightning.analysis.stability import LossScan
from pdelightning.utils import warn_once

ACTIONS = ("warn", "stop")
CHART_TITLES = {
    "eq21": "eq. (21) per PDE layer (stable <= 1)",
    "W_O_spectral": "||W^O||_2 per layer",
    "W_VO_spectral": "||W^O W^V||_2 per layer",
    "drift": "relative drift from u_0 per layer",
    "cka_to_embedding": "CKA to u_0 per layer",
    "rms_growth": "rms growth rms_l / rms_0 per layer",
}
"""Custom-scalars chart title of each per-layer quantity."""
NO_DRIFT = (
    "the outputs of {} differ in shape from the embedding u_0 (stages after "
    "patch merging have other tokens and width); their rms_growth and cka_to_embedding are logged"
)
NO_LOSS = (
    "StabilityMonitor: no training loss to check: training_step returned no loss (outputs has no "
    "'loss') and none went through manual_backward; loss_ema, loss_spike and nonfinite are not "
    "logged (return the loss from training_step to have it checked)"
)


def check_arguments(
    threshold: float,
    action: str,
    check_every_n_steps: int,
    spike_factor: float | None,
    ema_decay: float,
    spike_warmup: int,
    spike_atol: float,
) -> None:
    """The argument checks of :class:`~pdelightning.callbacks.StabilityMonitor` (``ValueError`` naming the value)."""
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


class Flags:
    """The events that are on, so that a flag warns when it turns on and stays quiet while it stays on."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self.stop_reason: str | None = None

    def act(self, trainer: L.Trainer, events: list[tuple[str, str]], scope: tuple[str, ...], action: str) -> None:
        """Warn about new events and, for ``action="stop"``, also stop training (the decision shared across ranks).

        ``events`` are ``(flag, message)`` pairs, identical on every rank (computed from gathered or reduced
        values); every rank calls this at the same points. ``scope`` lists the flag prefixes this call is
        authoritative for (flags of that scope that are absent now are cleared). Spikes warn every time.
        """
        step = trainer.global_step
        for flag, message in events:
            if flag not in self.active or flag == "spike":
                rank_zero_warn(f"{message} at step {step}" + ("; stopping training" if action == "stop" else ""))
        self.active = {f for f in self.active if not f.startswith(scope)} | {f for f, _ in events if f != "spike"}
        if action == "stop":
            stop = trainer.strategy.reduce_boolean_decision(bool(events), all=False)
            if stop:
                trainer.should_stop = True
                if self.stop_reason is None:
                    self.stop_reason = events[0][1] if events else "StabilityMonitor: stop requested by another rank"


def warn_missing_weights(owner: object, weights: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Say once which layers have no ``W^O`` (or no ``W_V``), what was looked for, and what is not logged."""
    no_o = [name for name, (w_o, _) in weights.items() if w_o is None]
    no_v = [name for name, (w_o, w_v) in weights.items() if w_o is not None and w_v is None]
    if no_o:
        warn_once(
            owner,
            "W_O",
            f"StabilityMonitor: no attention output projection W^O found for layers {no_o} (looked for children "
            f"of their attention module named {list(OUT_PROJ_NAMES)}, and BERT's output.dense); W_O_spectral, "
            "W_VO_spectral and eq21 are not logged for them",
        )
    if no_v:
        warn_once(
            owner,
            "W_V",
            f"StabilityMonitor: no value projection W_V found for layers {no_v} (looked for children of their "
            f"attention module named {list(VALUE_NAMES)} or a fused {list(QKV_NAMES)}); W_VO_spectral is not "
            "logged for them",
        )


class LossWindow:
    """A device buffer of up to ``size`` losses with the global step of each (``None`` where a batch had none).

    Args:
        size: the number of batches between two checks.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer: Tensor | None = None
        self.slots: list[int | None] = []
        self._step = 0  # the global step of the batch under way
        self._backward: list[Tensor] = []  # the losses given to manual_backward in this batch (manual optimisation)
        self._restored: tuple[list[float], list[int | None]] = ([], [])

    def state(self) -> dict[str, Any]:
        """The losses buffered since the last check and their steps (checkpoint state)."""
        values = [float(v) for v in self.buffer[: len(self.slots)].tolist()] if self.buffer is not None else []
        return {"window": values, "slots": list(self.slots)}

    def load(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's unfinished window for :meth:`start`."""
        self._restored = (list(state.get("window", [])), list(state.get("slots", [])))

    def start(self, device: torch.device) -> None:
        """Empty the buffer at the start of training; a restored window's losses come first."""
        self.buffer, self.slots = None, []
        window, slots = self._restored
        if slots:
            self.buffer = torch.zeros(self.size, device=device)
            self.buffer[: len(window)] = torch.tensor(window, device=device)
            self.slots = slots
        self._restored = ([], [])

    def batch_start(self, step: int) -> None:
        """A batch begins: its loss belongs to ``step``."""
        self._step, self._backward = step, []

    def backward(self, loss: Tensor) -> None:
        """Under manual optimisation, a loss the step gives to ``manual_backward`` (a device copy, no sync)."""
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._backward.append(loss.detach().float().reshape(()))

    def batch_end(self, outputs: Any) -> bool:
        """Buffer the batch's loss (``outputs["loss"]``, else its manual_backward losses' mean); ``True``: full."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor) and self._backward:  # manual optimisation, training_step returned no loss
            loss = torch.stack(self._backward).mean()
        self._backward = []
        return self.add(loss if isinstance(loss, Tensor) else None, self._step)

    def add(self, loss: Tensor | None, step: int) -> bool:
        """Buffer one batch's loss (a device copy, no sync); ``True`` when the window is full."""
        if loss is not None:
            if self.buffer is None:
                self.buffer = torch.zeros(self.size, device=loss.device)
            self.buffer[len(self.slots)] = loss.detach().reshape(())
            self.slots.append(step)
        else:
            self.slots.append(None)
        return len(self.slots) >= self.size

    def stacked(self, device: torch.device) -> Tensor:
        """``[2, n]``: the buffered losses (0 where a batch had none) and 1/0 for whether it had one."""
        n = len(self.slots)
        device = self.buffer.device if self.buffer is not None else device
        have = torch.tensor([s is not None for s in self.slots], dtype=torch.float32, device=device)
        values = self.buffer[:n] if self.buffer is not None else torch.zeros(n, device=device)
        return torch.stack([torch.where(have > 0, values, torch.zeros_like(values)), have])

    def drain(self, sums: list[float], counts: list[float]) -> list[tuple[float, int | None]]:
        """Empty the window; the mean loss and step of each batch some rank had a loss for, from the summed rows."""
        if self.buffer is not None:
            self.buffer.zero_()
        steps, self.slots = self.slots, []
        return [(s / c, steps[i]) for i, (s, c) in enumerate(zip(sums, counts, strict=True)) if c > 0]


def loss_events(
    scan: LossScan, kept: list[tuple[float, int | None]], spike_factor: float | None, spike_atol: float
) -> list[tuple[str, str]]:
    """``(flag, message)`` of the first non-finite loss and of the spikes that ``scan_losses`` found."""
    events: list[tuple[str, str]] = []
    if scan.nonfinite:
        i, value = scan.nonfinite[0]
        events.append(("loss:nonfinite", f"StabilityMonitor: loss={value} is non-finite (batch of step {kept[i][1]})"))
    if scan.spikes:
        i, value, ema = scan.spikes[0]
        more = f" (+{len(scan.spikes) - 1} more since the last check)" if len(scan.spikes) > 1 else ""
        events.append(
            (
                "spike",
                f"StabilityMonitor: loss={value:.4g} > spike_factor={spike_factor:g} x loss_ema={ema:.4g} "
                f"(and by more than spike_atol={spike_atol:g}) (loss spike, batch of step {kept[i][1]}){more}",
            )
        )
    return events
