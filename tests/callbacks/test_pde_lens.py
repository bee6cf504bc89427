"""The PDE lens on a model: known answers for PDEFit, JacobianStability and AttentionRollout."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from pdelightning.callbacks import AttentionRollout, JacobianStability, PDEFit
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task

AT_START = {"budget": None, "probe_size": 16, "probe_batch_size": 8}  # the probe at step 0 only


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(task: L.LightningModule, callbacks: list, logger: MemoryLogger | bool = False, **kw) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=kw.pop("max_steps", 1),
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        accelerator="cpu",
        num_sanity_val_steps=0,
        limit_val_batches=2,
        **kw,
    )
    trainer.fit(task, *image_loaders(n=32, batch_size=8))
    return trainer


def _pde_task(**kw) -> L.LightningModule:
    torch.manual_seed(0)
    task = our_task("pde", n_layers=3, d_model=16, dt=0.2, **kw)
    with torch.no_grad():
        for i, block in enumerate(task.model.blocks):
            block.raw_diffusion.copy_(torch.linspace(-3.0, 0.5, block.raw_diffusion.numel()) + 0.3 * i)
            block.alpha.fill_(0.5 + 0.4 * i)
    return task


def test_pde_fit_recovers_the_pde_models_own_coefficients() -> None:
    task = _pde_task()
    at_probe = copy.deepcopy(task.model)  # the weights of the step-0 probe (training moves them afterwards)
    cb = PDEFit(**AT_START)
    logger = MemoryLogger()
    _fit(task, [cb], logger)
    for i, block in enumerate(at_probe.blocks):
        name = f"blocks.{i}"
        own_d, own_alpha = block.diffusion_coefficients().detach().double(), float(block.alpha.detach())
        fit = cb.last_results[name]
        assert fit.r2 >= 0.999
        torch.testing.assert_close(fit.diffusion, own_d, rtol=0.01, atol=0.0)
        assert fit.alpha == pytest.approx(own_alpha, rel=0.01)
        assert fit.ffn_coef == pytest.approx(1.0, rel=0.01)
        assert logger.series(f"analysis/pde_fit/D/{name}")[0][1] == pytest.approx(float(own_d.mean()), rel=0.01)
        assert logger.series(f"analysis/pde_fit/alpha/{name}")[0][1] == pytest.approx(own_alpha, rel=0.01)
        assert logger.series(f"analysis/pde_fit/r2/{name}")[0][1] >= 0.999
        assert math.isfinite(logger.series(f"analysis/pde_fit/eq21_fitted/{name}")[0][1])


def test_pde_fit_reads_a_residual_transformer_as_steps_of_one_over_dt() -> None:
    torch.manual_seed(0)
    task = our_task("transformer", n_layers=4, norm="none")
    cb = PDEFit(**AT_START)
    _fit(task, [cb])
    for i in range(4):
        fit = cb.last_results[f"blocks.{i}"]
        assert fit.alpha == pytest.approx(4.0, rel=1e-3) and fit.ffn_coef == pytest.approx(4.0, rel=1e-3)  # 1/Δt = L
        assert fit.r2 == pytest.approx(1.0, abs=1e-5) and abs(fit.diffusion_mean) < 1e-3


def _dense_norm(f, u: torch.Tensor) -> float:
    """||J||_2 of ``f`` at one sample ``u`` [T, d] from the dense Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda x: f(x[None])[0], u)
    n = u.numel()
    return float(torch.linalg.matrix_norm(jac.reshape(n, n).double(), ord=2))


def test_jacobian_norms_match_the_dense_jacobian() -> None:
    task = _pde_task()
    model = copy.deepcopy(task.model).eval()  # the weights of the step-0 probe
    cb = JacobianStability(max_samples=3, block=8, n_iter=30, **AT_START)
    logger = MemoryLogger()
    trainer = _fit(task, [cb], logger)
    probe = ProbeHub.of(trainer).probe_set(trainer, cb)
    x = torch.cat([b[0] for b, _ in probe])
    index = torch.cat([i for _, i in probe])
    x = x[probe.rank[index] < 3]  # the callback's random subset of 3 samples
    # the layer maps at the probe samples, recomputed by hand
    u0 = model.embed(x)[0]
    states, u = [u0], u0
    for block in model.blocks:
        u = block(u, None, u, u0)
        states.append(u)
    norms = []
    block = model.blocks[0]
    for j in range(3):
        norms.append(_dense_norm(lambda v, j=j: block(v, None, v, u0[j : j + 1]), states[0][j].detach()))
    logged = logger.series("analysis/jacobian_stability/spectral_norm/blocks.0")[0][1]
    assert logged == pytest.approx(sum(norms) / 3, rel=5e-3)  # a lower bound, within 0.5 % at block 8, 30 steps

    def stack(v: torch.Tensor, j: int) -> torch.Tensor:
        for block in model.blocks:
            v = block(v, None, v, u0[j : j + 1])
        return v

    lyap = [math.log(_dense_norm(lambda v, j=j: stack(v, j), u0[j].detach())) / 3 for j in range(3)]
    # (1/L) log sigma: sigma within 0.6 %
    assert logger.series("analysis/jacobian_stability/lyapunov")[0][1] == pytest.approx(sum(lyap) / 3, abs=2e-3)
    assert math.isfinite(logger.series("analysis/jacobian_stability/eq21/blocks.0")[0][1])


def test_rollout_entropy_against_a_hand_rollout() -> None:
    torch.manual_seed(0)
    task = our_task("transformer", n_layers=2)
    model = copy.deepcopy(task.model).eval()  # the weights of the step-0 probe
    cb = AttentionRollout(**AT_START)
    logger = MemoryLogger()
    trainer = _fit(task, [cb], logger)
    batches = list(ProbeHub.of(trainer).probe_set(trainer, cb))
    x = torch.cat([b[0] for b, _ in batches])
    pats: list[torch.Tensor] = []
    hooks = [b.attn.hook_pattern.register_forward_hook(lambda m, a, o: pats.append(o)) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    r = None
    for i, p in enumerate(pats):
        a = 0.5 * p.double().mean(1) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        r = a if r is None else a @ r
        entropy = -(torch.xlogy(r, r)).sum(-1).mean()
        assert logger.series(f"analysis/attention_rollout/entropy/blocks.{i}")[0][1] == pytest.approx(
            float(entropy), rel=1e-5
        )
    mixing = logger.series("analysis/attention_rollout/mixing/blocks.1")[0][1]
    assert 0.0 < mixing <= 1.0


def test_pde_fit_history_survives_a_checkpoint(tmp_path: Path) -> None:
    first = PDEFit(every_n_steps=2, budget=None, probe_size=16, probe_batch_size=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(_pde_task(), [first, ckpt], max_steps=4, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert [h["step"] for h in saved["history"]] == [0, 2, 4]
    second = PDEFit(every_n_steps=2, budget=None, probe_size=16, probe_batch_size=8)
    trainer = L.Trainer(
        max_steps=6,
        logger=False,
        callbacks=[second],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
        limit_val_batches=2,
        enable_checkpointing=False,
    )
    trainer.fit(_pde_task(), *image_loaders(n=32, batch_size=8), ckpt_path=tmp_path / "last.ckpt", weights_only=False)
    assert [h["step"] for h in second.history] == [0, 2, 4, 6]  # the restored trajectory, continued
