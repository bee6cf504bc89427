"""GradientFlow: exact per-layer gradient norms, flags, accumulation, update ratios, and the fixture models."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.analysis.gradients import group_parameters
from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.gradient_flow import GradientFlow
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events

KEY = "analysis/gradient_flow"


class LinearLoss(L.LightningModule):
    """``loss = sum_p <c_p, p>``: the gradient of every parameter is its fixed coefficient tensor ``c_p``, exactly."""

    def __init__(self, scale: dict[str, float] | None = None, lr: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 5)])
        self.head = nn.Linear(5, 2)
        self.lr = lr
        g = torch.Generator().manual_seed(0)
        scale = scale or {}
        self.coef = {
            n: torch.randn(p.shape, generator=g) * scale.get(n.rsplit(".", 1)[0], 1.0)
            for n, p in self.named_parameters()
        }

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return sum((p * self.coef[n]).sum() for n, p in self.named_parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        rest = [*self.blocks.parameters(), *self.head.parameters()]
        return torch.optim.SGD([{"params": self.embed.parameters()}, {"params": rest}], lr=self.lr)

    def coef_of(self, prefix: str) -> Tensor:
        return torch.cat([c.flatten() for n, c in self.coef.items() if n.startswith(prefix + ".")])


def _loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 3)), batch_size=2)


def _trainer(logger: Logger | bool, callbacks: list, **kw: Any) -> L.Trainer:
    kw = {"max_epochs": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # model initialisation and loader shuffling: the same in every test order


@pytest.mark.parametrize(
    ("make", "kw", "names"),
    [
        (lambda: our_task("transformer"), {}, ["blocks.0", "blocks.1", "embedding", "head"]),
        (lambda: our_task("pde"), {}, ["blocks.0", "blocks.1", "embedding", "head"]),
        (
            StockEncoderModule,
            {"layers": "encoder.layers.*"},
            ["encoder.layers.0", "encoder.layers.1", "embedding", "head"],
        ),
        (MLPModule, {}, ["net.1", "net.3"]),  # fallback: the modules that own parameters
        (MLPModule, {"layers": "net.*"}, ["net.1", "net.3"]),  # parameter-free Flatten/ReLU skipped
    ],
)
def test_grouping(make: Any, kw: dict[str, str], names: list[str]) -> None:
    module = make()
    layers, embedding = GradientFlow(**kw)._layers(module)
    groups = group_parameters(module, layers, embedding)
    assert groups.names == names
    assert len(groups.params) == sum(p.requires_grad for p in module.parameters())
    by_id = {id(p): groups.names[g] for p, g in zip(groups.params, groups.index, strict=True)}
    for n, p in module.named_parameters():
        layer = next((x for x in names if f"{x}." in n), None)
        if layer is not None:
            assert by_id[id(p)] == layer, n  # e.g. the PDE step's alpha and diffusion belong to their block
    if "embedding" in names:
        assert {by_id[id(p)] for n, p in module.named_parameters() if "head" in n} == {"head"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="every_n_steps=0"):
        GradientFlow(every_n_steps=0)
    with pytest.raises(ValueError, match=r"histogram_every_n_steps=0 must be a positive integer, or None"):
        GradientFlow(every_n_steps=10, histogram_every_n_steps=0)
    with pytest.raises(ValueError, match=r"vanishing_threshold=1\.0 and exploding_threshold=0\.5"):
        GradientFlow(vanishing_threshold=1.0, exploding_threshold=0.5)
    with pytest.raises(TargetNotFoundError, match=r"layers='nope\.\*' matched no module"):
        GradientFlow(layers="nope.*").setup(None, MLPModule(), "fit")  # type: ignore[arg-type]


# ---- known answers on a real fit ---------------------------------------------------------------------------
def test_known_gradients_update_ratio_and_cadence() -> None:
    module = LinearLoss(lr=0.1)
    theta0 = {n: p.detach().clone() for n, p in module.named_parameters()}
    logger = MemoryLogger()
    _trainer(logger, [GradientFlow(every_n_steps=2, layers="blocks.*")], max_steps=4).fit(module, _loader())
    groups = {"blocks.0": "blocks.0", "blocks.1": "blocks.1", "embedding": "embed", "head": "head"}
    for layer, prefix in groups.items():
        c = module.coef_of(prefix)
        norms = logger.series(f"{KEY}/grad_norm/{layer}")
        assert [s for s, _ in norms] == [0, 2]  # every 2nd optimizer step from step 0, nothing in between
        assert all(v == pytest.approx(float(torch.linalg.vector_norm(c)), rel=1e-6) for _, v in norms)
        assert all(
            v == pytest.approx(float(c.abs().mean()), rel=1e-6)
            for _, v in logger.series(f"{KEY}/grad_abs_mean/{layer}")
        )
        assert [v for _, v in logger.series(f"{KEY}/detail/vanishing/{layer}")] == [0.0, 0.0]
        # SGD: Δθ = -lr c exactly, and θ before step k is θ0 - k lr c
        t0 = torch.cat([t.flatten() for n, t in theta0.items() if n.startswith(prefix + ".")])
        expected = [(k, 0.1 * float(c.norm()) / float((t0 - k * 0.1 * c).norm())) for k in (0, 2)]
        got = logger.series(f"{KEY}/update_ratio/{layer}")
        assert [s for s, _ in got] == [0, 2]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    pg0 = float(module.coef_of("embed").norm())
    pg1 = float(torch.cat([module.coef_of("blocks"), module.coef_of("head")]).norm())
    assert logger.series(f"{KEY}/detail/param_group_norm/0")[0][1] == pytest.approx(pg0, rel=1e-6)
    assert logger.series(f"{KEY}/detail/param_group_norm/1")[0][1] == pytest.approx(pg1, rel=1e-6)


def test_reads_once_per_optimizer_step_after_accumulation() -> None:
    module = LinearLoss()
    logger = MemoryLogger()
    cb = GradientFlow(every_n_steps=1, layers="blocks.*", log_update_ratio=False)
    _trainer(logger, [cb], accumulate_grad_batches=2).fit(module, _loader(8))  # 4 batches, 2 optimizer steps
    norms = logger.series(f"{KEY}/grad_norm/blocks.1")
    assert [s for s, _ in norms] == [0, 1]
    # each of the two micro-batches contributes c / 2: the accumulated gradient is c
    assert all(v == pytest.approx(float(module.coef_of("blocks.1").norm()), rel=1e-6) for _, v in norms)
    assert not logger.series(f"{KEY}/update_ratio/blocks.1")


def test_vanishing_and_exploding_flagged_by_name() -> None:
    module = LinearLoss(scale={"blocks.0": 0.0, "blocks.1": 1e4})
    logger = MemoryLogger()
    with pytest.warns(UserWarning) as record:
        _trainer(logger, [GradientFlow(every_n_steps=1, layers="blocks.*")], max_steps=2).fit(module, _loader())
    messages = [str(w.message) for w in record if "GradientFlow" in str(w.message)]
    assert any("vanishing gradient in blocks.0" in m for m in messages), messages
    assert any("exploding gradient in blocks.1" in m for m in messages), messages
    assert len([m for m in messages if "vanishing gradient in blocks.0" in m]) == 1  # warned when it turns on only
    assert [v for _, v in logger.series(f"{KEY}/detail/vanishing/blocks.0")] == [1.0, 1.0]
    assert [v for _, v in logger.series(f"{KEY}/detail/exploding/blocks.1")] == [1.0, 1.0]
    for key in (
        "detail/vanishing/blocks.1",
        "detail/exploding/blocks.0",
        "detail/vanishing/head",
        "detail/exploding/embedding",
    ):
        assert {v for _, v in logger.series(f"{KEY}/{key}")} == {0.0}, key


# ---- the fixture models end to end, through TensorBoard --------------------------------------------------------
@pytest.mark.parametrize("kind", ["transformer", "pde", "stock"])
def test_end_to_end_tensorboard(kind: str, tmp_path: Any) -> None:
    if kind == "stock":
        module, kw, layers = (
            StockEncoderModule(),
            {"layers": "encoder.layers.*"},
            ["encoder.layers.0", "encoder.layers.1"],
        )
    else:
        module, kw, layers = our_task(kind), {}, ["blocks.0", "blocks.1"]
    if kind == "transformer":  # plant a vanishing gradient: blocks.0's gradients are multiplied by 1e-12
        for p in module.model.blocks[0].parameters():
            p.register_hook(lambda g: g * 1e-12)
    train, _ = image_loaders(n=80)  # 5 optimizer steps: read at 0, 2, 4
    cb = GradientFlow(every_n_steps=2, histogram_every_n_steps=3, **kw)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _trainer(TensorBoardLogger(tmp_path), [cb])
        trainer.fit(module, train)
    log_dir = trainer.logger.log_dir
    events = read_events(log_dir)
    tags = set(events.Tags()["scalars"])
    for layer in [*layers, "embedding", "head"]:
        for q in ("grad_norm", "grad_abs_mean", "update_ratio", "detail/vanishing", "detail/exploding"):
            values = [(e.step, e.value) for e in events.Scalars(f"{KEY}/{q}/{layer}")]
            assert [s for s, _ in values] == [0, 2, 4], (q, layer)
            assert all(math.isfinite(v) for _, v in values)
        # histograms on the first read step of each 3-step window: 0 (window 0) and 4 (window 1), not 2
        assert [e.step for e in events.Histograms(f"{KEY}/grad_hist/{layer}")] == [0, 4]
    assert f"{KEY}/detail/param_group_norm/0" in tags
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    vanishing = {layer: events.Scalars(f"{KEY}/detail/vanishing/{layer}")[-1].value for layer in layers}
    planted = [str(w.message) for w in record if "vanishing gradient" in str(w.message)]
    if kind == "transformer":
        assert vanishing == {"blocks.0": 1.0, "blocks.1": 0.0}
        assert planted and all("blocks.0" in m for m in planted)
    else:
        assert set(vanishing.values()) == {0.0} and not planted


def test_mlp_falls_back_to_parameter_owning_modules() -> None:
    logger = MemoryLogger()
    train, _ = image_loaders(n=32)
    _trainer(logger, [GradientFlow(every_n_steps=1)], max_steps=2).fit(MLPModule(), train)
    keys = {k for _, m in logger.records for k in m if k.startswith(f"{KEY}/grad_norm/")}
    assert keys == {f"{KEY}/grad_norm/net.1", f"{KEY}/grad_norm/net.3"}
