"""The launchers: torchrun with 2 CPU processes trains for real; the SLURM script parses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.configs import CONFIGS
from tests.helpers.tb import scalar_tags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ddp
def test_torchrun_launcher_with_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "NPROC": "2", "ACCELERATOR": "cpu", "MASTER_PORT": "29531", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "launch/torchrun.sh"), str(CONFIGS / "quickstart.yaml"),
         "--trainer.max_steps=12", "--trainer.log_every_n_steps=5", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stdout + proc.stderr or "Initializing distributed: GLOBAL_RANK: 1" in proc.stderr
    assert "train/loss" in scalar_tags(tmp_path)
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # rank zero alone writes


def test_slurm_script_is_valid_bash_and_wires_the_allocation() -> None:
    script = (ROOT / "launch/slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "launch/slurm.sbatch")], check=True)
    assert '--trainer.devices="${SLURM_NTASKS_PER_NODE:-1}"' in script
    assert '--trainer.num_nodes="${SLURM_NNODES:-1}"' in script
