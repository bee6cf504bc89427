"""The report of a run: what the analysis found, a headline per callback, and a one-page ``report.html``.

Read back from the run's TensorBoard event files (:mod:`.events`), so the same report comes at the end of
``pdelightning fit``, from ``pdelightning summary <log_dir>`` for a finished run, and from :class:`RunReport` for a
plain Lightning script. Findings are pure rules over the logged scalars (:mod:`.rules`), each stating its evidence
and threshold; every tag the report reads is in one table (:data:`~pdelightning.report.tags.TAGS`).
"""

from pdelightning.report.callback import RunReport
from pdelightning.report.events import RunData, RunNotFoundError, read_run
from pdelightning.report.headlines import Headline, headlines
from pdelightning.report.rules import RULES, Finding, find_all
from pdelightning.report.summary import Report, main, report_after_fit, summarize
from pdelightning.report.tags import TAGS, TagPattern

__all__ = [
    "RULES",
    "TAGS",
    "Finding",
    "Headline",
    "Report",
    "RunData",
    "RunNotFoundError",
    "RunReport",
    "TagPattern",
    "find_all",
    "headlines",
    "main",
    "read_run",
    "report_after_fit",
    "summarize",
]
