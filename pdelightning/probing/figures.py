"""Figures off the training thread: a background worker renders matplotlib figures into TensorBoard."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn


class FigureWorker:
    """One daemon thread that draws figures and writes them with ``writer.add_figure(tag, fig, step)``.

    The training thread only enqueues a closure that builds a ``matplotlib.figure.Figure`` from data it already holds
    (copied to the CPU), so a training step never waits for rendering. Each figure carries its step, so the
    TensorBoard timeline is right whatever order the writes land in. :meth:`drain` waits for the queue (at the end
    of training); a failing figure is reported once and skipped, never raised into the run.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Any, str, int, Callable[[], Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failed = False
        self.written = 0

    def submit(self, writer: Any, tag: str, step: int, draw: Callable[[], Any]) -> None:
        """Render ``draw()`` and write it to ``writer`` under ``tag`` at ``step``, in the background."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="pdelightning-figures", daemon=True)
            self._thread.start()
        self._queue.put((writer, tag, step, draw))

    def _run(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                writer, tag, step, draw = item
                figure = draw()
                writer.add_figure(tag, figure, global_step=step, close=True)
                self.written += 1
            except Exception as err:  # a figure must never break training
                if not self._failed:
                    rank_zero_warn(f"pdelightning: a figure ({item[1] if item else '?'}) failed to render: {err!r}")
                    self._failed = True
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until every submitted figure is written."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()
