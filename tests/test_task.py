"""ClassificationTask: the loss of eqs. (3)/(14) by hand, learning, logged keys and cadence, optimizer factories."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning.task import ClassificationTask, l2_penalty
from tests.helpers.models import image_loaders

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered.*")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(kind: str = "transformer", **kw) -> nn.Module:
    cls = TransformerClassifier if kind == "transformer" else PDEClassifier
    args = dict(num_classes=4, d_model=8, n_layers=1, n_heads=2, d_ff=16, image_size=8, bottleneck_dim=4)
    return cls(**(args | kw))


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**(args | kw))


def _rows(trainer: L.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# ---------------------------------------------------------------- the loss, by hand


@pytest.mark.parametrize("kind", ["transformer", "pde"])
@pytest.mark.parametrize(("beta", "l2"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.5, 1e-2)])
def test_training_step_loss_by_hand(kind: str, beta: float, l2: float) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(_model(kind), num_classes=4, beta=beta, l2=l2).train()
    x, y = torch.rand(6, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    pooled: list[Tensor] = []
    task.model.hook_pooled.register_forward_hook(lambda m, i, o: pooled.append(o))

    torch.manual_seed(1)  # the same bottleneck noise in both passes when beta > 0 samples
    loss = task.training_step((x, y), 0)
    torch.manual_seed(1)
    logits = task.model(x)

    ce = -logits.log_softmax(-1)[torch.arange(6), y].mean()
    bn = task.model.bottleneck
    mu, logvar = bn.mu(pooled[1]), bn.logvar(pooled[1]).clamp(-20, 10)
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(-1).mean()
    weights = {n: p for n, p in task.model.named_parameters() if p.ndim >= 2}
    assert "embed.proj.weight" in weights and "head.weight" in weights and "head.bias" not in weights
    w2 = sum((p**2).sum() for p in weights.values())
    torch.testing.assert_close(loss, ce + beta * kl + l2 * w2)
    assert kl > 0  # the KL term is there to be weighted
    if beta == 0.0 and l2 == 0.0:  # nothing added to the cross-entropy
        torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, y), rtol=0, atol=0)


def test_l2_penalty_known_value() -> None:
    assert l2_penalty([torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [2.0]])]).item() == pytest.approx(30.0)
    assert l2_penalty([]).item() == 0.0


def test_beta_zero_makes_the_model_deterministic_in_training() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 8, 8)
    deterministic = ClassificationTask(_model(), num_classes=4, beta=0.0).train()
    assert deterministic.model.bottleneck.sample is False
    torch.testing.assert_close(deterministic(x), deterministic(x), rtol=0, atol=0)
    stochastic = ClassificationTask(_model(), num_classes=4, beta=0.1).train()
    with torch.no_grad():
        stochastic.model.bottleneck.logvar.bias.fill_(0.0)
    assert stochastic.model.bottleneck.sample is True
    assert not torch.allclose(stochastic(x), stochastic(x))


def test_plain_module_without_kl() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    task = ClassificationTask(net, num_classes=4, l2=0.1)
    x, y = torch.rand(3, 8, 8), torch.tensor([0, 1, 2])
    expected = nn.functional.cross_entropy(net(x), y) + 0.1 * net[1].weight.pow(2).sum()
    torch.testing.assert_close(task.training_step((x, y), 0), expected)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        ("ours", {"beta": -0.1}, r"beta=-0.1 must be >= 0"),
        ("ours", {"l2": -1e-3}, r"l2=-0.001 must be >= 0"),
        ("no_bottleneck", {"beta": 0.1}, r"beta=0.1 needs a model with a Gaussian bottleneck \(set bottleneck_dim\)"),
        ("plain", {"beta": 0.1}, r"beta=0.1 needs a model with a Gaussian bottleneck.*got Linear"),
    ],
)
def test_bad_arguments_raise(model: str, kwargs: dict, match: str) -> None:
    module = {"ours": _model, "no_bottleneck": partial(_model, bottleneck_dim=None), "plain": partial(nn.Linear, 2, 2)}
    with pytest.raises(ValueError, match=match):
        ClassificationTask(module[model](), num_classes=4, **kwargs)


# ---------------------------------------------------------------- a short fit


EPOCHS, LOG_EVERY, BATCHES = 5, 4, 6  # image_loaders: 96 samples / batch 16


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[L.Trainer, float, float, list[int]]:
    """One short fit on the learnable synthetic image task, shared by the tests below.

    Returns the trainer, the full training-set loss before and after, and the steps at which the
    task called ``log_dict`` for its step metrics.
    """
    torch.manual_seed(0)
    train, val = image_loaders()
    model = _model(d_model=16, d_ff=32, bottleneck_dim=8)
    task = ClassificationTask(model, num_classes=4, beta=1e-3, l2=1e-4, optimizer=partial(torch.optim.Adam, lr=1e-2))

    def full_train_loss() -> float:
        with torch.no_grad():
            x, y = train.dataset.tensors
            return nn.functional.cross_entropy(task.eval()(x), y).item()

    before = full_train_loss()
    task.train()  # Lightning keeps the modules' mode at the start of fit
    trainer = _trainer(tmp_path_factory.mktemp("fit"), max_epochs=EPOCHS, log_every_n_steps=LOG_EVERY)
    log_dict_steps: list[int] = []
    log_dict = task.log_dict

    def spy(*args, **kwargs) -> None:
        log_dict_steps.append(trainer.fit_loop.epoch_loop._batches_that_stepped)
        log_dict(*args, **kwargs)

    task.log_dict = spy  # type: ignore[method-assign]
    trainer.fit(task, train, val)
    return trainer, before, full_train_loss(), log_dict_steps


def test_fit_lowers_the_loss_and_learns(fitted) -> None:
    trainer, before, after, _ = fitted
    assert before > 1.2  # about log(4) at init
    assert after < 0.6 * before
    rows = _rows(trainer)
    train_loss = [float(r["train/loss"]) for r in rows if "train/loss" in r]
    assert train_loss[-1] < 0.6 * train_loss[0]
    val_acc = [float(r["val/acc"]) for r in rows if "val/acc" in r]
    assert val_acc[-1] >= 0.75  # chance is 0.25
    assert trainer.callback_metrics["val/acc"] >= 0.75


def test_logged_keys_and_cadence(fitted) -> None:
    trainer, _, _, log_dict_steps = fitted
    rows = _rows(trainer)
    keys = set().union(*rows)
    assert {"train/ce", "train/ib_kl", "train/l2", "train/loss", "train/acc", "val/loss", "val/acc"} <= keys

    step_rows = [r for r in rows if "train/loss" in r]
    # every LOG_EVERY-th batch (0-based steps 3, 7, ...), all four step keys together
    assert len(step_rows) == EPOCHS * BATCHES // LOG_EVERY
    logging_steps = list(range(LOG_EVERY - 1, EPOCHS * BATCHES, LOG_EVERY))
    assert [int(r["step"]) for r in step_rows] == logging_steps
    assert log_dict_steps == logging_steps  # the task does not even call log on the other steps
    assert all({"train/ce", "train/ib_kl", "train/l2"} <= r.keys() for r in step_rows)
    for r in step_rows:  # the logged parts add up to the logged loss
        expected = float(r["train/ce"]) + 1e-3 * float(r["train/ib_kl"]) + 1e-4 * float(r["train/l2"])
        assert math.isclose(float(r["train/loss"]), expected, rel_tol=1e-5)
    # epoch-level keys once per epoch
    assert sum("train/acc" in r for r in rows) == EPOCHS
    assert sum("val/loss" in r for r in rows) == EPOCHS
    assert sum("val/acc" in r for r in rows) == EPOCHS


# ---------------------------------------------------------------- optimizer and scheduler factories


class _RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_optimizer_and_scheduler_callables_are_used(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train, val = image_loaders(n=32)
    task = ClassificationTask(
        _model(),
        num_classes=4,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    record = _RecordLR()
    trainer = _trainer(
        tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=1, logger=False, callbacks=[record]
    )
    trainer.fit(task, train, val)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.StepLR) and config.interval == "epoch"
    assert record.lrs == pytest.approx([0.1, 0.05, 0.025])


def test_default_optimizer_is_adamw_without_scheduler() -> None:
    task = ClassificationTask(_model(), num_classes=4)
    assert isinstance(task.configure_optimizers(), torch.optim.AdamW)


def test_a_checkpoint_names_its_class(tmp_path: Path) -> None:
    """A reader (a reference_checkpoint) finds the class that rebuilds the checkpoint without importing it."""
    from pdelightning.callbacks._reference import named_class

    class MyTask(ClassificationTask):
        pass

    checkpoint: dict = {}
    ClassificationTask(_model()).on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "task.ckpt")
    assert named_class(tmp_path / "task.ckpt") is ClassificationTask
    MyTask(_model()).on_save_checkpoint(checkpoint)
    assert checkpoint["pdelightning_class_path"].endswith("test_a_checkpoint_names_its_class.<locals>.MyTask")
