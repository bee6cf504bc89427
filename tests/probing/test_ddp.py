"""Two CPU processes (gloo): a probe set smaller than the world size, and ranks that disagree about timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, sys, time
import lightning.pytorch as L, torch
sys.path.insert(0, {root!r})
from pdelightning.callbacks import (AttentionRollout, AttentionSimilarity, GradientFlow, InformationFlow,
                                    JacobianStability, LayerMutualInformation, PDEFit, PerturbationEval,
                                    StabilityMonitor)
from pdelightning.probing.hub import ProbeHub
from pdelightning.task import ClassificationTask
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task

class SlowRankOne(ClassificationTask):
    def training_step(self, batch, batch_idx):
        if self.global_rank == 1:
            time.sleep(0.02)  # rank 1 measures slower steps: its own plan would differ from rank 0's
        return super().training_step(batch, batch_idx)

devices, probe_size = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
base = our_task("pde", bottleneck_dim=None)
task = SlowRankOne(base.model, num_classes=4, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
kw = dict(probe_size=probe_size, probe_batch_size=4)
# LayerMutualInformation refuses fewer than 4 samples at construction (a clear error, tested in test_bad_input)
callbacks = [AttentionSimilarity(**kw), InformationFlow(unbiased=probe_size >= 4, **kw),
             *([LayerMutualInformation(**kw)] if probe_size >= 4 else []), PerturbationEval(**kw),
             StabilityMonitor(**kw), GradientFlow(), PDEFit(**kw),
             JacobianStability(max_samples=3, n_iter=6, **kw), AttentionRollout(**kw)]
logger = MemoryLogger()
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=12,
                    callbacks=callbacks, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1)
trainer.fit(task, *image_loaders(n=64, batch_size=4))
hub = ProbeHub.of(trainer)
out = {{"steps": hub.schedule.steps, "rank": trainer.global_rank,
       "step0": {{k: v for st, m in logger.records if st == 0 for k, v in m.items() if k.startswith("analysis/")
                 and "gradient" not in k and "overhead" not in k and "loss_" not in k}}}}
with open({out!r} + f"/d{{devices}}_rank{{trainer.global_rank}}.json", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.ddp
@pytest.mark.parametrize("probe_size", [1, 5])
def test_tiny_probe_sets_and_timing_disagreement(tmp_path: Path, probe_size: int) -> None:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PDELIGHTNING_CALLBACKS", None)
    for devices in (1, 2):
        proc = subprocess.run(
            [sys.executable, str(script), str(devices), str(probe_size)], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "d1_rank0.json").read_text())
    r0 = json.loads((tmp_path / "d2_rank0.json").read_text())
    r1 = json.loads((tmp_path / "d2_rank1.json").read_text())
    assert r0["steps"] == r1["steps"] and r0["steps"][0] == 0 and r0["steps"][-1] == 12  # one shared plan
    assert len(one["step0"]) > (20 if probe_size > 1 else 10)
    for k, v in one["step0"].items():
        w = r0["step0"][k]
        assert (v != v and w != w) or w == pytest.approx(v, rel=1e-4, abs=1e-5), k  # nan where one process has nan
