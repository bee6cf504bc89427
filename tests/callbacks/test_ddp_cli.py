"""All six callbacks through the CLI with 2 CPU processes (gloo): no hang, figures once, values = 1 process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.configs import CONFIGS, bare_quickstart
from tests.helpers.tb import read_events

ROOT = Path(__file__).resolve().parents[2]
# Keys measured on the probe set with the step-0 weights (identical across world sizes under the same seed).
# Gradient statistics and the loss EMA depend on each rank's batches, so they are compared for presence only.
PROBE_PREFIXES = (
    "analysis/attention_similarity/",
    "analysis/information_flow/",
    "analysis/layer_mutual_information/",
    "analysis/perturbation_eval/",
    "analysis/stability_monitor/",
)
NOT_PROBE = ("loss_ema", "loss_spike")


def _fit(tmp: Path, devices: int) -> Path:
    save_dir = tmp / f"d{devices}"
    cmd = [
        sys.executable, "-m", "pdelightning", "fit",
        "-c", str(bare_quickstart(tmp)), "-c", str(CONFIGS / "callbacks/all.yaml"),
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", "--trainer.strategy=ddp",
        "--trainer.max_steps=3", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.default_root_dir={save_dir}",
        "--model.model.init_args.d_model=32", "--model.model.init_args.n_layers=2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PDELIGHTNING_CALLBACKS", None)
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return save_dir


@pytest.mark.ddp
def test_two_processes_match_one(tmp_path: Path) -> None:
    one = read_events(_fit(tmp_path, 1))
    two_dir = _fit(tmp_path, 2)
    event_files = list(two_dir.rglob("events.out.tfevents.*"))
    figure_files = [f for f in event_files if f.suffix == ".figures"]
    # rank zero's logger, and the one figure worker it started
    assert len(event_files) - len(figure_files) == 1, f"only rank zero writes events, found {event_files}"
    assert len(figure_files) == 1, f"one figure worker (rank zero's), found {figure_files}"
    two = read_events(two_dir)

    tags1, tags2 = set(one.Tags()["scalars"]), set(two.Tags()["scalars"])
    analysis = {t for t in tags1 if t.startswith("analysis/")}
    assert analysis, "no analysis scalars were logged"
    assert analysis <= tags2, f"missing under DDP: {sorted(analysis - tags2)[:10]}"

    compared = 0
    for tag in sorted(analysis):
        if not tag.startswith(PROBE_PREFIXES) or any(k in tag for k in NOT_PROBE):
            continue
        v1 = {e.step: e.value for e in one.Scalars(tag)}
        v2 = {e.step: e.value for e in two.Scalars(tag)}
        if 0 not in v1:
            continue
        a, b = v1[0], v2[0]
        if math.isnan(a):
            assert math.isnan(b), tag
            continue
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), f"{tag}: 1 process {a} vs 2 processes {b}"
        compared += 1
    assert compared >= 20, f"compared only {compared} step-0 probe values"

    # Each figure is written once per probe by rank zero: as many image events as the 1-process run.
    images1, images2 = one.Tags()["images"], two.Tags()["images"]
    assert images1 and set(images1) == set(images2)
    for tag in images1:
        assert len(two.Images(tag)) == len(one.Images(tag)), tag
