"""The machinery every analysis callback shares: cadence, the probe set, gathered state and TensorBoard output.

A probe set is drawn once from the validation data (seeded, the same on every rank and for every world
size); each rank runs the eager model on its strided shard of it in eval mode, appends what it measured
to a :class:`GatherStore` (a torchmetrics ``Metric`` with ``cat`` states), and ``compute()`` gathers the
whole probe set on every rank, ordered by sample index, so the statistics equal the one-process values.
Rank zero then writes scalars, histograms and figures.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from typing_extensions import override

from pdelightning.callbacks._targets import resolve_targets
from pdelightning.models.protocol import AnalysisTargets


class GatherStore(Metric):
    """A ``Metric`` whose states are lists of per-sample tensors, concatenated across ranks on ``compute``.

    ``update(index, **tensors)`` appends one batch (``index`` holds each sample's position in the probe
    set); ``compute()`` returns ``{name: tensor}`` over the whole probe set, sorted by ``index``, identical
    on every rank. Every rank must call ``compute()`` (it is a collective under DDP).
    """

    full_state_update = False

    def __init__(self, keys: list[str]) -> None:
        super().__init__(compute_with_cache=False)
        self.keys = list(keys)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for k in self.keys:
            self.add_state(_state_name(k), default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, **tensors: Tensor) -> None:  # type: ignore[override]
        """Append one batch of per-sample tensors."""
        self.index.append(index.to(self.device))  # type: ignore[attr-defined]
        for k in self.keys:
            getattr(self, _state_name(k)).append(tensors[k].detach().to(self.device))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """Concatenate (across batches and ranks) and order by sample index."""
        index = _cat(self.index)  # type: ignore[attr-defined]
        order = index.argsort()
        return {k: _cat(getattr(self, _state_name(k)))[order] for k in self.keys}


def _state_name(key: str) -> str:
    return "s_" + re.sub(r"\W", "_", key)


def _cat(x: Tensor | list[Tensor]) -> Tensor:
    return torch.cat(x) if isinstance(x, list) else x


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(inputs, targets)`` of a batch given as ``(x, y, ...)``, a dict (``x``/``input``/``input_ids`` and
    ``y``/``label``/``labels``), or bare inputs.
    """
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "input", "inputs", "input_ids", "image") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target") if k in batch), None)
        if x is None:
            raise KeyError(
                f"cannot find the inputs in a batch with keys {sorted(batch)}; expected one of x, input, input_ids"
            )
        return x, y
    return batch, None


class ProbeSet:
    """The fixed probe samples of one rank: ``(x, y, index)`` batches on the CPU (inputs only, no activations).

    Args:
        dataset: the validation dataset.
        collate_fn: its loader's collate function.
        size: number of probe samples (fewer if the dataset is smaller).
        batch_size: probe batch size.
        seed: seed of the draw; the same on every rank.
        rank, world_size: this rank's strided shard ``indices[rank::world_size]``.
    """

    def __init__(
        self, dataset: Any, collate_fn: Any, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        n = len(dataset)
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=g)[: min(size, n)].sort().values
        self.size = len(chosen)
        positions = torch.arange(self.size)[rank::world_size]
        self.batches: list[tuple[Any, Tensor | None, Tensor]] = []
        for start in range(0, len(positions), batch_size):
            pos = positions[start : start + batch_size]
            x, y = split_batch(collate_fn([dataset[int(chosen[p])] for p in pos]))
            self.batches.append((x, y, pos))

    def __iter__(self) -> Iterator[tuple[Any, Tensor | None, Tensor]]:
        return iter(self.batches)


def validation_loader(trainer: L.Trainer) -> DataLoader | None:
    """The ``DataLoader`` the probe set is drawn from: the validation data (of the datamodule or the trainer),
    else, with a warning, the training data; ``None`` if there is neither.
    """
    dm = trainer.datamodule
    for get in (
        lambda: dm.val_dataloader() if dm is not None else None,
        lambda: trainer.val_dataloaders,
        # loaders given to fit() are reachable before the loops load them (setup), only through the loop's source
        lambda: trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader(),
    ):
        try:
            loader = get()
        except Exception:
            continue
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, DataLoader):
            return loader
    train = trainer.train_dataloader
    if train is None:
        with contextlib.suppress(Exception):
            train = trainer.fit_loop._data_source.dataloader()
    if isinstance(train, (list, tuple)):
        train = train[0] if train else None
    if isinstance(train, DataLoader):
        rank_zero_warn("no validation data: the analysis probe set is drawn from the training data")
        return train
    return None


_LAYOUTS: dict[int, dict[str, dict[str, list[Any]]]] = {}


def tensorboard(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the first ``TensorBoardLogger`` on rank zero, else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
    """Write scalars to every logger at ``step`` (default: the current global step), on rank zero only."""
    if not trainer.is_global_zero or not metrics:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step if step is None else step)


def write_layout(trainer: L.Trainer, name: str, charts: Mapping[str, list[str]]) -> None:
    """Merge ``{chart title: [tag regex, ...]}`` of callback ``name`` into the run's custom-scalars layout.

    One multiline chart per entry, grouped under ``analysis/<name>``; the layouts of all callbacks writing
    to the same ``SummaryWriter`` are merged, and the merged layout is written (rank zero only).
    """
    writer = tensorboard(trainer)
    if writer is None or not charts:
        return
    merged = _LAYOUTS.setdefault(id(writer), {})
    merged[f"analysis/{name}"] = {title: ["Multiline", list(regexes)] for title, regexes in charts.items()}
    writer.add_custom_scalars(merged)


class ProbeCallback(Callback):
    """Base class of the analysis callbacks: when to probe, on what, and where results go.

    Args:
        every_n_steps: probe after every ``n``-th optimizer step (``None``: not by steps).
        every_n_epochs: probe at the end of every ``n``-th training epoch (``None``: not by epochs).
        probe_at_start: also probe once before the first training step (the curves' step 0).
        probe_size: number of validation samples in the fixed probe set.
        probe_batch_size: batch size of the probe forwards.
        layers: glob of the layer modules (``*`` = one name segment), overriding discovery.
        attention: glob of their attention modules.
        embedding: name/glob of the input-embedding module.
        seed: seed of the probe-set draw.
        figure_every_n_probes: draw figures on the first probe, every ``n``-th after it and the last probe of
            training (rendering a matplotlib figure costs more than the rest of a probe); scalars are logged at
            every probe.

    Raises:
        ValueError: for non-positive cadences or sizes, or no cadence at all.
    """

    name: ClassVar[str] = "probe"
    needs: ClassVar[tuple[str, ...]] = ("layers",)

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        probe_at_start: bool = True,
        probe_size: int = 256,
        probe_batch_size: int = 128,
        layers: str | None = None,
        attention: str | None = None,
        embedding: str | None = None,
        seed: int = 0,
        figure_every_n_probes: int = 5,
    ) -> None:
        for arg, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value <= 0:
                raise ValueError(f"{arg}={value} must be a positive integer or None")
        if every_n_steps is None and every_n_epochs is None and not probe_at_start:
            raise ValueError("set every_n_steps or every_n_epochs (or probe_at_start): this callback would never run")
        sizes = (("probe_size", probe_size), ("probe_batch_size", probe_batch_size))
        for arg, value in (*sizes, ("figure_every_n_probes", figure_every_n_probes)):
            if value <= 0:
                raise ValueError(f"{arg}={value} must be positive")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.probe_at_start = probe_at_start
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.patterns = {"layers": layers, "attention": attention, "embedding": embedding}
        self.seed = seed
        self.figure_every_n_probes = figure_every_n_probes
        self._n_probes = 0
        self._final_probe = False
        self._probe: ProbeSet | None = None
        self._last_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs, **self.patterns
        )

    # ---- discovery and probe set -------------------------------------------------------------------
    def targets(self, pl_module: nn.Module) -> AnalysisTargets:
        """Resolve (every probe: PDE coefficients are read live) the layers this callback analyses."""
        return resolve_targets(pl_module, need=self.needs, **self.patterns)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.targets(pl_module)  # fail fast, with the list of modules seen, before any training

    def probe_set(self, trainer: L.Trainer) -> ProbeSet:
        """The fixed probe set (built on first use from the validation data)."""
        if self._probe is None:
            loader = validation_loader(trainer)
            if loader is None:
                raise RuntimeError(
                    f"{type(self).__name__} needs validation data for its probe set: give the trainer a "
                    "val_dataloader (or a datamodule with one)"
                )
            self._probe = ProbeSet(
                loader.dataset, loader.collate_fn, self.probe_size, self.probe_batch_size, self.seed,
                trainer.global_rank, trainer.world_size,
            )  # fmt: skip
        return self._probe

    def iter_probe(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> Iterator[tuple[Any, Tensor | None, Tensor]]:
        """This rank's probe batches moved to the module's device: ``(x, y, index)``."""
        for x, y, idx in self.probe_set(trainer):
            x = x.to(pl_module.device) if isinstance(x, Tensor) else x
            y = y.to(pl_module.device) if isinstance(y, Tensor) else y
            yield x, y, idx

    @staticmethod
    def forward(pl_module: nn.Module, x: Any) -> Any:
        """One eager forward of the model (hooks fire even when parts of it are ``torch.compile``d)."""
        stance = getattr(torch.compiler, "set_stance", None)
        ctx = stance("force_eager") if stance is not None else contextlib.nullcontext()
        with ctx:
            return pl_module(x)

    # ---- cadence ---------------------------------------------------------------------------------------
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> None:
        if trainer.sanity_checking or self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        self._final_probe = final or trainer.should_stop
        try:
            self.probe(trainer, pl_module)
        finally:
            pl_module.train(was_training)
            self._n_probes += 1
            self._final_probe = False

    @staticmethod
    def _steps_done(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        return trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_layout(trainer)
        if self.probe_at_start and trainer.global_step == 0:
            self._run(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            last_batch = trainer.is_last_batch and self._last_epoch(trainer)
            self._run(trainer, pl_module, final=self._steps_done(trainer) or last_batch)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, final=self._last_epoch(trainer) or self._steps_done(trainer))

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure on the probe set and log. Runs on every rank (collectives inside)."""
        raise NotImplementedError

    # ---- output ----------------------------------------------------------------------------------------
    def key(self, quantity: str, layer: str | None = None) -> str:
        """``analysis/<callback>/<quantity>[/<layer>]``."""
        return f"analysis/{self.name}/{quantity}" + (f"/{layer}" if layer else "")

    def log_scalars(self, trainer: L.Trainer, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
        """Write scalars to every logger at ``step`` (default: the current global step), rank zero only."""
        log_scalars(trainer, metrics, step)

    @property
    def figures_due(self) -> bool:
        """Whether this probe draws figures (the first, every ``figure_every_n_probes``-th, the last of training)."""
        return self._final_probe or self._n_probes % self.figure_every_n_probes == 0

    def add_figure(self, trainer: L.Trainer, tag: str, figure: Any) -> None:
        """Write a matplotlib figure to TensorBoard (rank zero, on probes that draw figures) and close it."""
        import matplotlib.pyplot as plt

        writer = tensorboard(trainer)
        if writer is not None and self.figures_due:
            writer.add_figure(tag, figure, global_step=trainer.global_step, close=True)
        plt.close(figure)

    def add_histogram(self, trainer: L.Trainer, tag: str, values: Tensor) -> None:
        """Write a histogram to TensorBoard (rank zero)."""
        writer = tensorboard(trainer)
        if writer is not None and values.numel():
            writer.add_histogram(tag, values.detach().float().cpu(), global_step=trainer.global_step)

    def layout(self) -> dict[str, list[str]]:
        """Custom-scalars charts: ``{chart title: [tag regex, ...]}``; one multiline chart per quantity."""
        return {}

    def write_layout(self, trainer: L.Trainer) -> None:
        """Merge this callback's charts into the run's custom-scalars layout (rank zero)."""
        write_layout(trainer, self.name, self.layout())
