"""StabilityMonitor's loss checks under manual optimisation: the loss is read, or nothing is logged and it says so."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pdelightning.analysis.stability import scan_losses
from pdelightning.callbacks.stability_monitor import StabilityMonitor
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import StockEncoderModule, image_loaders

KEY = "analysis/stability_monitor"


class ManualModule(StockEncoderModule):
    """A user's manual-optimisation loop; ``how`` says what happens to the loss (see the tests)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.how = how
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        if self.how == "plain_backward":  # past Lightning: no hook sees this loss
            loss.backward()
        else:
            self.manual_backward(loss)
        opt.step()
        return loss if self.how == "return" else None


def _fit(module: L.LightningModule, monitor: StabilityMonitor) -> tuple[MemoryLogger, list[str]]:
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(
            max_epochs=1,
            logger=logger,
            callbacks=[monitor],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=1,
            accelerator="cpu",
        ).fit(module, *image_loaders(n=96, batch_size=16))
    return logger, [str(w.message) for w in caught if "StabilityMonitor" in str(w.message)]


@pytest.mark.parametrize("how", ["manual_backward", "return"])
def test_manual_optimisation_loss_is_checked(how: str) -> None:
    """loss_ema is the EMA of the very losses the step computed (via manual_backward or the returned loss)."""
    torch.manual_seed(0)
    module = ManualModule(how)
    monitor = StabilityMonitor(check_every_n_steps=2, ema_decay=0.5, probe_size=16, probe_batch_size=8)
    logger, said = _fit(module, monitor)
    ema = logger.series(f"{KEY}/detail/loss_ema")
    spikes = logger.series(f"{KEY}/detail/loss_spike")
    assert len(module.losses) == 6 and len(ema) == 3 and len(spikes) == 3  # a check every 2 of 6 batches
    expected = scan_losses(module.losses, None, 0, decay=0.5).ema
    assert ema[-1][1] == pytest.approx(expected, rel=1e-6)
    assert monitor.loss_ema == pytest.approx(expected, rel=1e-6) and monitor.ema_count == 6
    assert not [m for m in said if "no training loss" in m]


def test_manual_optimisation_without_a_visible_loss_logs_neither_and_says_so_once() -> None:
    torch.manual_seed(0)
    logger, said = _fit(ManualModule("plain_backward"), StabilityMonitor(check_every_n_steps=2, probe_size=16))
    keys = logger.keys()
    for q in ("loss_ema", "loss_spike", "nonfinite"):
        assert f"{KEY}/detail/{q}" not in keys and f"{KEY}/{q}" not in keys, q
    told = [m for m in said if "no training loss" in m]
    assert len(told) == 1 and "manual_backward" in told[0]
    assert any(k.startswith(f"{KEY}/W_O_spectral/") for k in keys)  # the probes still run


def test_automatic_optimisation_is_unchanged(monkeypatch: Any) -> None:
    """The usual loop reads the returned loss exactly as before (manual_backward is never involved)."""
    torch.manual_seed(0)
    module = StockEncoderModule()
    seen: list[float] = []
    step = module.training_step

    def recording(batch: Any, batch_idx: int) -> Tensor:
        loss = step(batch, batch_idx)
        seen.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(module, "training_step", recording)
    monitor = StabilityMonitor(check_every_n_steps=3, ema_decay=0.5, probe_size=16)
    logger, _ = _fit(module, monitor)
    assert logger.series(f"{KEY}/detail/loss_ema")[-1][1] == pytest.approx(scan_losses(seen, None, 0, decay=0.5).ema)
