"""Non-probe steps are free of host syncs: the nine callbacks add no ``aten._local_scalar_dense`` to them.

A host sync (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``) stalls a GPU's pipeline on every step it happens on;
the callbacks do their host-side work on probe, gradient-read and loss-check steps only. Here every step's
``aten._local_scalar_dense`` calls are counted under a ``TorchDispatchMode`` on a stock ``nn.TransformerEncoder`` with
the nine attached by the plugin at a fixed cadence, and compared with the same run without callbacks, step by step.

On a CPU this sees every scalar read but not device-to-host copies (``.cpu()``, ``.tolist()`` of a CUDA tensor are
not ``_local_scalar_dense``); :func:`test_non_probe_steps_do_not_sync_cuda` runs the same steps on a GPU under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call (skipped without CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.plugin import CALLBACK_NAMES, LENS_NAMES, build_callbacks
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import StockEncoderModule

EVERY = 5
STEPS = 10


class ScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (what ``.item()``, ``float()`` and ``bool()`` of a tensor dispatch to)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class PerStep(L.Callback):
    """Records the counter at each batch start: step ``i`` owns the calls up to the start of batch ``i + 1``."""

    def __init__(self, mode: ScalarReads) -> None:
        self.mode, self.marks = mode, []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.marks.append(self.mode.count)

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.marks.append(self.mode.count)

    def per_step(self) -> list[int]:
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


class ProbeSteps(L.Callback):
    """Placed last: the batches at whose end some callback probed (its probe count went up)."""

    def __init__(self, callbacks: list[L.Callback]) -> None:
        self.callbacks, self.steps, self._seen = callbacks, set(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        done = sum(getattr(c, "_n_probes", 0) for c in self.callbacks)
        if done != self._seen:
            self.steps.add(i)
        self._seen = done


def _loaders(n: int = 16 * (STEPS + 5)) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 8, 8, generator=g), torch.arange(n) % 4
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


def _bundle(tmp_path: Path) -> Path:
    lines = []
    for name in CALLBACK_NAMES + LENS_NAMES:
        args = {"GradientFlow": f"every_n_steps: {EVERY}, histogram_every_n_steps: null"}.get(
            name, f"every_n_steps: {EVERY}, probe_size: 32, probe_at_start: false"
        )
        if name == "StabilityMonitor":
            args += f", check_every_n_steps: {EVERY}"
        if name == "JacobianStability":  # its power iterations are most of the probes' time here
            args += ", max_samples: 2, n_iter: 2"
        lines.append(f"- {{class_path: pdelightning.callbacks.{name}, init_args: {{{args}}}}}")
    path = tmp_path / "nine.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(callbacks: list[L.Callback], accelerator: str = "cpu") -> tuple[list[int], set[int]]:
    torch.manual_seed(0)
    mode = ScalarReads()
    per_step, probes = PerStep(mode), ProbeSteps(callbacks)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator=accelerator,
        devices=1,
        logger=MemoryLogger(),  # with logger=False the plugin's callbacks would step aside
        callbacks=[per_step, *callbacks, probes],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train, val = _loaders()
    with mode:
        trainer.fit(StockEncoderModule(), train, val)
    return per_step.per_step(), probes.steps


def _analysis_steps() -> set[int]:
    """Batches on which a callback works by design: gradient reads (``i % n == 0``), probes and loss checks (the
    batch that completes ``n`` steps), and the last batch (the final probe)."""
    return {i for i in range(STEPS) if i % EVERY in (0, EVERY - 1)} | {STEPS - 1}


def test_non_probe_steps_add_no_scalar_reads(tmp_path: Path) -> None:
    bare, _ = _run([])
    callbacks = build_callbacks(str(_bundle(tmp_path)))
    assert [type(c).__name__ for c in callbacks] == list(CALLBACK_NAMES + LENS_NAMES)
    counted, probe_steps = _run(callbacks)
    assert not [type(c).__name__ for c in callbacks if getattr(c, "disabled", None)]  # all nine took part
    assert len(bare) == len(counted) == STEPS
    analysis = _analysis_steps()
    assert probe_steps and probe_steps <= analysis  # the cadence is the one assumed here
    quiet = [i for i in range(STEPS) if i not in analysis]
    assert len(quiet) >= STEPS // 2
    assert min(bare) > 0  # the counter sees the bare run's own reads (Lightning, Adam)
    added = {i: counted[i] - bare[i] for i in quiet}
    assert added == dict.fromkeys(quiet, 0), f"bare {bare}, with the nine {counted}, probes at {sorted(probe_steps)}"
    assert sum(counted[i] - bare[i] for i in probe_steps) > 0  # ... and the probes' (it can see the callbacks')


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode sees device-to-host syncs")
def test_non_probe_steps_do_not_sync_cuda(tmp_path: Path) -> None:
    callbacks = build_callbacks(str(_bundle(tmp_path)))

    class SyncDebug(L.Callback):
        """``set_sync_debug_mode("error")`` around the training step of the batches no callback works on."""

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
            torch.cuda.set_sync_debug_mode("error" if i not in _analysis_steps() and i > 0 else "default")

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            torch.cuda.set_sync_debug_mode("default")

    try:
        counted, _ = _run([SyncDebug(), *callbacks], accelerator="gpu")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(counted) == STEPS
