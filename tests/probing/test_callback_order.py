"""The order of the probe callbacks in the trainer's list does not change what any of them computes."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from pdelightning.callbacks import AttentionSimilarity, InformationFlow
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task

FIXED = {"budget": None, "every_n_steps": 2, "probe_size": 16, "probe_batch_size": 8, "on_error": "raise"}


def _fit(callbacks: list[L.Callback]) -> MemoryLogger:
    logger = MemoryLogger()
    torch.manual_seed(0)
    task = our_task("pde", n_layers=2)
    trainer = L.Trainer(
        max_steps=4,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
    )
    torch.manual_seed(1)
    trainer.fit(task, *image_loaders(n=48))
    return logger


def test_attention_similarity_after_another_probe_callback_compares_with_the_start_model() -> None:
    # InformationFlow's on_train_start runs the shared start probe; AttentionSimilarity's reference (the model at
    # the start of training) must exist by then, whichever of the two comes first in the list
    first = _fit([AttentionSimilarity(**FIXED), InformationFlow(**FIXED)])
    second = _fit([InformationFlow(**FIXED), AttentionSimilarity(**FIXED)])
    keys = {k for k in first.keys() if k.startswith("analysis/attention_similarity/")}  # noqa: SIM118
    assert keys and keys == {k for k in second.keys() if k.startswith("analysis/attention_similarity/")}  # noqa: SIM118
    for key in keys:
        a, b = first.series(key), second.series(key)
        assert [s for s, _ in a] == [s for s, _ in b] == [0, 2, 4], key
        for (_, va), (_, vb) in zip(a, b, strict=True):
            assert vb == pytest.approx(va, rel=1e-6, abs=1e-6, nan_ok=True), key
    # the reference is the start model: the step-0 probe compares the model with itself
    cosine = [k for k in keys if "/cosine/" in k or k.endswith("/cosine")]
    assert cosine
    for key in cosine:
        assert first.series(key)[0][1] == pytest.approx(1.0, abs=1e-5), key
