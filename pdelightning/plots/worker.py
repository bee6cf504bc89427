"""The figure worker: a separate Python process that draws figures and writes them into TensorBoard event files
and PNG files.

Started by :class:`~pdelightning.probing.figures.FigureWorker` as ``python -m pdelightning.plots.worker``. It reads
jobs from stdin, each a length-prefixed pickle of ``(where, tag, step, draw, args, kwargs)`` where ``draw`` is a
module-level function (e.g. from :mod:`pdelightning.plots.draw`) and the arguments are plain numbers and numpy
arrays; it calls ``draw(*args, **kwargs)`` and encodes the figure as PNG once. ``where`` is a TensorBoard log
directory, or a dict ``{"tb": [log_dir, ...], "png": [path, ...]}``: the PNG is appended as an image summary at
``step`` to an event file of its own in each log directory (TensorBoard merges the files of a run directory), and
written to each path (parent directories created; for loggers without images, and for those the training process
hands a file to). For each job it prints ``ok`` or ``error`` with the tag on stdout, in job order, and it exits when
stdin closes, after the last job.

Being another process, it never holds the training process's GIL: training threads are not slowed by drawing.
It imports only numpy, matplotlib and tensorboard's event writer (no torch).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import sys
import time
from typing import IO, Any

HEADER = struct.Struct("<Q")


def png_of(figure: Any) -> tuple[bytes, int, int]:
    """``(png, width, height)`` of a matplotlib figure (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    png = buf.getvalue()
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    return png, width, height


def image_event(tag: str, step: int, png: bytes, width: int, height: int) -> Any:
    """A TensorBoard ``Event`` holding one PNG image summary (what ``SummaryWriter.add_figure`` writes)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
    return Event(wall_time=time.time(), step=int(step), summary=Summary(value=[Summary.Value(tag=tag, image=image)]))


def write_png(path: str, png: bytes) -> None:
    """Write ``png`` to ``path`` (parents created), through a temporary file so no reader sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.part"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def read_job(stream: IO[bytes]) -> bytes | None:
    """The next job's pickled bytes, or ``None`` at the end of the stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    data = stream.read(n)
    return data if len(data) == n else None


def main(stdin: IO[bytes] | None = None, stdout: IO[str] | None = None) -> None:
    """Serve jobs until stdin closes (see the module docstring)."""
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(19)  # training's threads come first on a busy machine; figures use what is left
    import matplotlib

    matplotlib.use("Agg")
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    writers: dict[str, Any] = {}
    try:
        while (data := read_job(stdin)) is not None:
            tag = "?"
            try:
                where, tag, step, draw, args, kwargs = pickle.loads(data)
                where = {"tb": [where], "png": []} if isinstance(where, str) else where
                png, width, height = png_of(draw(*args, **kwargs))
                for path in where.get("png", []):
                    write_png(path, png)
                for log_dir in where.get("tb", []):
                    if log_dir not in writers:
                        writers[log_dir] = EventFileWriter(log_dir, filename_suffix=".figures")
                    writers[log_dir].add_event(image_event(tag, step, png, width, height))
                    writers[log_dir].flush()
                stdout.write(f"ok\t{tag}\n")
            except Exception as err:  # one bad figure must not stop the others
                message = repr(err).replace("\n", " ")
                stdout.write(f"error\t{tag}\t{message}\n")
            stdout.flush()
    finally:
        for writer in writers.values():
            with contextlib.suppress(Exception):
                writer.close()


if __name__ == "__main__":
    main()
