"""The run report on real runs: at the end of ``pdelightning fit``, from ``pdelightning summary <log_dir>``, and from
:class:`RunReport` in a plain Lightning script; a run without analysis; a missing directory (exit 2, one line).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from pdelightning.callbacks import AttentionSimilarity, StabilityMonitor
from pdelightning.cli import main
from pdelightning.report import RunReport, read_run, summarize
from tests.helpers.configs import bare_quickstart
from tests.helpers.models import image_loaders, our_task
from tests.helpers.tb import read_events

pytestmark = pytest.mark.filterwarnings("ignore:GradientFlow. vanishing gradient")

ROOT = Path(__file__).resolve().parents[2]
# GradientFlow with a vanishing threshold above every gradient norm: a planted finding whose threshold comes from the
# run's config.yaml (the default 1e-7 would find nothing)
BUNDLE = """
trainer:
  callbacks+:
    - class_path: pdelightning.callbacks.AttentionSimilarity
      init_args: {every_n_steps: 2, probe_size: 32}
    - class_path: pdelightning.callbacks.GradientFlow
      init_args: {every_n_steps: 2, vanishing_threshold: 100.0, exploding_threshold: 10000.0}
    - class_path: pdelightning.callbacks.StabilityMonitor
      init_args: {every_n_steps: 2, probe_size: 32}
"""


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main(args)
        sys.exit(0)
    return int(done.value.code or 0), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 4-step quickstart with three analysis callbacks through the CLI: (run directory, what fit printed)."""
    tmp = tmp_path_factory.mktemp("fit")
    (tmp / "bundle.yaml").write_text(BUNDLE)
    code, out, _ = _run(
        [
            "fit",
            "-c",
            str(bare_quickstart(tmp)),
            "-c",
            str(tmp / "bundle.yaml"),
            "--trainer.max_steps=4",
            "--trainer.accelerator=cpu",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp}",
        ]
    )
    assert code == 0, out
    return tmp / "quickstart" / "version_0", out


def test_fit_ends_with_the_summary_then_the_log_path(fitted: tuple[Path, str]) -> None:
    run_dir, out = fitted
    lines = out.rstrip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Analysis summary (3 callbacks"))
    assert lines[start - 1].startswith("Finished after 4 steps")
    assert lines[-3] == f"Report: {run_dir / 'report.html'}"
    assert lines[-2] == f"Logs and checkpoints: {run_dir}" and lines[-1].startswith("View them with:")
    body = lines[start + 1 : -3]
    assert 5 <= len(body) <= 14  # findings + training + 3 callbacks + cost: about a dozen lines
    for name in ("Training", "AttentionSimilarity", "GradientFlow", "StabilityMonitor", "Analysis cost"):
        assert any(line.strip().startswith(name) for line in body), name
    assert (run_dir / "report.html").is_file()


def test_summary_of_a_finished_run_states_the_planted_finding(fitted: tuple[Path, str]) -> None:
    run_dir, _ = fitted
    (run_dir / "report.html").unlink()
    code, out, err = _run(["summary", str(run_dir)])
    assert code == 0, err
    # the finding's evidence against the event file itself: the smallest gradient norm at the last read
    events = read_events(run_dir)
    norms = {t.rsplit("/", 1)[1]: events.Scalars(t) for t in events.Tags()["scalars"] if "/grad_norm/" in t}
    final = max(e.step for v in norms.values() for e in v)
    at_final = {k: next(e.value for e in v if e.step == final) for k, v in norms.items()}
    smallest = min(at_final, key=at_final.__getitem__)
    assert max(at_final.values()) < 100  # every layer is below the configured threshold
    expected = f"gradients vanish in every layer: grad_norm < 100 at step {final} "
    expected += f"(smallest {at_final[smallest]:.3g} in {smallest})"
    assert expected in out
    page = (run_dir / "report.html").read_text()
    assert expected in page.replace("&lt;", "<")
    assert page.count("data:image/png;base64,") >= 2  # AttentionSimilarity's figures of the last probe
    assert "<svg" in page and "<script" not in page and "http" not in page.split("</style>")[1]


def test_summary_of_a_logger_name_directory_reads_the_newest_version(fitted: tuple[Path, str]) -> None:
    run_dir, _ = fitted
    code, out, _ = _run(["summary", str(run_dir.parent), "--no-html"])
    assert code == 0 and f"reading {run_dir} (the newest of 1 runs" in out


def test_summary_of_a_missing_directory_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "logs" / "nope" / "version_7"
    code, out, err = _run(["summary", str(missing)])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: pdelightning summary: {missing} does not exist "
        "(give a run's log directory, e.g. logs/quickstart/version_0)"
    ]
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["summary", str(tmp_path / "empty")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no TensorBoard event files" in err


def _plain_fit(tmp: Path, callbacks: list[L.Callback]) -> tuple[Path, str]:
    train, val = image_loaders(n=64)
    logger = TensorBoardLogger(tmp, name="plain")
    trainer = L.Trainer(
        max_steps=6,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.fit(our_task(), train, val)
    return Path(logger.log_dir), out.getvalue()


def test_plain_lightning_run_without_analysis_is_summarised_as_training_only(tmp_path: Path) -> None:
    report = RunReport()
    run_dir, printed = _plain_fit(tmp_path, [report])
    assert report.lines and report.lines[0].startswith("Run summary: no analysis was logged in this run")
    assert printed.strip().splitlines()[0] == report.lines[0]
    loss = [v for _, v in read_run(run_dir).scalars["train/loss"]]
    training = next(line for line in report.lines if line.strip().startswith("Training"))
    assert f"train/loss {loss[0]:.3g} → {loss[-1]:.3g}" in training
    assert (run_dir / "report.html").is_file()
    again = summarize(run_dir, write=False)
    assert again.findings == [] and again.callbacks == [] and again.lines[0] == report.lines[0]


def test_run_report_in_a_plain_script_waits_for_the_last_figures(tmp_path: Path) -> None:
    report = RunReport()
    cbs = [
        AttentionSimilarity(every_n_steps=3, probe_size=32),
        StabilityMonitor(every_n_steps=3, probe_size=32),
        report,
    ]
    run_dir, printed = _plain_fit(tmp_path, cbs)
    assert report.lines[0].startswith("Analysis summary (2 callbacks")
    assert report.lines[-1] == f"Report: {run_dir / 'report.html'}" and report.lines[-1] in printed
    page = (run_dir / "report.html").read_text()
    figures = re.findall(r"<figcaption>(analysis/attention_similarity/\w+) · step (\d+)</figcaption>", page)
    assert figures and all(int(step) == 6 for _, step in figures)  # the final probe's, written before the report
    rms = read_run(run_dir).scalars
    growth = [v for t, s in rms.items() if "/rms_growth/" in t for st, v in s if st == 6]
    assert growth and all(math.isfinite(v) for v in growth)
