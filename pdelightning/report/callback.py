"""The run report for plain Lightning users: a callback that prints the summary and writes ``report.html``.

The ``pdelightning fit`` command reports every run by itself (between "Finished after …" and the log path); a
script that calls ``Trainer.fit`` adds :class:`RunReport` to get the same at the end of ``fit``.
"""

from __future__ import annotations

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from pdelightning.report.summary import report_after_fit


class RunReport(Callback):
    """Print the analysis summary and write ``<log_dir>/report.html`` when ``fit`` ends (rank zero only).

    Runs at ``on_fit_end``, after the last probe: it waits for the figure worker to write the last figures and
    flushes the loggers, then reads the run back from the TensorBoard event files (see :mod:`pdelightning.report`).
    No collectives; other ranks do nothing. A report that cannot be made prints one line saying why. Of several
    ``RunReport`` of one trainer (the script's own and the ``PDELIGHTNING_CALLBACKS`` plugin's) only the first in
    ``trainer.callbacks`` reports.

    Attributes:
        lines: the summary printed (empty before the end of ``fit``, off rank zero, and for a ``RunReport`` that
            another one of the same trainer comes before).
        from_plugin: attached by the ``PDELIGHTNING_CALLBACKS`` plugin (``pdelightning fit`` drops it: the command
            prints the summary itself).

    Example::

        trainer = L.Trainer(callbacks=[AttentionSimilarity(), GradientFlow(), RunReport()])
        trainer.fit(model, datamodule=dm)   # ends with the summary; report.html in trainer.logger.log_dir
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.from_plugin = False

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if next(c for c in trainer.callbacks if isinstance(c, RunReport)) is not self:
            return  # another RunReport of this trainer reports (e.g. the script's own beside the plugin's)
        self.lines = report_after_fit(trainer)
        if self.lines:
            print("\n" + "\n".join(self.lines))
