"""The shared probe: one forward for every callback gives each the values it computes alone; figures land at
their step from the background worker; the batch/forward contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from pdelightning.callbacks import (
    AttentionSimilarity,
    InformationFlow,
    LayerMutualInformation,
    PerturbationEval,
    StabilityMonitor,
)
from pdelightning.probing.batch import call_model, per_sample_loss, split_batch, valid_from_batch
from pdelightning.probing.hub import ProbeHub
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders, our_task
from tests.helpers.tb import read_events

PROBE_CALLBACKS = (AttentionSimilarity, InformationFlow, LayerMutualInformation, PerturbationEval, StabilityMonitor)
FIXED = {"budget": None, "every_n_steps": 2, "probe_size": 24, "probe_batch_size": 8}


def _fit(callbacks: list[L.Callback], logger: Any, max_steps: int = 4) -> L.Trainer:
    torch.manual_seed(0)
    task = our_task("pde", n_layers=2)
    trainer = L.Trainer(
        max_steps=max_steps, logger=logger, callbacks=callbacks, enable_progress_bar=False, accelerator="cpu",
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=2,
    )  # fmt: skip
    torch.manual_seed(1)
    trainer.fit(task, *image_loaders(n=48))
    return trainer


def test_shared_forward_gives_every_callback_its_values_alone() -> None:
    together = MemoryLogger()
    trainer = _fit([cls(**FIXED) for cls in PROBE_CALLBACKS], together)
    hub = ProbeHub.of(trainer)
    assert len(hub.history) == 3  # steps 0, 2, 4: one probe each for all five callbacks
    for cls in PROBE_CALLBACKS:
        alone = MemoryLogger()
        _fit([cls(**FIXED)], alone)
        mine = {k for k in alone.keys() if k.startswith(f"analysis/{cls.name}/")}  # noqa: SIM118
        assert mine, cls.name
        for key in mine:
            a, t = alone.series(key), together.series(key)
            assert [s for s, _ in a] == [s for s, _ in t], key
            for (_, va), (_, vt) in zip(a, t, strict=True):
                assert vt == pytest.approx(va, rel=1e-6, abs=1e-6, nan_ok=True), key


def test_callbacks_with_their_own_cadences_probe_at_their_own_steps_together() -> None:
    # the hub checks every callback once per step and hook (the first callback's hook does it for all): a callback
    # whose cadence differs from the first one's must still probe at exactly its own steps
    fixed = {"budget": None, "probe_size": 16, "probe_batch_size": 8}
    logger = MemoryLogger()
    _fit([StabilityMonitor(**fixed, every_n_steps=2), InformationFlow(**fixed, every_n_steps=3)], logger, max_steps=7)
    probed: dict[str, set[int]] = {}
    for k in logger.keys():  # noqa: SIM118
        # every key of each callback (not the last one's alone); StabilityMonitor's loss check has its own cadence
        if k.startswith("analysis/") and not k.endswith(("/loss_ema", "/loss_spike", "/detail/nonfinite")):
            probed.setdefault(k.split("/")[1], set()).update(s for s, _ in logger.series(k))
    assert sorted(set(probed["stability_monitor"])) == [0, 2, 4, 6]
    assert sorted(set(probed["information_flow"])) == [0, 3, 6]  # an explicit cadence: no extra probe at the end


def test_figures_from_the_background_worker_land_at_their_step(tmp_path: Path) -> None:
    callbacks = [
        StabilityMonitor(**FIXED),
        PerturbationEval(**FIXED, figure_every_n_probes=1),
        InformationFlow(**FIXED, figure_every_n_probes=2),
    ]
    trainer = _fit(callbacks, TensorBoardLogger(str(tmp_path)), max_steps=6)
    # 4 probes (0, 2, 4, 6): loss_vs_eps at each; heatmaps and cka_matrix at every 2nd and the last (0, 4, 6)
    figures = ProbeHub.of(trainer).figures
    events = read_events(tmp_path)  # waits for the worker process
    assert figures.submitted == figures.written == 4 + 2 * 3 and not figures.errors
    assert list(tmp_path.rglob("*.figures")), "drawn by the worker process, in an event file of its own"
    steps = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert steps["analysis/perturbation_eval/loss_vs_eps"] == [0, 2, 4, 6]
    assert steps["analysis/information_flow/heatmaps"] == [0, 4, 6]


def test_overhead_is_logged_at_every_budgeted_probe() -> None:
    logger = MemoryLogger()
    trainer = _fit([StabilityMonitor(probe_size=16)], logger, max_steps=8)
    fractions = logger.series("analysis/overhead/fraction")
    seconds = logger.series("analysis/overhead/probe_seconds")
    assert next(s for s, _ in seconds) == 0 and [s for s, _ in seconds][-1] == 8  # a probe at the start and the end
    assert fractions and fractions[0][0] > 0 and all(v >= 0 for _, v in fractions)  # no ratio before training
    assert ProbeHub.of(trainer).schedule is not None


# ---- the forward contract -------------------------------------------------------------------------------------
class HookedTask(L.LightningModule):
    """A model that needs something special: it defines probe_forward and probe_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)

    def probe_forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(batch["features"]["a"] + batch["features"]["b"])

    def probe_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, batch["target"], reduction="none") * 2


def test_the_forward_contract() -> None:
    x, m, y = torch.randn(2, 3), torch.tensor([[False, False, True], [False, True, True]]), torch.tensor([0, 1])
    assert valid_from_batch((x, m, y)).tolist() == [[True, True, False], [True, False, False]]
    assert valid_from_batch({"input_ids": x, "attention_mask": (~m).long()}).tolist() == (~m).tolist()
    additive = torch.zeros(2, 3).masked_fill(m, float("-inf"))
    assert valid_from_batch((x, additive, y)).tolist() == (~m).tolist()
    args, kwargs, labels = split_batch({"pixel_values": x, "labels": y})
    assert args == () and list(kwargs) == ["pixel_values"] and labels is y
    # a user's hook wins, and its per-sample losses are used as given
    task = HookedTask()
    batch = {"features": {"a": torch.ones(2, 4), "b": torch.zeros(2, 4)}, "target": y}
    logits = call_model(task, batch)
    torch.testing.assert_close(logits, task.net(torch.ones(2, 4)))
    torch.testing.assert_close(
        per_sample_loss(task, batch, logits, None), 2 * F.cross_entropy(logits, y, reduction="none")
    )
    # language-model logits [B, T, V]: the mean token loss of each sample over labelled tokens (-100 ignored)
    lm = torch.randn(2, 3, 5)
    tokens = torch.tensor([[1, 2, -100], [4, -100, -100]])
    loss = per_sample_loss(torch.nn.Identity(), None, lm, tokens)
    torch.testing.assert_close(loss[1], F.cross_entropy(lm[1, :1], tokens[1, :1]))
    torch.testing.assert_close(loss[0], F.cross_entropy(lm[0, :2], tokens[0, :2]))


def test_too_few_probes_under_the_budget_are_said_once_with_a_cadence() -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([StabilityMonitor(probe_size=16, budget=0.001)], MemoryLogger(), max_steps=20)
    said = [str(w.message) for w in caught if "analysis budget" in str(w.message)]
    assert len(said) == 1, said  # once per run
    assert "every_n_steps=" in said[0] and "points" in said[0], said[0]  # the cadence that gives a curve, its cost
