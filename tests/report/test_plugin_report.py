"""The plugin attaches the run report too: a plain script under ``PDELIGHTNING_CALLBACKS`` ends with the summary
and writes ``report.html``, exactly once, also when the script has its own ``RunReport`` or runs in our CLI."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pdelightning.__main__ import main
from pdelightning.callbacks import GradientFlow
from pdelightning.plugin import ENV_VAR, callbacks_factory
from pdelightning.report import RunReport
from tests.helpers.configs import bare_quickstart

pytestmark = pytest.mark.filterwarnings("ignore:GradientFlow. vanishing gradient")

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = "Analysis summary (1 callback"  # the summary's first line: GradientFlow's scalars, read back
SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as L
    from lightning.pytorch.loggers import TensorBoardLogger
    sys.path.insert(0, {root!r})
    from pdelightning.report import RunReport
    from tests.helpers.models import our_task, image_loaders

    for name, callbacks in (("plugin_only", []), ("own_report", [RunReport()])):
        print("FIT", name, flush=True)
        train, val = image_loaders(n=32)
        trainer = L.Trainer(max_steps=3, logger=TensorBoardLogger({log_dir!r}, name=name), callbacks=callbacks,
                            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                            log_every_n_steps=1, accelerator="cpu")
        trainer.fit(our_task("pde"), train, val)
        print("REPORTS", sum(type(c).__name__ == "RunReport" for c in trainer.callbacks), flush=True)
    """
)


def test_factory_adds_one_report_to_analysis_callbacks_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, "gradient_flow")
    built = callbacks_factory()
    assert [type(c) for c in built] == [GradientFlow, RunReport]
    cfg = tmp_path / "cbs.yaml"  # a bundle that lists the report itself: not a second one
    cfg.write_text("- GradientFlow\n- class_path: pdelightning.report.RunReport\n")
    monkeypatch.setenv(ENV_VAR, str(cfg))
    assert [type(c) for c in callbacks_factory()] == [GradientFlow, RunReport]
    cfg.write_text("- class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")  # no analysis: no report
    assert [type(c).__name__ for c in callbacks_factory()] == ["LearningRateMonitor"]


def test_plain_script_under_the_plugin_prints_the_summary_once(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    log_dir = tmp_path / "logs"
    script.write_text(SCRIPT.format(root=str(ROOT), log_dir=str(log_dir)))
    env = {**os.environ, ENV_VAR: "gradient_flow", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plugin_only, own_report = proc.stdout.split("FIT own_report")
    for name, out, reports in (("plugin_only", plugin_only, 1), ("own_report", own_report, 2)):
        html = log_dir / name / "version_0" / "report.html"
        assert out.count(SUMMARY) == 1, out
        assert out.count(f"Report: {html}") == 1, out
        assert f"REPORTS {reports}" in out  # the user's RunReport and the plugin's: only one of them reports
        assert html.is_file()


def test_cli_under_the_plugin_prints_the_summary_once_before_the_log_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VAR, "gradient_flow")
    out = io.StringIO()
    args = [
        "fit",
        "-c",
        str(bare_quickstart(tmp_path)),
        "--trainer.max_steps=3",
        "--trainer.accelerator=cpu",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(args)
        sys.exit(0)
    assert not done.value.code, out.getvalue()
    lines = out.getvalue().splitlines()
    html = tmp_path / "quickstart" / "version_0" / "report.html"
    assert sum(line.startswith(SUMMARY) for line in lines) == 1, lines
    assert lines.count(f"Report: {html}") == 1 and html.is_file()
    # where the CLI puts it: after "Finished after ...", before the log path
    finished = next(i for i, line in enumerate(lines) if line.startswith("Finished after"))
    summary = next(i for i, line in enumerate(lines) if line.startswith(SUMMARY))
    logs = next(i for i, line in enumerate(lines) if line.startswith("Logs and checkpoints:"))
    assert finished < summary < logs
