"""Figures off the training process: a worker process draws matplotlib figures and writes them where the run's
loggers take them (:class:`FigureOutputs`): TensorBoard event files, PNG files for loggers without images
(``<log_dir>/figures/<tag>_step<N>.png``), and PNG files the training process hands to loggers that take images
(W&B, MLflow) once the worker has written them.

A figure thread in the training process would still slow training: drawing is Python that holds the GIL, and every
small torch op of a training step (or a probe) releases and re-acquires it, waiting behind the drawing thread each
time. So :class:`FigureWorker` hands figures to another process (:mod:`pdelightning.plots.worker`): the training
thread converts the data to numpy and pickles it with the drawing function; when the probe is over
(:meth:`FigureWorker.release`, so the drawing does not compete with the probe for the CPU) the jobs go to the worker,
started then if it is not running (a feeder thread writes them into its pipe). The worker runs at the lowest CPU
priority and writes each figure at its step into an event file of its own in the logger's directory; TensorBoard
shows it with the run's other events.

:meth:`FigureWorker.drain` (at the end of training) closes the queue without waiting, so ``fit`` returns as soon as
training is done; the figures land moments later, and before the Python process exits (:func:`wait_for_figures`
runs at exit). Figures still to be handed to a logger in this process (W&B, MLflow) are waited for at that point
instead, so they reach the logger before it is finalised. A drawing function that cannot be sent by reference (a
lambda, a closure, one defined in ``__main__``), or a worker that cannot start, is drawn on the training thread
instead, as before; a failing figure is reported once and skipped, never raised into the run.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib
import os
import pickle
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from pdelightning.plots.worker import HEADER, png_of, write_png

_DRAINED: list[tuple[subprocess.Popen[bytes], threading.Thread, threading.Thread]] = []
_WORKERS: weakref.WeakSet[FigureWorker] = weakref.WeakSet()


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a numpy array on the host (floats as float32), through dicts, lists and
    tuples; everything else as it is.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return (t.float() if t.is_floating_point() else t).cpu().numpy()
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj) if not hasattr(obj, "_fields") else type(obj)(*map(to_host, obj))
    return obj


def by_reference(fn: Callable[..., Any]) -> bool:
    """Whether another process can import ``fn`` by its module and name (not a lambda, closure or ``__main__``)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return False
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return False
    return obj is fn


def _log_dir(writer: Any) -> str | None:
    get = getattr(writer, "get_logdir", None)
    return str(get()) if callable(get) else None


#: ``deliver(tag, png_path, step)``: hand a written PNG file to a logger (it copies or uploads it).
Deliver = Callable[[str, str, int], None]


@dataclass
class FigureOutputs:
    """Where a figure goes (rank zero).

    Attributes:
        writers: TensorBoard ``SummaryWriter`` s (an image event at the step).
        png_dirs: directories that get ``<tag>_step<N>.png`` (the tag's ``/`` as sub-directories).
        deliver: loggers that take images, as functions handed the PNG file once it is written.
    """

    writers: list[Any] = field(default_factory=list)
    png_dirs: list[str] = field(default_factory=list)
    deliver: list[Deliver] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.writers or self.png_dirs or self.deliver)


def png_path(root: str, tag: str, step: int) -> str:
    """``<root>/<tag>_step<step>.png``, the tag's ``/`` as sub-directories and anything unusual replaced by ``_``.

    Example::

        >>> png_path("run/figures", "analysis/pde_fit/coefficients", 12)
        'run/figures/analysis/pde_fit/coefficients_step12.png'
    """
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in tag.split("/") if p and p not in (".", "..")]
    return os.path.join(root, *(parts or ["figure"])) + f"_step{int(step)}.png"


class FigureWorker:
    """Draws figures in a worker process and writes them into TensorBoard (see the module docstring).

    Attributes:
        submitted: figures sent to a worker process.
        written: figures written (by a worker, or drawn here as the fallback).
        errors: messages of figures that failed.
    """

    def __init__(self) -> None:
        self.submitted = 0
        self.written = 0
        self.errors: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._jobs: queue.Queue[bytes | None] = queue.Queue()
        self._held: list[tuple[bytes, tuple[Any, ...]]] = []
        self._threads: tuple[threading.Thread, threading.Thread] | None = None
        self._cannot_start = False
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[list[Deliver], str, str, int] | None] = collections.deque()
        self._scratch: str | None = None
        _WORKERS.add(self)

    # ---- submitting ------------------------------------------------------------------------------------------------
    def submit(self, out: Any, tag: str, step: int, draw: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Draw ``draw(*args, **kwargs)`` and write it to ``out`` (a :class:`FigureOutputs`, or one TensorBoard
        ``SummaryWriter``) under ``tag`` at ``step``, off training (held until :meth:`release`; the data are copied
        now).
        """
        out = out if isinstance(out, FigureOutputs) else FigureOutputs(writers=[out])
        if not out:
            return
        tb_dirs = [_log_dir(w) for w in out.writers]
        if all(d is not None for d in tb_dirs) and not self._cannot_start and by_reference(draw):
            paths = [png_path(d, tag, step) for d in out.png_dirs]
            delivery = None
            if out.deliver:
                delivery = (list(out.deliver), tag, png_path(self.scratch(), tag, step), int(step))
                paths.append(delivery[2])
            where = {"tb": tb_dirs, "png": paths}
            try:
                job = pickle.dumps((where, tag, int(step), draw, to_host(args), to_host(kwargs)), protocol=4)
            except Exception:
                job = None
            if job is not None:
                self._held.append((job, (out, tag, step, draw, args, kwargs), delivery))
                return
        self._draw_here(out, tag, step, draw, args, kwargs)

    def scratch(self) -> str:
        """A private temporary directory for the PNG files handed to loggers (removed at exit)."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="pdelightning-figures-")
        return self._scratch

    def release(self) -> None:
        """Send the held figures to the worker process (started if needed); drawn here if it cannot start."""
        held, self._held = self._held, []
        if held and self._start():
            self.submitted += len(held)
            for job, _, delivery in held:
                self._pending.append(delivery)  # the worker answers one line per job, in order
                self._jobs.put(job)
            return
        for _, (out, tag, step, draw, args, kwargs), _ in held:
            self._draw_here(out, tag, step, draw, args, kwargs)

    def _draw_here(
        self,
        out: FigureOutputs,
        tag: str,
        step: int,
        draw: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        try:  # a bare Figure draws on its own Agg canvas: the user's pyplot backend is left alone
            figure = draw(*args, **kwargs)
            if out.png_dirs or out.deliver:
                png = png_of(figure)[0]
                for d in out.png_dirs:
                    write_png(png_path(d, tag, step), png)
                if out.deliver:
                    path = png_path(self.scratch(), tag, step)
                    write_png(path, png)
                    self._deliver((out.deliver, tag, path, int(step)))
            for i, writer in enumerate(out.writers):
                writer.add_figure(tag, figure, global_step=step, close=i == len(out.writers) - 1)
            self.written += 1
        except Exception as err:  # a figure must never break training
            self._failed(f"{tag}\t{err!r}")

    def _deliver(self, delivery: tuple[list[Deliver], str, str, int]) -> None:
        """Hand a written PNG file to each logger that takes images, then remove it (each logger has its copy)."""
        targets, tag, path, step = delivery
        try:
            for fn in targets:
                try:
                    fn(tag, path, step)
                except Exception as err:  # a logger that refuses an image must not break training
                    self._failed(f"{tag}\t{err!r}")
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)

    def _failed(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
            first = len(self.errors) == 1
        if first:
            tag, _, err = message.partition("\t")
            rank_zero_warn(f"pdelightning: a figure ({tag}) failed to render: {err}")

    # ---- the process ---------------------------------------------------------------------------------------------
    def _start(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._cannot_start:
            return False
        paths = [p for p in sys.path if p]  # the worker imports the drawing functions the way this process does
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pdelightning.plots.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
        except Exception as err:
            self._cannot_start = True
            rank_zero_warn(f"pdelightning: the figure worker process did not start ({err!r}); drawing figures here")
            return False
        self._proc, self._jobs, self._pending = proc, queue.Queue(), collections.deque()
        feed = threading.Thread(target=self._feed, args=(proc, self._jobs), name="pdelightning-figures", daemon=True)
        read = threading.Thread(
            target=self._read, args=(proc, self._pending), name="pdelightning-figures-read", daemon=True
        )
        feed.start()
        read.start()
        self._threads = (feed, read)
        return True

    def _feed(self, proc: subprocess.Popen[bytes], jobs: queue.Queue[bytes | None]) -> None:
        stdin = proc.stdin
        assert stdin is not None
        try:
            while (job := jobs.get()) is not None:
                stdin.write(HEADER.pack(len(job)) + job)
                stdin.flush()
        except (OSError, ValueError) as err:  # the worker died: what is left is lost, training goes on
            self._failed(f"figure worker\tstopped: {err!r}")
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _read(self, proc: subprocess.Popen[bytes], pending: collections.deque[Any]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            status, _, rest = raw.decode(errors="replace").rstrip("\n").partition("\t")
            delivery = pending.popleft() if pending else None
            if status == "ok":
                if delivery is not None:
                    self._deliver(delivery)
                with self._lock:
                    self.written += 1
            else:
                self._failed(rest)

    # ---- ending --------------------------------------------------------------------------------------------------
    def drain(self, wait: bool = False, timeout: float | None = 300.0) -> None:
        """No more figures for this worker: it finishes the queued ones and exits. With ``wait``, wait for that
        (otherwise :func:`wait_for_figures` does, at the latest when the Python process exits).
        """
        self.release()
        handing = any(d is not None for d in self._pending)  # figures for loggers in this process: wait for them
        if self._proc is not None and self._threads is not None:
            self._jobs.put(None)
            _DRAINED.append((self._proc, *self._threads))
            self._proc, self._threads = None, None
        if wait or handing:
            wait_for_figures(timeout)


def wait_for_figures(timeout: float | None = 300.0) -> None:
    """Wait until every drained figure worker has written its figures and exited (registered to run at exit)."""
    while _DRAINED:
        proc, feed, read = _DRAINED.pop(0)
        feed.join(timeout)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        read.join(timeout)


def _at_exit() -> None:
    workers = list(_WORKERS)
    for worker in workers:
        worker.drain()
    wait_for_figures()
    for worker in workers:
        if worker._scratch is not None:
            shutil.rmtree(worker._scratch, ignore_errors=True)


atexit.register(_at_exit)
