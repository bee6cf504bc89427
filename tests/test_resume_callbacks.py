"""Each analysis callback alone: a run that crashes between checkpoints and resumes logs what an uninterrupted one does.

For every callback (parametrised) three fits of 12 steps run through the CLI in this process, with the callback at a
fixed cadence (every 3 steps, no time budget: a budget places probes by wall-clock time) and a checkpoint every 6
steps:

- the reference: uninterrupted;
- the crashed run: an exception at step 8, after the checkpoint at step 6 (its events at steps 6-8 are on disk);
- the resumed run: ``--ckpt_path`` of the step-6 checkpoint, into the crashed run's version (as a user resumes).

Every ``analysis/<callback>/*`` scalar and histogram of the resumed version must equal the reference's bit for bit
(the same steps, each once, the same float32 values): the probes are deterministic functions of the weights, the
probe set and the callback's checkpointed state, so anything else is state the checkpoint lost. The analysis
overhead tags hold wall-clock seconds: their steps are compared, not their values.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pdelightning.callbacks
from pdelightning.cli import build_cli
from pdelightning.probing.figures import wait_for_figures
from pdelightning.resume import _records, event_files

STEPS, CKPT_EVERY, CRASH_AT = 12, 6, 8
PROBE = {"every_n_steps": 3, "probe_size": 32}

CALLBACKS: dict[str, dict[str, Any]] = {
    "AttentionSimilarity": {**PROBE, "max_samples": 16},
    "InformationFlow": PROBE,
    "LayerMutualInformation": PROBE,
    "GradientFlow": {"every_n_steps": 3, "histogram_every_n_steps": 5},
    "PerturbationEval": {**PROBE, "max_samples": 16},
    "StabilityMonitor": {**PROBE, "check_every_n_steps": 5},  # a loss window open across the checkpoint
    "PDEFit": PROBE,
    "JacobianStability": {**PROBE, "max_samples": 4, "n_iter": 3, "block": 2},
    "AttentionRollout": PROBE,
}
"""Each callback's arguments: fixed cadence, tiny probe sets."""


def tag_name(callback: str) -> str:
    """The callback's segment of its tags, ``analysis/<name>/...``."""
    return getattr(pdelightning.callbacks, callback).name


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread: these tiny fits run several times faster than with threads contending for shared cores
    (all three fits of a case use the same count, so their numbers are comparable bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CrashAtStep(L.Callback):
    """Raise once training reaches ``step`` (a crash between checkpoints; the events so far are on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"planted crash at step {self.step}")


def write_config(
    tmp_path: Path, callback: str | None, init_args: dict[str, Any], ckpt_every: int = CKPT_EVERY, num_train: int = 320
) -> Path:
    """A 12-step run of a tiny Transformer with ``callback`` alone (or none) and a checkpoint every ``ckpt_every``
    steps (``0``: at every epoch's end, after its validation)."""
    when = {"every_n_train_steps": ckpt_every} if ckpt_every else {"every_n_epochs": 1}
    cfg = {
        "seed_everything": 3,
        "trainer": {
            "max_steps": STEPS,
            "accelerator": "cpu",
            "devices": 1,
            "log_every_n_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "unset"), "name": "run"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {**when, "save_top_k": -1, "filename": "{step}"},
                },
                *([{"class_path": f"pdelightning.callbacks.{callback}", "init_args": init_args}] if callback else []),
            ],
        },
        "model": {
            "model": {
                "class_path": "TransformerClassifier",
                "init_args": {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "dropout": 0.1},
            },
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
        },
        # 320 training images in batches of 32: epoch 0 ends at step 10 (a validation), steps 11-12 are in epoch 1
        "data": {
            "class_path": "SyntheticImageDataModule",
            "init_args": {"num_train": num_train, "num_val": 64, "num_test": 8, "batch_size": 32},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_analysis(log_dir: Path) -> dict[str, list[tuple[int, Any]]]:
    """``{tag: [(step, value), ...]}`` of every ``analysis/*`` scalar and histogram, as written (no purging on read),
    in step order: a version's event files are read in name order, and a resumed run's file can sort before the
    crashed run's when both were opened in the same second (a stable sort keeps a repeated step repeated).
    """
    wait_for_figures()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0}, purge_orphaned_data=False)
    acc.Reload()
    out: dict[str, list[tuple[int, Any]]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("analysis/"):
            out[tag] = sorted(((e.step, e.value) for e in acc.Scalars(tag)), key=lambda sv: sv[0])
    for tag in acc.Tags()["histograms"]:
        if tag.startswith("analysis/"):
            histograms = ((e.step, _histogram(e.histogram_value)) for e in acc.Histograms(tag))
            out[tag] = sorted(histograms, key=lambda sv: sv[0])
    return out


def _histogram(h: Any) -> tuple[Any, ...]:
    return h.min, h.max, h.num, h.sum, h.sum_squares, tuple(h.bucket_limit), tuple(h.bucket)


def run_three(
    tmp_path: Path,
    callback: str | None,
    init_args: dict[str, Any],
    ckpt_every: int = CKPT_EVERY,
    crash_at: int = CRASH_AT,
    resume_from: int = CKPT_EVERY,
    reference: bool = True,
    num_train: int = 320,
) -> tuple[Path, Path]:
    """The reference and the crashed-then-resumed version directories."""
    cfg = write_config(tmp_path, callback, init_args, ckpt_every, num_train)
    if reference:
        build_cli(["fit", "-c", str(cfg), f"--trainer.logger.init_args.save_dir={tmp_path / 'reference'}"])
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="planted crash"):
        build_cli(
            [
                "fit",
                "-c",
                str(cfg),
                f"--trainer.logger.init_args.save_dir={crashed}",
                "--trainer.callbacks+=tests.test_resume_callbacks.CrashAtStep",
                f"--trainer.callbacks.step={crash_at}",
            ]
        )
    version = crashed / "run" / "version_0"
    ckpt = version / "checkpoints" / f"step={resume_from}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (version / "checkpoints").iterdir())
    build_cli(
        [
            "fit",
            "-c",
            str(cfg),
            f"--trainer.logger.init_args.save_dir={crashed}",
            f"--ckpt_path={ckpt}",
            "--trainer.logger.init_args.version=0",
        ]
    )
    return tmp_path / "reference" / "run" / "version_0", version


def assert_same_analysis(reference: Path, resumed: Path, name: str) -> int:
    """Every analysis tag of ``resumed`` equals ``reference``'s bit for bit (overhead: steps only); returns points."""
    a, b = read_analysis(reference), read_analysis(resumed)
    assert set(a) == set(b), f"tags only in the reference: {set(a) - set(b)}; only resumed: {set(b) - set(a)}"
    assert any(t.startswith(f"analysis/{name}/") for t in a), f"no analysis/{name}/ tags in {sorted(a)}"
    problems, points = [], 0
    for tag in sorted(a):
        steps_a, steps_b = [s for s, _ in a[tag]], [s for s, _ in b[tag]]
        if steps_a != steps_b:
            problems.append(f"{tag}: steps {steps_a} vs {steps_b}")
        elif not tag.startswith("analysis/overhead/"):
            differ = [(s, va, vb) for (s, va), (_, vb) in zip(a[tag], b[tag], strict=True) if va != vb]
            if differ and not all(va != va and vb != vb for _, va, vb in differ):  # NaN equals NaN
                problems.append(f"{tag}: differs at steps {[s for s, _, _ in differ]} (e.g. {differ[0][1:]})")
        points += len(a[tag])
    assert not problems, "\n".join(problems)
    return points


@pytest.mark.parametrize("callback", list(CALLBACKS))
def test_crash_and_resume_gives_the_uninterrupted_values(tmp_path: Path, callback: str) -> None:
    """Resumed from the checkpoint at step 6 (a probe step: the resumed run repeats that probe) after a crash at 8."""
    reference, resumed = run_three(tmp_path, callback, CALLBACKS[callback])
    name = tag_name(callback)
    points = assert_same_analysis(reference, resumed, name)
    steps = {s for tag, pts in read_analysis(reference).items() if tag.startswith(f"analysis/{name}/") for s, _ in pts}
    assert steps & {9, 12}, f"no {name} values after the resume point: {sorted(steps)}"  # compared past the resume
    assert points > 5


def test_jacobian_warm_start_resumes_between_probes(tmp_path: Path) -> None:
    """Resumed from step 4 (between the probes at 3 and 6): the next probe starts from the checkpointed vectors."""
    reference, resumed = run_three(
        tmp_path, "JacobianStability", CALLBACKS["JacobianStability"], ckpt_every=4, crash_at=7, resume_from=4
    )
    assert_same_analysis(reference, resumed, "jacobian_stability")
    # what the checkpoint holds: one top vector per (layer, J or J - I, sample) of the probe at step 3, [T, d] = [8, 16]
    # (rows of 8 pixels, d_model 16), and loadable as data (weights_only)
    states = torch.load(resumed / "checkpoints" / "step=4.ckpt", weights_only=True)["callbacks"]
    (state,) = [v for k, v in states.items() if k.startswith("JacobianStability")]
    assert state["last_probe_step"] == 3
    keys = sorted((layer, variant) for layer, variant, _, _ in state["warm"])
    assert keys == sorted([(f"blocks.{i}", v) for i in (0, 1) for v in ("", "-I")] * 4)  # max_samples=4
    assert {tuple(v.shape) for *_, v in state["warm"]} == {(8, 16)}
    assert set(state["last_metrics"]) >= {"analysis/jacobian_stability/lyapunov"}


@pytest.mark.parametrize("ckpt_every", [5, 0], ids=["last_batch", "epoch_end"])
@pytest.mark.parametrize("callback", ["StabilityMonitor", "JacobianStability"])
def test_epoch_cadence_resumed_at_an_epochs_end(tmp_path: Path, callback: str, ckpt_every: int) -> None:
    """Epochs of 5 steps, probes at every epoch's end; crashed at 7 and resumed from the checkpoint at step 5, written
    on the epoch's last batch (before its validation and epoch-end probe) or at its end (after them)."""
    args = {**CALLBACKS[callback], "every_n_steps": None, "every_n_epochs": 1}
    reference, resumed = run_three(tmp_path, callback, args, ckpt_every, crash_at=7, resume_from=5, num_train=160)
    name = tag_name(callback)
    assert_same_analysis(reference, resumed, name)
    steps = {s for tag, pts in read_analysis(reference).items() if tag.startswith(f"analysis/{name}/") for s, _ in pts}
    assert {0, 5, 10} <= steps


def test_epoch_end_checkpoint_resumes_the_training_history(tmp_path: Path) -> None:
    """No analysis callback: the train/val history after a resume from an epoch-end checkpoint (step 5 of 5-step
    epochs; ``ModelCheckpoint(every_n_epochs=1)`` saves in ``on_train_epoch_end``, as one monitoring a validation
    metric does) equals the uninterrupted run's. Lightning repeats that epoch's end on restart after iterating the
    train loader once: without :class:`~pdelightning.resume.RNGStateCheckpoint`'s handling the next epoch's order
    differed, every later step was logged one step late, and ``train/acc`` got a second, empty point."""
    from tests.test_resume import assert_same_history

    reference, resumed = run_three(tmp_path, None, {}, ckpt_every=0, crash_at=7, resume_from=5, num_train=160)
    assert_same_history(reference, resumed, ("train/", "val/"))


def _hparams_events(log_dir: Path) -> Counter[str]:
    """How many times each hyperparameter summary (``hp_metric``, ``_hparams_/*``) was written under ``log_dir``."""
    from tensorboard.compat.proto.event_pb2 import Event

    found: Counter[str] = Counter()
    for path in event_files(log_dir):
        for record in _records(path):
            for value in Event.FromString(record).summary.value:
                if value.tag == "hp_metric" or value.tag.startswith("_hparams_/"):
                    found[value.tag] += 1
    return found


def test_hparams_and_hp_metric_are_written_once_per_version(tmp_path: Path) -> None:
    """The hyperparameters and ``hp_metric`` (the final val/acc, written at the end of fit) are in each version once:
    a run resumed into its version adds no second copy."""
    _, version = run_three(tmp_path, None, {}, reference=False)
    logged = [p for p in event_files(version) if p.suffix != ".figures"]
    assert len(logged) == 2  # the crashed run's file and the resumed run's
    once = {
        "hp_metric": 1,
        "_hparams_/experiment": 1,
        "_hparams_/session_start_info": 1,
        "_hparams_/session_end_info": 1,
    }
    assert _hparams_events(version) == once
    assert (version / "hparams.yaml").is_file()
    # a fresh version still gets them: the check is per version, not per process (all 12 steps: hp_metric is the
    # final val/acc, so the run must reach its validation at step 10)
    cfg = tmp_path / "config.yaml"
    build_cli(["fit", "-c", str(cfg), f"--trainer.logger.init_args.save_dir={tmp_path / 'crashed'}"])
    assert _hparams_events(tmp_path / "crashed" / "run" / "version_1") == once


@pytest.mark.ddp
@pytest.mark.slow
def test_jacobian_resume_under_ddp(tmp_path: Path) -> None:
    """2 CPU processes (gloo): each rank measures its own probe samples, a checkpoint holds rank 0's state only, so
    the warm vectors are shared after each probe; the resumed run's values equal the uninterrupted run's."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # 320 samples over 2 ranks in batches of 32: epochs of 5 steps. The checkpoint at step 5 ends epoch 0, so the
    # resumed run's DistributedSampler (not resumable mid-epoch) gives epoch 1 the uninterrupted order.
    cfg = write_config(tmp_path, "JacobianStability", CALLBACKS["JacobianStability"], ckpt_every=5)
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--model.model.init_args.bottleneck_dim=null"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    env.pop("PDELIGHTNING_CALLBACKS", None)

    def fit(save_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "pdelightning",
            "fit",
            "-c",
            str(cfg),
            *ddp,
            f"--trainer.logger.init_args.save_dir={save_dir}",
            *extra,
        ]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)

    assert fit(tmp_path / "reference").returncode == 0
    crashed = tmp_path / "crashed"
    proc = fit(crashed, "--trainer.callbacks+=tests.test_resume_callbacks.CrashAtStep", "--trainer.callbacks.step=7")
    assert proc.returncode != 0 and "planted crash" in proc.stderr
    version = crashed / "run" / "version_0"
    proc = fit(
        crashed, f"--ckpt_path={version / 'checkpoints' / 'step=5.ckpt'}", "--trainer.logger.init_args.version=0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = tmp_path / "reference" / "run" / "version_0"
    assert_same_analysis(reference, version, "jacobian_stability")
    assert [s for s, _ in read_analysis(reference)["analysis/jacobian_stability/lyapunov"]] == [0, 3, 6, 9, 12]
