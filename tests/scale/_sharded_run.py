"""One 2-process gloo run of a tiny model with every analysis callback, under DDP or FSDP2 (``fully_shard``).

``python _sharded_run.py {ddp|fsdp} OUT_DIR``: rank ``r`` writes ``OUT_DIR/{mode}_rank{r}.json`` with every logged
analysis value, the steps on which a full weight was gathered, and the callbacks that stepped aside or failed.
Run by :mod:`tests.scale.test_sharded` (Lightning's ``ModelParallelStrategy`` runs on CPU with gloo).
"""

from __future__ import annotations

import faulthandler
import functools
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pdelightning.callbacks import (
    AttentionRollout,
    AttentionSimilarity,
    GradientFlow,
    InformationFlow,
    JacobianStability,
    LayerMutualInformation,
    PDEFit,
    PerturbationEval,
    StabilityMonitor,
)
from pdelightning.models import TransformerClassifier
from pdelightning.probing.sharding import is_sharded
from pdelightning.task import ClassificationTask
from tests.helpers.loggers import MemoryLogger
from tests.helpers.models import image_loaders

EVERY = 3
STEPS = 6


class ShardedTask(ClassificationTask):
    """Our task; under ``ModelParallelStrategy`` each block, then the whole model, is sharded with ``fully_shard``."""

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None or any(isinstance(p, DTensor) for p in self.parameters()):
            return
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=dp)
        fully_shard(self.model, mesh=dp)


class Gathers(L.Callback):
    """Counts ``DTensor.full_tensor`` calls per optimizer step (the analysis reads full weights through it)."""

    def __init__(self) -> None:
        self.by_step: dict[int, int] = {}
        self._orig = DTensor.full_tensor
        outer = self

        def counted(t: DTensor, *a: object, **k: object) -> torch.Tensor:
            step = outer.trainer.global_step if outer.trainer is not None else -1
            outer.by_step[step] = outer.by_step.get(step, 0) + 1
            return outer._orig(t, *a, **k)

        DTensor.full_tensor = counted  # type: ignore[method-assign]
        self.trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sim = next(c for c in trainer.callbacks if isinstance(c, AttentionSimilarity))  # before its teardown
        self.copies_sharded = [is_sharded(sim._reference), is_sharded(sim._null_model)]


def main(mode: str, out: Path) -> None:
    faulthandler.dump_traceback_later(150, exit=True)  # a hang fails the test with every thread's stack
    torch.manual_seed(0)
    model = TransformerClassifier(
        num_classes=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, image_size=8, bottleneck_dim=None
    )
    task = ShardedTask(model, num_classes=4, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    kw = dict(every_n_steps=EVERY, probe_size=8, probe_batch_size=4, probe_at_start=False)
    callbacks = [
        AttentionSimilarity(nulls=("random_init",), **kw),
        InformationFlow(**kw),
        LayerMutualInformation(**kw),
        PerturbationEval(**kw),
        StabilityMonitor(check_every_n_steps=EVERY, **kw),
        GradientFlow(every_n_steps=EVERY, histogram_every_n_steps=None),
        PDEFit(**kw),
        JacobianStability(max_samples=2, n_iter=4, **kw),
        AttentionRollout(**kw),
    ]
    gathers = Gathers()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if mode == "fsdp" else "ddp"
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, callbacks=[gathers, *callbacks],
        logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=1,
    )  # fmt: skip
    train, val = image_loaders(n=32, batch_size=4)
    train = torch.utils.data.DataLoader(train.dataset, batch_size=4, shuffle=False)
    trainer.fit(task, train, val)
    values = {f"{k}@{s}": v for s, m in logger.records for k, v in m.items() if k.startswith("analysis/")}
    record = {
        "values": values,
        "gathers": {str(k): v for k, v in gathers.by_step.items()},
        "copies_sharded": gathers.copies_sharded,
        "off": {type(c).__name__: c.disabled for c in callbacks if getattr(c, "disabled", None)},
    }
    (out / f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
