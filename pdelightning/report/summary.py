"""The run report end to end: read a run, find, headline, print the summary and write ``report.html``.

- :func:`summarize`: for a log directory (what ``pdelightning summary <log_dir>`` runs, :func:`main`);
- :func:`report_after_fit`: for a trainer whose ``fit`` just ended (rank zero; the CLI prints its lines between
  "Finished after …" and the log path, and :class:`~pdelightning.report.callback.RunReport` does the same for plain
  Lightning). It waits for the figure worker to write the last figures, so the report holds them, and never raises:
  a report that cannot be made is one line saying why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdelightning.report.events import RunData, RunNotFoundError, read_run, rule_settings
from pdelightning.report.headlines import Headline, headlines
from pdelightning.report.render import render_html, summary_lines
from pdelightning.report.rules import Finding, find_all
from pdelightning.report.tags import analysis_tags, callbacks_logged

REPORT_NAME = "report.html"
EXIT_BAD_INPUT = 2


@dataclass
class Report:
    """A run's report.

    Attributes:
        run_dir: the directory read.
        findings: the findings, most severe first.
        headlines: the training line, one per callback, the analysis cost.
        callbacks: the callback prefixes that logged anything.
        html: where ``report.html`` was written (``None`` when not written).
        lines: the terminal summary.
    """

    run_dir: Path
    findings: list[Finding] = field(default_factory=list)
    headlines: list[Headline] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    html: Path | None = None
    lines: list[str] = field(default_factory=list)


def build(data: RunData, html: Path | None = None) -> Report:
    """Findings and headlines of ``data``; with ``html`` the page is written there."""
    callbacks = callbacks_logged(data.scalars, data.images)
    report = Report(data.log_dir, callbacks=callbacks)
    report.findings = find_all(data.scalars, rule_settings(data.settings)) if callbacks else []
    report.headlines = headlines(data.scalars, callbacks)
    if html is not None:
        page = render_html(
            data.log_dir, report.headlines, report.findings, data.images, len(analysis_tags(data.scalars)), data.note
        )
        tmp = html.with_name(html.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(html)
        report.html = html
    report.lines = summary_lines(report.headlines, report.findings, len(callbacks), report.html, data.note)
    return report


def summarize(log_dir: str | Path, out: str | Path | None = None, write: bool = True) -> Report:
    """Read the run in ``log_dir`` and report it (``report.html`` beside its events unless ``out`` or ``write=False``).

    Raises:
        RunNotFoundError: ``log_dir`` is missing or holds no TensorBoard events.
    """
    data = read_run(log_dir)
    target = None if not write else Path(out) if out is not None else data.log_dir / REPORT_NAME
    return build(data, target)


def _flush(trainer: Any) -> None:
    from pdelightning.probing.figures import wait_for_figures

    for callback in getattr(trainer, "callbacks", []):
        hub = getattr(callback, "_hub", None)
        if hub is not None and getattr(hub, "figures", None) is not None:
            hub.figures.drain()  # idempotent: the probe callbacks' teardown drains it again
    wait_for_figures()
    for logger in getattr(trainer, "loggers", []):
        try:  # the TensorBoard writer's buffered events (RunReport runs before Lightning finalizes the loggers)
            experiment = getattr(logger, "_experiment", None)
            if experiment is not None and hasattr(experiment, "flush"):
                experiment.flush()
        except Exception:  # a finalized (closed) writer has nothing left to flush
            pass


def report_after_fit(trainer: Any) -> list[str]:
    """The summary lines of a run whose ``fit`` just ended (writes ``report.html``); ``[]`` off rank zero.

    Reads the TensorBoard logger's directory once the figures are written. Never raises: a failure is one line.
    """
    if not getattr(trainer, "is_global_zero", True):
        return []
    logger = next((lg for lg in getattr(trainer, "loggers", []) if type(lg).__name__ == "TensorBoardLogger"), None)
    if logger is None or not getattr(logger, "log_dir", None):
        return ["No run report: the run has no TensorBoard logger (the report reads TensorBoard event files)"]
    try:
        _flush(trainer)
        return summarize(logger.log_dir).lines
    except RunNotFoundError as err:
        return [f"No run report: {err}"]
    except Exception as err:  # the report must never break the run that it reports on
        return [f"No run report: {type(err).__name__}: {err}"]


def main(argv: Sequence[str] | None = None) -> int:
    """``pdelightning summary LOG_DIR [--out FILE] [--no-html]``: the summary of an existing run, and its report."""
    parser = argparse.ArgumentParser(
        prog="pdelightning summary",
        description="Summarise a finished run from its TensorBoard events: findings, a headline per analysis "
        "callback, and report.html beside the events (with the figures the run logged).",
    )
    where = "the run's log directory (e.g. logs/quickstart/version_0; a logger's name directory: its newest version)"
    parser.add_argument("log_dir", help=where)
    parser.add_argument("--out", default=None, help="where to write the report (default: <log_dir>/report.html)")
    parser.add_argument("--no-html", action="store_true", help="print the summary only")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = summarize(args.log_dir, out=args.out, write=not args.no_html)
    except RunNotFoundError as err:
        sys.stdout.flush()
        sys.stderr.write(f"error: pdelightning summary: {err}\n")
        return EXIT_BAD_INPUT
    print("\n".join(report.lines))
    return 0
