"""The analysis callbacks under strategies other than one device and DDP: the summary line of ``ddp_spawn`` runs,
and one warning for the strategies they are not verified on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from pdelightning.callbacks import GradientFlow, LayerMutualInformation, StabilityMonitor, _strategy
from pdelightning.callbacks._strategy import strategy_family, unverified_strategy_message
from tests.helpers.models import image_loaders, our_task

ROOT = Path(__file__).resolve().parents[1]
SPAWN = {
    "model.model": "TransformerClassifier",
    "model.model.init_args.d_model": "16",
    "model.model.init_args.n_layers": "1",
    "model.model.init_args.n_heads": "2",
    "model.model.init_args.d_ff": "16",
    "model.model.init_args.bottleneck_dim": "null",
    "trainer.callbacks+": "GradientFlow",
    "trainer.callbacks.every_n_steps": "2",
    "data": "SyntheticImageDataModule",
    "data.num_train": "32",
    "data.num_val": "8",
    "data.num_test": "8",
    "data.batch_size": "4",
    "trainer.accelerator": "cpu",
    "trainer.devices": "2",
    "trainer.strategy": "ddp_spawn",
    "trainer.max_steps": "5",
    "trainer.enable_progress_bar": "false",
    "trainer.enable_model_summary": "false",
    "trainer.num_sanity_val_steps": "0",
}
"""A 5-step fit of a tiny Transformer with GradientFlow on 2 CPU processes started by ddp_spawn."""


class MyDDP(DDPStrategy):
    """A user's tweak of DDP: still DDP."""


@pytest.mark.parametrize(
    ("strategy", "family", "verified"),
    [
        (SingleDeviceStrategy("cpu"), "SingleDeviceStrategy", True),
        (DDPStrategy(), "DDPStrategy", True),
        (DDPStrategy(find_unused_parameters=True), "DDPStrategy", True),
        (MyDDP(), "DDPStrategy", True),
        (FSDPStrategy(), "FSDPStrategy", False),
        (ModelParallelStrategy(), "ModelParallelStrategy", False),
    ],
)
def test_strategies_verified_or_named(strategy: object, family: str, verified: bool) -> None:
    assert strategy_family(strategy) == family
    message = unverified_strategy_message(strategy, ["PDEFit"])
    if verified:
        assert message is None
    else:
        assert message is not None and f"not on {family}" in message and "PDEFit is verified" in message


def test_deepspeed_is_not_taken_for_ddp() -> None:
    """DeepSpeedStrategy subclasses DDPStrategy in Lightning; it shards the model all the same."""
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy()
    assert isinstance(strategy, DDPStrategy) and strategy_family(strategy) == "DeepSpeedStrategy"
    assert "not on DeepSpeedStrategy" in unverified_strategy_message(strategy, ["PDEFit"])


def _trainer(tmp_path: Path, callbacks: list[L.Callback], max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )


def test_one_warning_per_run_whatever_the_number_of_callbacks(tmp_path: Path, monkeypatch) -> None:
    """FSDP and DeepSpeed need a GPU in Lightning; on the CPU the verified list is emptied so that the CPU's own
    strategy stands in for an unverified one: three callbacks, one fit, one warning that names it."""
    monkeypatch.setattr(_strategy, "VERIFIED", ())
    kw = {"every_n_steps": 2, "probe_size": 16}
    callbacks = [LayerMutualInformation(**kw), StabilityMonitor(**kw), GradientFlow(every_n_steps=2)]
    trainer = _trainer(tmp_path, callbacks, max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(our_task(), *image_loaders(n=32))
    ours = [str(w.message) for w in caught if "not on SingleDeviceStrategy" in str(w.message)]
    assert len(ours) == 1, ours
    assert "GradientFlow, LayerMutualInformation, StabilityMonitor are verified on one device and under DDP" in ours[0]
    with warnings.catch_warnings(record=True) as caught:  # verified: nothing
        warnings.simplefilter("always")
        monkeypatch.setattr(_strategy, "VERIFIED", ("SingleDeviceStrategy",))
        _trainer(tmp_path, [GradientFlow(every_n_steps=1)], max_steps=1).fit(our_task(), *image_loaders(n=32))
    assert not [w for w in caught if "verified on one device" in str(w.message)]


@pytest.mark.ddp
def test_ddp_spawn_summary_counts_the_spawned_steps(tmp_path: Path) -> None:
    """Under ddp_spawn the main process's trainer never steps: the summary line reports the spawned rank 0's
    counts: 5 steps (32 samples over 2 ranks in batches of 4: 4 steps in epoch 0, 1 in epoch 1) and 2 epochs
    (Lightning's ``current_epoch`` after ``max_steps`` ended epoch 1's loop, as a one-process run reports it)."""
    cmd = [
        sys.executable,
        "-m",
        "pdelightning",
        "fit",
        *(f"--{k}={v}" for k, v in SPAWN.items()),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PDELIGHTNING_CALLBACKS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = re.findall(r"Finished after (\d+) steps \((\d+) epochs\)\. (.*)", proc.stdout)
    assert summary, proc.stdout[-2000:]
    steps, epochs, final = summary[-1]
    assert (int(steps), int(epochs)) == (5, 2), proc.stdout[-2000:]
    assert "val/acc=" in final and "pdelightning/run" not in final
    assert "verified on one device" not in proc.stderr  # ddp_spawn is DDP
