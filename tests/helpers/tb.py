"""Read TensorBoard event files back with tensorboard's own event reader."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pdelightning.probing.figures import wait_for_figures


def read_events(log_dir: str | Path) -> EventAccumulator:
    """Load every event file under ``log_dir`` (the newest run directory that has one), once the figure workers
    that ``fit`` left writing have finished.
    """
    wait_for_figures()
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {log_dir}")
    acc = EventAccumulator(
        str(files[-1].parent), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def scalar_tags(log_dir: str | Path) -> set[str]:
    return set(read_events(log_dir).Tags()["scalars"])


def scalars(log_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one scalar tag."""
    return [(e.step, e.value) for e in read_events(log_dir).Scalars(tag)]
