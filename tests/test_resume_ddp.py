"""A 2-process DDP run (gloo) stopped after a mid-epoch checkpoint and resumed from it ends with the weights of the
uninterrupted run and logs its losses: each rank's ``DistributedSampler`` continues its epoch's order from the next
batch (:class:`~pdelightning.data.base.ResumableDataLoader`), and the random states are those the run had."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_resume import _config, scalar_history

ROOT = Path(__file__).resolve().parents[1]
# DigitsDataModule: 1293 training images over 2 ranks in batches of 128: 6 steps per epoch. A checkpoint every 4 steps
# is mid-epoch (steps 4 and 8); the interrupted run stops at step 8 (batch 2 of epoch 1, whose order differs from
# epoch 0's), the resumed one trains on to the end of epoch 1 (step 12).
CKPT_EVERY, STOP_AT = 4, 8


def _fit(cfg: Path, save_dir: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pdelightning", "fit", "-c", str(cfg), "--trainer.devices=2",
           "--trainer.strategy=ddp", f"--trainer.logger.init_args.save_dir={save_dir}", *extra]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("PDELIGHTNING_CALLBACKS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.ddp
def test_ddp_mid_epoch_resume_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    cfg = _config(tmp_path, epochs=2, ckpt_every=CKPT_EVERY)
    _fit(cfg, tmp_path / "reference")
    _fit(cfg, tmp_path / "stopped", f"--trainer.max_steps={STOP_AT}")
    stopped = tmp_path / "stopped" / "run" / "version_0" / "checkpoints"
    mid = stopped / f"epoch=1-step={STOP_AT}.ckpt"
    state = torch.load(mid, weights_only=True)
    assert state["global_step"] == STOP_AT and state["epoch"] == 1  # a checkpoint inside epoch 1 (steps 7-12)
    _fit(cfg, tmp_path / "resumed", f"--ckpt_path={mid}")
    ref = tmp_path / "reference" / "run" / "version_0"
    res = tmp_path / "resumed" / "run" / "version_0"
    final = torch.load(ref / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 12 == torch.load(res / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    a, b = _weights(ref / "checkpoints" / "last.ckpt"), _weights(res / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # what the resumed run logged is the uninterrupted run's at the same steps: validation at the end of epoch 1 (logged
    # at step 11; epoch 0's, at step 5, was logged by the interrupted run) and the training loss after the checkpoint
    ref_val, res_val = scalar_history(ref, ("val/",)), scalar_history(res, ("val/",))
    assert ref_val.keys() == res_val.keys() and ref_val
    for tag, points in ref_val.items():
        after = [p for p in points if p[0] > STOP_AT]
        assert [s for s, _ in res_val[tag]] == [s for s, _ in after] and after, tag
        assert [v for _, v in res_val[tag]] == pytest.approx([v for _, v in after], rel=1e-5), tag
    after = {t: [p for p in v if p[0] > STOP_AT] for t, v in scalar_history(ref, ("train/loss",)).items()}
    resumed = scalar_history(res, ("train/loss",))
    assert after.keys() == resumed.keys() and all(after.values())
    for tag, points in after.items():
        assert [s for s, _ in resumed[tag]] == [s for s, _ in points], tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in points], rel=1e-5), tag
