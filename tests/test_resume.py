"""Kill a run with SIGKILL between checkpoints, resume it into the same version, compare with an uninterrupted run.

:func:`history_diff` / :func:`assert_same_history` compare two TensorBoard log directories tag by tag for
any tag prefixes (``train/``, ``val/`` here; ``analysis/`` can be added by whoever extends this).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pdelightning.cli import build_cli
from pdelightning.probing.figures import wait_for_figures
from pdelightning.resume import event_files

ROOT = Path(__file__).resolve().parents[1]


class KillAtStep(L.Callback):
    """Flush the logs and SIGKILL this process once training reaches ``step`` (a crash between checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "flush"):
                    experiment.flush()
            os.kill(os.getpid(), signal.SIGKILL)


# ---- reusable comparison ---------------------------------------------------------------------------------
def scalar_history(log_dir: str | Path, prefixes: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Every ``(step, value)`` of the scalar tags under ``prefixes``, as written (no orphan purging on read)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith(tuple(prefixes))
    }


def history_diff(
    reference: str | Path, other: str | Path, prefixes: Sequence[str], rtol: float = 1e-5, atol: float = 1e-7
) -> dict[str, Any]:
    """Compare ``other``'s logged scalars with ``reference``'s, tag by tag.

    Returns counts (``duplicated``: points at a step already logged for that tag; ``lost``: reference steps
    missing; ``extra``: steps the reference does not have; ``differing``: common steps whose values are not
    close, NaN equal to NaN) and ``details``, a few human-readable examples.
    """
    a, b = scalar_history(reference, prefixes), scalar_history(other, prefixes)
    out: dict[str, Any] = {"duplicated": 0, "lost": 0, "extra": 0, "differing": 0, "points": 0, "details": []}
    for tag in sorted(set(a) | set(b)):
        pa, pb = a.get(tag, []), b.get(tag, [])
        out["points"] += len(pa)
        counts = Counter(s for s, _ in pb)
        dup = sum(c - 1 for c in counts.values())
        steps_a, steps_b = {s for s, _ in pa}, set(counts)
        lost, extra = sorted(steps_a - steps_b), sorted(steps_b - steps_a)
        values_b = dict(pb)  # the last value written at each step
        differing = [
            s
            for s, v in pa
            if s in values_b
            and not (
                math.isclose(v, values_b[s], rel_tol=rtol, abs_tol=atol) or (math.isnan(v) and math.isnan(values_b[s]))
            )
        ]
        out["duplicated"] += dup
        out["lost"] += len(lost)
        out["extra"] += len(extra)
        out["differing"] += len(differing)
        if dup or lost or extra or differing:
            out["details"].append(
                f"{tag}: {dup} duplicated, lost steps {lost[:5]}, extra steps {extra[:5]}, differing steps "
                f"{differing[:5]}"
                + (f" (e.g. {dict(pa)[differing[0]]} vs {values_b[differing[0]]})" if differing else "")
            )
    return out


def assert_same_history(
    reference: str | Path, other: str | Path, prefixes: Sequence[str] = ("train/", "val/"), values: bool = True
) -> dict[str, Any]:
    """Assert same tags, same steps, no step twice, no gap, and (if ``values``) equal values; returns the diff."""
    diff = history_diff(reference, other, prefixes)
    assert diff["points"] > 0, f"no scalars under {prefixes} in {reference}"
    problems = diff["duplicated"] + diff["lost"] + diff["extra"] + (diff["differing"] if values else 0)
    assert problems == 0, "\n".join(diff["details"])
    return diff


# ---- the runs --------------------------------------------------------------------------------------------
# DigitsDataModule has 1293 training images: 11 batches of 128 per epoch. Checkpoints every 8 steps, not a
# multiple of the epoch (a checkpoint on an epoch's last batch makes Lightning skip that epoch's validation on
# resume; its events are kept, see `resume_step`).
BATCH, STEPS_PER_EPOCH, CKPT_EVERY = 128, 11, 8


ANALYSIS = [
    {"class_path": "pdelightning.callbacks.StabilityMonitor",
     "init_args": {"every_n_steps": 4, "check_every_n_steps": 3, "probe_size": 32}},
    {"class_path": "pdelightning.callbacks.GradientFlow",
     "init_args": {"every_n_steps": 3, "histogram_every_n_steps": 5}},
    {"class_path": "pdelightning.callbacks.LayerMutualInformation",
     "init_args": {"every_n_steps": 6, "probe_size": 64}},
    {"class_path": "pdelightning.callbacks.PDEFit", "init_args": {"every_n_steps": 5, "probe_size": 32}},
]  # fmt: skip
"""Callbacks with history, at fixed cadences (a time budget would place probes by wall-clock time)."""


def _config(tmp_path: Path, epochs: int, ckpt_every: int = CKPT_EVERY, analysis: bool = False) -> Path:
    cfg = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": epochs,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "run"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": ckpt_every, "save_last": True, "save_top_k": -1},
                },
                *(ANALYSIS if analysis else []),
            ],
        },
        "model": {
            "model": {
                "class_path": "TransformerClassifier",
                "init_args": {
                    "d_model": 16,
                    "n_layers": 2,
                    "n_heads": 2,
                    "d_ff": 32,
                    "dropout": 0.1,
                    "bottleneck_dim": 8,
                },
            },
            "beta": 0.001,
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        "data": {"class_path": "DigitsDataModule", "init_args": {"batch_size": BATCH}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kill_run(cfg: Path, save_dir: Path, kill_step: int) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "pdelightning", "fit", "-c", str(cfg),
            f"--trainer.logger.init_args.save_dir={save_dir}",
            "--trainer.callbacks+=tests.test_resume.KillAtStep",
            f"--trainer.callbacks.step={kill_step}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _resume_and_compare(
    tmp_path: Path, epochs: int, kill_step: int, ckpt_every: int = CKPT_EVERY, analysis: bool = False
) -> dict[str, Any]:
    cfg = _config(tmp_path, epochs, ckpt_every, analysis)
    reference = tmp_path / "reference"
    build_cli(["fit", "-c", str(cfg), f"--trainer.logger.init_args.save_dir={reference}"])
    killed = tmp_path / "killed"
    proc = _kill_run(cfg, killed, kill_step)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    version = killed / "run" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert saved_step < kill_step  # killed between checkpoints
    before = history_diff(reference / "run" / "version_0", version, ("train/", "val/"))
    assert before["extra"] == 0 and before["lost"] > 0  # the killed run logged past its checkpoint, then died
    config = (version / "config.yaml").read_text()
    build_cli(["fit", "-c", str(cfg), f"--trainer.logger.init_args.save_dir={killed}", f"--ckpt_path={last}",
               "--trainer.logger.init_args.version=0"])  # fmt: skip
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in version.rglob("*"))
    wait_for_figures()  # the resumed run's last figures: written by the worker process after fit returned
    logged = [f for f in event_files(version) if f.suffix != ".figures"]
    assert len(logged) == 2  # the killed run's file (purged in place) and the resumed run's
    # the resumed run's config differs (no KillAtStep): the killed run's config.yaml is kept, the new one beside it
    assert (version / "config.yaml").read_text() == config
    assert "KillAtStep" in config and "KillAtStep" not in (version / "config.1.yaml").read_text()
    # train/acc accumulates over an epoch in the task's MulticlassAccuracy, whose state is checkpointed: a mid-epoch
    # resume continues the epoch's count
    if analysis:  # the time each probe took differs between runs: its steps are compared, not its values
        assert_same_history(reference / "run" / "version_0", version, ["analysis/overhead/"], values=False)
    measured = ["train/", "val/"] + [
        "analysis/" + k
        for k in ("stability_monitor/", "gradient_flow/", "layer_mutual_information/", "pde_fit/")
        if analysis
    ]
    return assert_same_history(reference / "run" / "version_0", version, measured)


def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # 2 epochs of 11 steps; checkpoints at steps 8 and 16; killed at 19 (mid-epoch 1, after epoch 0 was validated)
    diff = _resume_and_compare(tmp_path, epochs=2, kill_step=19)
    assert diff["differing"] == 0 and diff["points"] > 20


def test_sigkill_with_analysis_callbacks_keeps_every_history(tmp_path: Path) -> None:
    """The callbacks' histories (loss window and EMA, probe counters, histogram window, PDE-fit trajectory) resume:
    every analysis tag has the uninterrupted run's steps, once each, with its values."""
    diff = _resume_and_compare(tmp_path, epochs=2, kill_step=19, analysis=True)
    assert diff["differing"] == 0 and diff["points"] > 100


@pytest.mark.slow
def test_sigkill_longer_run_with_checkpoints_on_epoch_ends(tmp_path: Path) -> None:
    # checkpoints every 11 steps land on epoch ends (Lightning skips that validation on resume: the killed run's
    # events at the checkpoint's step are kept, so there is no gap); killed at 60 of 88
    diff = _resume_and_compare(tmp_path, epochs=8, kill_step=60, ckpt_every=STEPS_PER_EPOCH)
    assert diff["differing"] == 0


def test_history_diff_counts_planted_duplicates_and_gaps(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for name, points in (("a", [(0, 1.0), (5, 2.0), (10, 3.0)]), ("b", [(0, 1.0), (5, 2.5), (5, 2.0), (20, 4.0)])):
        with SummaryWriter(str(tmp_path / name)) as w:
            for step, value in points:
                w.add_scalar("train/loss", value, step)
            w.add_scalar("other/x", 1.0, 0)
    diff = history_diff(tmp_path / "a", tmp_path / "b", ("train/",))
    # b: step 5 twice (last value 2.0 equals a's), step 10 lost, step 20 extra; other/* ignored
    assert (diff["duplicated"], diff["lost"], diff["extra"], diff["differing"], diff["points"]) == (1, 1, 1, 0, 3)
    with pytest.raises(AssertionError, match="train/loss: 1 duplicated"):
        assert_same_history(tmp_path / "a", tmp_path / "b", ("train/",))


def _loops(bts: int, ready: int, completed: int) -> dict:
    total = {"ready": ready, "started": ready, "processed": ready, "completed": completed}
    return {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": bts},
                         "epoch_loop.batch_progress": {"total": total}}}  # fmt: skip


def test_resume_step_known_answers() -> None:
    from pdelightning.resume import resume_step

    # saved in on_train_batch_end of the 17th batch (index 16): its metrics went to step 16, the resumed run logs at 17
    assert resume_step({"loops": _loops(16, 17, 16), "global_step": 17}) == 17
    # saved at an epoch's end (after the batch counter moved on to 22): the resumed run logs at 22
    assert resume_step({"loops": _loops(22, 22, 22), "global_step": 22}) == 22
    assert resume_step({"global_step": 9}) == 9  # no loop state: Lightning's global step


def test_model_config_diff_compares_the_architecture_only() -> None:
    from pdelightning.resume import describe_model, model_config_diff

    cp = "pdelightning.models.TransformerClassifier"
    saved = {"class_path": cp, "init_args": {"n_layers": 4, "d_model": 64, "dropout": 0.1, "num_classes": 10}}
    same = {"class_path": cp, "init_args": {"n_layers": 4, "dropout": 0.3, "num_classes": 20, "d_model": 64}}
    assert model_config_diff(saved, same) == []  # dropout is training-time, num_classes comes from the data
    other = {"class_path": cp, "init_args": {"n_layers": 2, "d_model": 64, "norm": "post"}}
    # norm is missing on the saved side: compared at its default, "pre"
    assert model_config_diff(saved, other) == [("n_layers", 4, 2), ("norm", "pre", "post")]
    pde = {"class_path": "pdelightning.models.PDEClassifier", "init_args": {}}
    assert model_config_diff(saved, pde) == [("class_path", cp, "pdelightning.models.PDEClassifier")]
    assert describe_model(other, ["n_layers", "norm"]) == "TransformerClassifier(n_layers=2, norm='post')"
