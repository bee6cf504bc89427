"""Where results go with loggers other than TensorBoard: CSVLogger (scalars in metrics.csv, figures as PNG files with
one notice), W&B and MLflow offline (figures as their images), several loggers at once, and ``logger=False``."""

from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pdelightning.callbacks import GradientFlow, InformationFlow, PerturbationEval, StabilityMonitor
from pdelightning.probing.figures import FigureOutputs, FigureWorker, png_path, wait_for_figures
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task
from tests.helpers.tb import read_events

FIXED = {"budget": None, "every_n_steps": 2, "probe_size": 16, "probe_batch_size": 8}
PNG = b"\x89PNG\r\n\x1a\n"


def _callbacks() -> list[L.Callback]:
    return [PerturbationEval(**FIXED, figure_every_n_probes=1), InformationFlow(**FIXED), GradientFlow(every_n_steps=2)]


def _fit(logger: Any, callbacks: list[L.Callback] | None = None, max_steps: int = 4) -> L.Trainer:
    torch.manual_seed(0)
    task = our_task("transformer", n_layers=2)
    trainer = L.Trainer(
        max_steps=max_steps, logger=logger, callbacks=_callbacks() if callbacks is None else callbacks,
        enable_progress_bar=False, accelerator="cpu", enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(task, *image_loaders(n=32))
    return trainer


def _csv_metrics(path: Path) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of a CSVLogger's metrics.csv."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and v != "":
                    out.setdefault(k, {})[step] = float(v)
    return out


def _notices(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_csv_logger_gets_the_scalars_of_every_logger_and_the_figures_as_png_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CSVLogger and an in-memory logger side by side: the same scalars in both; the figures as PNG files in the CSV
    run directory, byte for byte the images TensorBoard gets when it is attached too; one notice says where.
    """
    caplog.set_level(logging.INFO)
    memory, csv_logger = MemoryLogger(), CSVLogger(str(tmp_path), name="csv")
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = _fit([memory, csv_logger, tb])
    wait_for_figures()
    written = _csv_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    analysis = {k for k in memory.keys() if k.startswith("analysis/") and "overhead" not in k}  # noqa: SIM118
    assert len(analysis) > 20
    for key in analysis:
        for step, value in memory.series(key):
            got = written[key][step]
            assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # figures: one PNG per figure and probe, at <log_dir>/figures/<tag>_step<N>.png
    folder = Path(csv_logger.log_dir) / "figures"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    loss_figures = [f"analysis/perturbation_eval/loss_vs_eps_step{s}.png" for s in (0, 2, 4)]
    assert set(loss_figures) <= set(files)
    assert [f for f in files if "information_flow" in f] == [
        "analysis/information_flow/cka_matrix_step4.png",
        "analysis/information_flow/heatmaps_step4.png",
    ]  # fmt: skip (figures of the last probe only, by default)
    events = read_events(tb.log_dir)
    for step, image in zip((0, 2, 4), events.Images("analysis/perturbation_eval/loss_vs_eps"), strict=True):
        data = (folder / f"analysis/perturbation_eval/loss_vs_eps_step{step}.png").read_bytes()
        assert image.step == step and data[:8] == PNG and data == image.encoded_image_string
    figures = ProbeHub.of(trainer).figures
    assert figures.written == figures.submitted == len(files) and not figures.errors
    notices = _notices(caplog, "takes no images")
    assert notices == [
        f"pdelightning: CSVLogger takes no images: figures are written as PNG files to {folder}/<tag>_step<N>.png "
        "(histograms only go to TensorBoard or W&B)"
    ]


def test_figures_drawn_here_reach_png_files_and_loggers_too(tmp_path: Path) -> None:
    """The fallback (a drawing function that cannot go to the worker) writes the same places."""
    from matplotlib.figure import Figure

    handed: list[tuple[str, int, bytes]] = []
    out = FigureOutputs(
        png_dirs=[str(tmp_path / "png")], deliver=[lambda t, p, s: handed.append((t, s, Path(p).read_bytes()))]
    )
    worker = FigureWorker()
    worker.submit(out, "a/b", 5, lambda: Figure(figsize=(1, 1)))
    data = Path(png_path(str(tmp_path / "png"), "a/b", 5)).read_bytes()
    assert data[:8] == PNG and handed == [("a/b", 5, data)] and worker.written == 1


NO_LOGGER = (
    "pdelightning: the Trainer has no logger (logger=False), so nothing the analysis callbacks measure is written: "
    "those attached by PDELIGHTNING_CALLBACKS (on_missing='warn') are switched off and run no probe; callbacks "
    "attached explicitly still run, their results only in their attributes. Give the Trainer a logger (e.g. "
    "CSVLogger or TensorBoardLogger) to record them."
)


def _count_probes(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """The steps of every probe and every gradient read from now on."""
    probes: list[int] = []
    reads: list[int] = []
    run, read = ProbeHub.run, GradientFlow._read

    def counted_run(self: ProbeHub, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        probes.append(trainer.global_step)
        run(self, trainer, *args, **kwargs)

    def counted_read(self: GradientFlow, trainer: L.Trainer, *args: Any) -> None:
        reads.append(trainer.global_step)
        read(self, trainer, *args)

    monkeypatch.setattr(ProbeHub, "run", counted_run)
    monkeypatch.setattr(GradientFlow, "_read", counted_read)
    return probes, reads


def _said(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "pdelightning" in str(w.message) or "switched off" in str(w.message)]


def test_no_logger_switches_the_plugins_callbacks_off_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """``logger=False`` with ``PDELIGHTNING_CALLBACKS=all``: said once, no probe and no gradient read, exit normally."""
    monkeypatch.setenv("PDELIGHTNING_CALLBACKS", "all")
    probes, reads = _count_probes(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(False, [])
    assert trainer.global_step == 4 and len(trainer.callbacks) >= 9
    assert _said(caught) == [NO_LOGGER]
    assert probes == [] and reads == []
    assert all(c.disabled for c in trainer.callbacks if hasattr(c, "disabled"))
    # with a logger the same callbacks probe, and the counting above sees it
    _fit(MemoryLogger(), [])
    assert probes and reads


def test_no_logger_keeps_explicit_callbacks_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attached explicitly, the callbacks still run (their attributes hold the results), and the run is told once."""
    probes, _ = _count_probes(monkeypatch)
    stability = StabilityMonitor(**FIXED, action="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(False, [stability, InformationFlow(**FIXED)])
    assert _said(caught) == [NO_LOGGER]
    assert probes == [0, 2, 4] and trainer.global_step == 4
    assert all(getattr(c, "active", True) for c in trainer.callbacks)


def test_wandb_offline_gets_the_scalars_and_the_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="pdelightning-test")
    logged: list[dict[str, Any]] = []
    real_log = logger.experiment.log
    monkeypatch.setattr(
        logger.experiment, "log", lambda data, *a, **k: logged.append(dict(data)) or real_log(data, *a, **k)
    )
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _fit([logger, csv_logger])
    wandb_scalars = {
        (k, int(d["trainer/global_step"])): v
        for d in logged
        for k, v in d.items()
        if k.startswith("analysis/") and isinstance(v, (int, float))
    }
    csv_scalars = {
        (k, step): v
        for k, series in _csv_metrics(Path(csv_logger.log_dir) / "metrics.csv").items()
        if k.startswith("analysis/")
        for step, v in series.items()
    }
    assert len(csv_scalars) > 20 and csv_scalars.keys() == wandb_scalars.keys()
    assert all(wandb_scalars[k] == pytest.approx(v, rel=1e-6, nan_ok=True) for k, v in csv_scalars.items())
    images = [(d["trainer/global_step"], k, v) for d in logged for k, v in d.items() if k.endswith("loss_vs_eps")]
    assert [s for s, _, _ in images] == [0, 2, 4]  # handed over before fit returned, at their steps
    # wandb stores each image under its own step counter: in delivery order, which is the trainer's step order
    media = Path(logger.experiment.dir) / "media" / "images" / "analysis" / "perturbation_eval"
    stored = sorted(media.glob("loss_vs_eps_*.png"), key=lambda p: int(p.name.split("_")[3]))
    folder = Path(csv_logger.log_dir) / "figures"
    assert len(stored) == len(images) == 3
    for (step, key, value), path in zip(images, stored, strict=True):
        (image,) = value
        assert image.format == "png"
        assert path.read_bytes() == (folder / f"{key}_step{step}.png").read_bytes()  # the very PNG the worker drew
    hist = [d for d in logged for k in d if "gradient_flow/grad_hist" in k]
    assert hist and not ProbeHub.of(trainer).figures.errors
    logger.experiment.finish()


def test_mlflow_gets_the_scalars_and_the_figures_as_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store with no database (mlflow-skinny)
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="pdelightning", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    trainer = _fit([logger])
    wait_for_figures()
    client = logger.experiment
    history = client.get_metric_history(logger.run_id, "analysis/perturbation_eval/loss_clean")
    assert sorted(m.step for m in history) == [0, 2, 4]
    artifacts = Path(client.get_run(logger.run_id).info.artifact_uri.removeprefix("file:"))
    pngs = sorted(str(p.relative_to(artifacts)) for p in artifacts.rglob("*.png"))
    assert {f"figures/analysis/perturbation_eval/loss_vs_eps_step{s}.png" for s in (0, 2, 4)} <= set(pngs)
    assert all((artifacts / p).read_bytes()[:8] == PNG for p in pngs)
    assert not ProbeHub.of(trainer).figures.errors
