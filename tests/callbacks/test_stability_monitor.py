"""StabilityMonitor: eq. (21) by hand, power iteration, drift/CKA/RMS by a manual forward, NaN and loss spikes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor

from pdelightning.analysis.cka import linear_cka
from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.stability_monitor import (
    StabilityMonitor,
    eq21_number,
    pool_tokens,
    relative_drift,
    scan_losses,
    spectral_norm_power,
)
from pdelightning.probing.hub import ProbeHub
from pdelightning.task import ClassificationTask
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events

KEY = "analysis/stability_monitor"


def SUB(q: str) -> str:
    """``detail/`` for a secondary quantity."""
    return "detail/" if q in StabilityMonitor.detail else ""


def _trainer(logger: Logger | bool, callbacks: list, **kw: Any) -> L.Trainer:
    kw = {"max_epochs": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_checkpointing": False, **kw}
    return L.Trainer(logger=logger, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, **kw)


def _probe_args(**kw: Any) -> dict[str, Any]:
    return {"probe_size": 16, "probe_batch_size": 8, **kw}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # model initialisation and loader shuffling: the same in every test order


# ---- pure functions ------------------------------------------------------------------------------------------
def test_spectral_norm_power_against_matrix_norm() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 24, generator=g)
    true = float(torch.linalg.matrix_norm(W, ord=2))
    sigma, v = spectral_norm_power(W, None, 200)
    assert abs(float(sigma) - true) / true < 1e-4
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(spectral_norm_power(W, None, 3)[0]) <= true * (1 + 1e-6)  # a lower bound at every iteration
    # warm start: the weights moved a little since the last probe; 2 iterations from the old vector suffice
    W2 = W + 1e-2 * torch.randn(32, 24, generator=g)
    true2 = float(torch.linalg.matrix_norm(W2, ord=2))
    warm = abs(float(spectral_norm_power(W2, v, 2)[0]) - true2) / true2
    cold = abs(float(spectral_norm_power(W2, None, 2)[0]) - true2) / true2
    assert warm < 1e-4 < 1e-2 < cold
    # unusable warm starts fall back to the seeded cold start
    for bad in (torch.zeros(24), torch.ones(7), torch.full((24,), float("nan"))):
        assert float(spectral_norm_power(W, bad, 5)[0]) == float(spectral_norm_power(W, None, 5)[0])
    assert float(spectral_norm_power(torch.diag(torch.tensor([3.0, -5.0, 1.0])), None, 50)[0]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="expected a matrix"):
        spectral_norm_power(torch.ones(3))
    with pytest.raises(ValueError, match="n_iter=0"):
        spectral_norm_power(W, None, 0)


def test_eq21_number_by_hand() -> None:
    # 2 * 0.5 * 0.1 / 0.5**2 + |-2| * 0.1 * 3 = 0.4 + 0.6
    assert eq21_number(torch.tensor([0.1, 0.5, 0.2]), -2.0, 0.1, 0.5, 3.0) == pytest.approx(1.0)
    assert eq21_number(torch.tensor([0.0]), 1.0, 0.25, 1.0, 2.0) == pytest.approx(0.5)  # no diffusion
    assert eq21_number(0.25, 0.0, 1.0, 1.0, 10.0) == pytest.approx(0.5)  # scalar D, no attention


def test_scan_losses() -> None:
    scan = scan_losses([1.0, float("inf"), 1.0, 1.0, 10.0, 1.0], None, 0, decay=0.9, spike_factor=3.0, warmup=3)
    assert [i for i, _ in scan.nonfinite] == [1]
    assert scan.spikes == [(4, 10.0, pytest.approx(1.0))]
    # the spike enters clipped to 3 x EMA: 0.9 + 0.1 * 3 = 1.2, then 0.9 * 1.2 + 0.1 = 1.18
    assert scan.ema == pytest.approx(1.18) and scan.count == 5
    # no spikes before the warm-up, none at all without a factor, the state carries over between calls
    assert not scan_losses([1.0, 10.0], None, 0, warmup=3).spikes
    assert not scan_losses([1.0] * 5 + [100.0], None, 0, spike_factor=None, warmup=0).spikes
    assert scan_losses([10.0], 1.0, 50, decay=0.5, warmup=3).spikes == [(0, 10.0, 1.0)]


def test_relative_drift_and_pooling() -> None:
    g = torch.Generator().manual_seed(0)
    u0, h = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g)
    assert relative_drift(h, u0) == pytest.approx(float((h - u0).flatten().norm() / u0.flatten().norm()), rel=1e-6)
    assert relative_drift(u0, u0) == 0.0
    assert torch.equal(pool_tokens(h), h.mean(1)) and torch.equal(pool_tokens(h[:, 0]), h[:, 0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"action='explode' is not one of \('warn', 'stop'\)"):
        StabilityMonitor(action="explode")  # type: ignore[arg-type]
    for kw, msg in [
        ({"threshold": 0.0}, "threshold=0.0"),
        ({"check_every_n_steps": 0}, "check_every_n_steps=0"),
        ({"spike_factor": 1.0}, "spike_factor=1.0"),
        ({"ema_decay": 1.0}, "ema_decay=1.0"),
        ({"spike_warmup": -1}, "spike_warmup=-1"),
        ({"every_n_steps": 0}, "every_n_steps=0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            StabilityMonitor(**kw)


# ---- eq. (21) on a PDE model with hand-set coefficients ------------------------------------------------------
def _set_step(block: Any, d_max: float, alpha: float, wo_top: float, v_scale: float) -> None:
    """Diagonal D with largest entry d_max, alpha, W_O = diag(wo_top, 0.1, ...), W_V = v_scale I."""
    d = block.attn.d_model
    D = torch.full((d,), 0.05)
    D[3] = d_max
    with torch.no_grad():
        block.raw_diffusion.copy_(torch.log(torch.expm1(D)))  # softplus^-1
        block.alpha.fill_(alpha)
        block.attn.out_proj.weight.copy_(torch.diag(torch.tensor([wo_top] + [0.1] * (d - 1))))
        block.attn.in_proj.weight[2 * d :].copy_(v_scale * torch.eye(d))


def test_eq21_against_hand_computation() -> None:
    task = our_task("pde", dt=0.2, dx=0.5)
    _set_step(task.model.blocks[0], d_max=0.3, alpha=-1.5, wo_top=2.0, v_scale=3.0)
    _set_step(task.model.blocks[1], d_max=0.1, alpha=1.0, wo_top=1.0, v_scale=0.5)
    expected = {
        "blocks.0": 2 * 0.3 * 0.2 / 0.5**2 + 1.5 * 0.2 * 2.0,  # 0.48 + 0.6 = 1.08 > 1
        "blocks.1": 2 * 0.1 * 0.2 / 0.5**2 + 1.0 * 0.2 * 1.0,  # 0.16 + 0.2 = 0.36
    }
    logger = MemoryLogger()
    cb = StabilityMonitor(budget=None, every_n_epochs=None, **_probe_args())  # the probe at step 0 only
    train, val = image_loaders(n=16)
    with pytest.warns(UserWarning, match=r"StabilityMonitor: blocks\.0 eq21_number=1\.08 > 1\.0 at step 0"):
        _trainer(logger, [cb], max_steps=1).fit(task, train, val)
    for layer, number in expected.items():
        assert logger.series(f"{KEY}/eq21/{layer}") == [(0, pytest.approx(number, rel=1e-5))]
        assert logger.series(f"{KEY}/detail/eq21_exceeded/{layer}") == [(0, float(number > 1))]
    assert logger.series(f"{KEY}/W_O_spectral/blocks.0") == [(0, pytest.approx(2.0, rel=1e-5))]
    assert logger.series(f"{KEY}/W_VO_spectral/blocks.0") == [(0, pytest.approx(6.0, rel=1e-5))]
    assert logger.series(f"{KEY}/W_VO_spectral/blocks.1") == [(0, pytest.approx(0.5, rel=1e-5))]
    assert cb.stop_reason is None  # action="warn" never stops


def test_large_dt_exceeds_eq21_and_stops_before_training() -> None:
    task = our_task("pde", dt=5.0)
    cb = StabilityMonitor(action="stop", **_probe_args())
    trainer = _trainer(MemoryLogger(), [cb], max_epochs=3)
    with pytest.warns(UserWarning, match=r"blocks\.0 eq21_number=.* > 1\.0 at step 0; stopping training"):
        trainer.fit(task, *image_loaders(n=16))
    assert trainer.should_stop and trainer.global_step == 0
    assert cb.stop_reason is not None and cb.stop_reason.startswith("StabilityMonitor: blocks.0 eq21_number=")
    assert float(cb.stop_reason.split("=")[1].split()[0]) > 1


# ---- non-finite activations and losses, spikes ---------------------------------------------------------------
def test_planted_nan_activation_stops_and_names_the_layer(tmp_path: Path) -> None:
    task = our_task("transformer", n_layers=3)

    def poison(module: Any, args: Any, output: Tensor) -> Tensor | None:
        return output * float("nan") if not module.training else None  # only the (eval-mode) probe forwards

    task.model.blocks[1].hook_resid_post.register_forward_hook(poison)
    logger = MemoryLogger()
    cb = StabilityMonitor(action="stop", every_n_steps=2, every_n_epochs=None, probe_at_start=False, **_probe_args())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _trainer(logger, [cb, ckpt], max_epochs=3, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"StabilityMonitor: blocks\.1 nonfinite_activations=.* > 0 .* at step 2"):
        trainer.fit(task, *image_loaders(n=64))  # 4 steps per epoch
    assert trainer.global_step == 2  # of 12
    assert cb.stop_reason is not None and cb.stop_reason.startswith("StabilityMonitor: blocks.1 nonfinite_activations=")
    nonfinite = {
        layer: logger.series(f"{KEY}/detail/nonfinite/{layer}")[-1][1]
        for layer in ("embedding", "blocks.0", "blocks.1", "blocks.2")
    }
    assert (
        nonfinite["embedding"] == nonfinite["blocks.0"] == 0.0 and nonfinite["blocks.1"] == nonfinite["blocks.2"] == 1.0
    )
    # stopped through Lightning's normal path: the checkpoint of the stopping step is written
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2


class _Scripted(ClassificationTask):
    """Multiplies the training loss by ``factor`` on the optimizer step ``at``."""

    def __init__(self, at: int, factor: float) -> None:
        base = our_task("transformer")
        super().__init__(base.model, num_classes=4, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
        self.at, self.factor = at, factor

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.global_step == self.at else loss


def test_nonfinite_loss_stops_on_that_step() -> None:
    logger = MemoryLogger()
    cb = StabilityMonitor(action="stop", check_every_n_steps=1, probe_at_start=False, **_probe_args())
    trainer = _trainer(logger, [cb], max_epochs=2)
    with pytest.warns(UserWarning, match=r"StabilityMonitor: loss=nan is non-finite \(batch of step 3\)"):
        trainer.fit(_Scripted(at=3, factor=float("nan")), *image_loaders(n=96))
    assert trainer.global_step == 4  # the step that produced the NaN completed, nothing after it
    assert cb.stop_reason is not None and "loss=nan" in cb.stop_reason
    assert [v for _, v in logger.series(f"{KEY}/detail/nonfinite")] == [0.0, 0.0, 0.0, 1.0]
    assert all(math.isfinite(v) for _, v in logger.series(f"{KEY}/detail/loss_ema"))  # NaN never enters the EMA


def test_planted_loss_spike_is_detected() -> None:
    logger = MemoryLogger()
    cb = StabilityMonitor(check_every_n_steps=3, spike_warmup=3, probe_at_start=False, **_probe_args())
    spike = r"StabilityMonitor: loss=.* > spike_factor=3 x loss_ema=.* \(loss spike, batch of step 4\)"
    with pytest.warns(UserWarning, match=spike):
        _trainer(logger, [cb], max_epochs=1).fit(_Scripted(at=4, factor=50.0), *image_loaders(n=96))  # 6 steps
    assert logger.series(f"{KEY}/detail/loss_spike") == [(3, 0.0), (6, 1.0)]
    assert cb.last_spike_step == 4 and cb.stop_reason is None
    emas = [v for _, v in logger.series(f"{KEY}/detail/loss_ema")]
    assert emas[-1] < 1.1 * emas[-2]  # the spike entered the EMA clipped, not at 50x


# ---- the fixture models end to end ---------------------------------------------------------------------------
def test_transformer_matches_a_manual_probe_through_tensorboard(tmp_path: Path) -> None:
    task = our_task("transformer")
    cb = StabilityMonitor(**_probe_args(probe_size=24))  # probes at step 0 and at the end of the epoch
    trainer = _trainer(TensorBoardLogger(tmp_path), [cb])
    trainer.fit(task, *image_loaders(n=48))
    events = read_events(trainer.logger.log_dir)
    last = {tag: events.Scalars(tag)[-1] for tag in events.Tags()["scalars"] if tag.startswith(KEY)}
    layers = ["blocks.0", "blocks.1"]
    per_layer = ("W_O_spectral", "W_VO_spectral", "drift", "cka_to_embedding", "rms", "rms_growth", "nonfinite")
    assert {f"{KEY}/{SUB(q)}{q}/{layer}" for q in per_layer for layer in layers} <= set(last)
    assert not [t for t in last if "/eq21" in t]  # not a PDE model
    assert all(math.isfinite(e.value) for e in last.values())
    assert {e.step for t, e in last.items() if "/drift/" in t} == {trainer.global_step}
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    # recompute on the probe set with the final weights (nothing changes them after the last probe)
    model = task.model.eval()
    hidden: dict[str, list[Tensor]] = {"u0": [], **{layer: [] for layer in layers}}
    handles = [model.hook_embed.register_forward_hook(lambda m, a, o: hidden["u0"].append(o))]
    for i, layer in enumerate(layers):
        handles.append(
            model.blocks[i].hook_resid_post.register_forward_hook(lambda m, a, o, n=layer: hidden[n].append(o))
        )
    with torch.no_grad():
        for (x, _), _ in ProbeHub.of(trainer).probe_set(trainer, cb):
            model(x)
    for h in handles:
        h.remove()
    u0 = torch.cat(hidden["u0"])
    assert u0.shape[0] == 24
    rms0 = float(u0.pow(2).mean().sqrt())
    for i, layer in enumerate(layers):
        h = torch.cat(hidden[layer])
        rms = float(h.pow(2).mean().sqrt())
        assert last[f"{KEY}/drift/{layer}"].value == pytest.approx(relative_drift(h, u0), rel=1e-4)
        assert last[f"{KEY}/detail/rms/{layer}"].value == pytest.approx(rms, rel=1e-4)
        assert last[f"{KEY}/rms_growth/{layer}"].value == pytest.approx(rms / rms0, rel=1e-4)
        assert last[f"{KEY}/cka_to_embedding/{layer}"].value == pytest.approx(
            float(linear_cka(u0.mean(1), h.mean(1))), abs=1e-4
        )
        true = float(torch.linalg.matrix_norm(model.blocks[i].attn.out_proj.weight.detach(), ord=2))
        assert last[f"{KEY}/W_O_spectral/{layer}"].value == pytest.approx(true, rel=1e-5)  # exact, not a lower bound
    assert last[f"{KEY}/detail/rms/embedding"].value == pytest.approx(rms0, rel=1e-4)


def test_stock_encoder_has_attention_keys_but_no_eq21() -> None:
    logger = MemoryLogger()
    cb = StabilityMonitor(layers="encoder.layers.*", attention="encoder.layers.*.self_attn", **_probe_args())
    _trainer(logger, [cb], max_steps=2).fit(StockEncoderModule(), *image_loaders(n=32))
    keys = logger.keys()
    for layer in ("encoder.layers.0", "encoder.layers.1"):
        for q in ("W_O_spectral", "W_VO_spectral", "drift", "cka_to_embedding", "rms", "rms_growth"):
            assert f"{KEY}/{SUB(q)}{q}/{layer}" in keys, (q, layer)
            assert all(math.isfinite(v) for _, v in logger.series(f"{KEY}/{SUB(q)}{q}/{layer}"))
    assert not [k for k in keys if "/eq21" in k]


def test_mlp_needs_a_layers_glob_and_then_skips_attention() -> None:
    with pytest.raises(TargetNotFoundError, match="MLPModule has no Transformer layers to analyse"):
        StabilityMonitor().setup(None, MLPModule(), "fit")  # type: ignore[arg-type]
    logger = MemoryLogger()
    _trainer(logger, [StabilityMonitor(layers="net.*", **_probe_args())], max_steps=2).fit(
        MLPModule(), *image_loaders(n=32)
    )
    keys = logger.keys()
    assert {f"{KEY}/detail/rms/net.{i}" for i in range(4)} | {f"{KEY}/cka_to_embedding/net.3"} <= keys
    # no attention, no PDE step, and no layer output has the input's [B, 8, 8] shape: no drift
    assert not [k for k in keys if any(q in k for q in ("W_O", "W_VO", "eq21", "/drift/"))]


# ---- state through a checkpoint ------------------------------------------------------------------------------
def test_state_round_trip_through_checkpoint(tmp_path: Path) -> None:
    kw = _probe_args(check_every_n_steps=2, spike_warmup=1)
    first = StabilityMonitor(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _trainer(False, [first, ckpt], max_epochs=2, enable_checkpointing=True).fit(our_task("pde"), *image_loaders(n=32))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved["ema_count"] == 4 and saved["loss_ema"] == pytest.approx(first.loss_ema)
    assert saved["n_probes"] == first._n_probes >= 2 and saved["hub"]["schedule"]["probes"] >= 2

    second = StabilityMonitor(**kw)
    loaded: list[dict[str, Any]] = []
    restore = second.load_state_dict
    second.load_state_dict = lambda state: (loaded.append(state), restore(state))[-1]  # type: ignore[method-assign]
    _trainer(False, [second], max_epochs=3).fit(
        our_task("pde"), *image_loaders(n=32), ckpt_path=tmp_path / "last.ckpt", weights_only=False
    )
    assert len(loaded) == 1 and loaded[0]["loss_ema"] == saved["loss_ema"]
    assert loaded[0]["hub"] == saved["hub"]
    assert second.ema_count == 6  # 4 restored + 2 new


# ---- DDP: the stop decision reaches every rank -----------------------------------------------------------------
_DDP_SCRIPT = """
import json, sys
import lightning.pytorch as L, torch
sys.path.insert(0, {root!r})
from pdelightning.callbacks.stability_monitor import StabilityMonitor
from pdelightning.task import ClassificationTask
from tests.helpers.models import image_loaders, our_task

class NaNOnRankOne(ClassificationTask):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_rank == 1 and self.global_step == 2 else loss

torch.manual_seed(0)
base = our_task("transformer", bottleneck_dim=None)
task = NaNOnRankOne(base.model, num_classes=4, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
cb = StabilityMonitor(action="stop", check_every_n_steps=1, probe_at_start=True, probe_size=16, probe_batch_size=8)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, callbacks=[cb], logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=1)
trainer.fit(task, *image_loaders(n=128))
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"step": trainer.global_step, "reason": cb.stop_reason, "ema_count": cb.ema_count}}, f)
"""


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "fit.py"
    script.write_text(_DDP_SCRIPT.format(root=root, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the NaN of rank 1's batch at step 2 enters the summed loss of both ranks: both stop after that step
    assert [r["step"] for r in results] == [3, 3]
    assert all(r["reason"] is not None and "loss=nan" in r["reason"] for r in results)
    assert results[0]["ema_count"] == results[1]["ema_count"] == 2  # identical histories on every rank


def test_noise_around_a_small_loss_is_not_a_spike() -> None:
    # 0.44 is 7x an EMA of 0.06 but only 0.38 above it: batch noise late in training, not an instability.
    quiet = scan_losses([0.06] * 30 + [0.44, 0.06], ema=None, count=0, decay=0.9, spike_factor=3.0, warmup=20)
    assert quiet.spikes == []
    loud = scan_losses([0.06] * 30 + [2.5, 0.06], ema=None, count=0, decay=0.9, spike_factor=3.0, warmup=20)
    assert [i for i, _, _ in loud.spikes] == [30]
    # with atol=0 the relative rule alone decides
    strict = scan_losses([0.06] * 30 + [0.44], ema=None, count=0, decay=0.9, spike_factor=3.0, warmup=20, atol=0.0)
    assert [i for i, _, _ in strict.spikes] == [30]
