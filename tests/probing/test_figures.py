"""The figure worker: figures drawn in another process land in TensorBoard at their step; what cannot be sent is
drawn here; a failing figure is reported, never raised."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from pdelightning.plots import cka_figure, loss_vs_eps_figure
from pdelightning.plots.worker import HEADER, main
from pdelightning.probing.figures import FigureWorker, by_reference, to_host
from tests.helpers.tb import read_events


def _raises(message: str) -> None:
    raise RuntimeError(message)


def _small_figure() -> object:
    from matplotlib.figure import Figure

    return Figure(figsize=(2, 2))


def test_to_host_turns_tensors_into_numpy_through_containers() -> None:
    out = to_host({"a": [torch.ones(2, dtype=torch.bfloat16), (torch.arange(3), 1.5)], "b": "x"})
    assert isinstance(out["a"][0], np.ndarray) and out["a"][0].dtype == np.float32
    assert out["a"][1][0].tolist() == [0, 1, 2] and isinstance(out["a"][1], tuple) and out["a"][1][1] == 1.5
    assert out["b"] == "x"


def test_only_module_level_functions_go_by_reference() -> None:
    assert by_reference(cka_figure) and by_reference(_raises)
    assert not by_reference(lambda: None)

    def local() -> None: ...

    assert not by_reference(local)


def test_worker_main_writes_a_png_image_event_at_the_step(tmp_path: Path) -> None:
    eps = [0.1, 1.0, 10.0]
    jobs = [
        (str(tmp_path), "loss", 7, loss_vs_eps_figure, (eps, [1, 2, 3], [0.9, 0.5, 0.1], 0.8, 0.95, 1.0), {}),
        (str(tmp_path), "bad", 8, _raises, ("boom",), {}),
        (str(tmp_path), "cka", 9, cka_figure, (["a", "b"], np.eye(2)), {}),
    ]
    stream = io.BytesIO(b"".join(HEADER.pack(len(p)) + p for p in map(pickle.dumps, jobs)))
    out = io.StringIO()
    main(stream, out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "ok\tloss" and lines[1].startswith("error\tbad\tRuntimeError('boom')") and lines[2] == "ok\tcka"
    events = read_events(tmp_path)
    assert sorted(events.Tags()["images"]) == ["cka", "loss"]
    (image,) = events.Images("loss")
    assert image.step == 7
    png = image.encoded_image_string
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (image.width, image.height) == (900, 360)  # figsize (9, 3.6) at 100 dpi


def test_figures_are_drawn_in_another_process_and_lambdas_here(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    worker = FigureWorker()
    worker.submit(writer, "by_reference", 3, _small_figure)
    worker.submit(writer, "lambda", 4, lambda: _small_figure())
    assert worker.submitted == 0 and worker.written == 1  # the lambda was drawn here, at once; the other is held
    worker.release()
    assert worker.submitted == 1
    worker.drain(wait=True)
    writer.close()
    assert worker.written == 2 and not worker.errors
    events = read_events(tmp_path)
    assert [e.step for e in events.Images("by_reference")] == [3] and [e.step for e in events.Images("lambda")] == [4]
    assert len(list(tmp_path.glob("*.figures"))) == 1


def test_a_failing_figure_is_reported_once_and_the_rest_still_land(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    worker = FigureWorker()
    worker.submit(writer, "bad", 1, _raises, "boom")
    worker.submit(writer, "good", 2, _small_figure)
    with pytest.warns(UserWarning, match=r"a figure \(bad\) failed to render: RuntimeError\('boom'\)"):
        worker.drain(wait=True)
    writer.close()
    assert worker.written == 1 and len(worker.errors) == 1
    assert [e.step for e in read_events(tmp_path).Images("good")] == [2]


def test_a_worker_that_cannot_start_means_figures_drawn_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no processes here")

    monkeypatch.setattr("pdelightning.probing.figures.subprocess.Popen", refuse)
    writer = SummaryWriter(str(tmp_path))
    worker = FigureWorker()
    worker.submit(writer, "a", 1, _small_figure)
    with pytest.warns(UserWarning, match=r"figure worker process did not start \(OSError\('no processes here'\)\)"):
        worker.release()
    worker.submit(writer, "b", 2, _small_figure)  # drawn here at once: no second attempt, no second warning
    writer.close()
    assert worker.submitted == 0 and worker.written == 2
    assert [e.step for e in read_events(tmp_path).Images("a")] == [1] and not list(tmp_path.glob("*.figures"))
