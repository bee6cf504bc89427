"""ProbeCallback cadence: which probes draw figures (the first, every n-th, and the last of training)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest

from pdelightning.callbacks.base import ProbeCallback
from tests.helpers.models import image_loaders, our_task


class Recorder(ProbeCallback):
    name = "recorder"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[int, bool]] = []

    def finish(self, session) -> None:
        self.calls.append((session.step, self.figures_due))


def _fit(callback: ProbeCallback, **trainer_kw) -> None:
    train, val = image_loaders(n=48, batch_size=16)  # 3 steps per epoch
    trainer = L.Trainer(
        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1, **trainer_kw,
    )  # fmt: skip
    trainer.fit(our_task(), train, val)


def test_figures_on_first_every_nth_and_last_epoch_probe() -> None:
    cb = Recorder(every_n_epochs=1, figure_every_n_probes=3)
    _fit(cb, max_epochs=5)
    # probes: start (0), then the end of epochs 1..5 (steps 3..15); figures at probe 0, 3 and the last
    assert cb.calls == [(0, True), (3, False), (6, False), (9, True), (12, False), (15, True)]


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ({"max_steps": 8}, [(2, True), (4, False), (6, False), (8, True)]),
        ({"max_epochs": 2}, [(2, True), (4, False), (6, True)]),  # 3 steps per epoch: step 6 is the last batch
    ],
)
def test_figures_on_the_last_step_probe(limit: dict, expected: list) -> None:
    cb = Recorder(every_n_steps=2, every_n_epochs=None, probe_at_start=False, figure_every_n_probes=10)
    _fit(cb, **limit)
    assert cb.calls == expected
