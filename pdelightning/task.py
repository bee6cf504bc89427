"""The LightningModule: classification with the information-bottleneck objective (paper eqs. 3, 14, 16)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from pdelightning.compat import cli_hyperparameters, module_trainer
from pdelightning.models.base import SequenceClassifier
from pdelightning.trust import CHECKPOINT_CLASS_KEY
from pdelightning.utils import should_log


def l2_penalty(params: list[Tensor]) -> Tensor:
    """``sum ||θ||²`` over ``params`` (one fused ``_foreach_norm``), the ``λθ`` term of eq. (3) as a loss."""
    if not params:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(params)).pow(2).sum()


class ClassificationTask(L.LightningModule):
    r"""Train any classifier with ``loss = CE + λ ||θ||² + β Ĩ(X;T)``, the objective of eqs. (3)/(14).

    ``Ĩ(X;T)`` is the variational upper bound of eq. (16) on the model's Gaussian bottleneck ``T``: the
    KL of ``q(t|x)`` to a standard-normal prior, averaged over the batch (Deep VIB). With ``beta = 0``
    the bottleneck does not sample and the model is deterministic; ``λ`` penalises weight matrices
    (parameters with ``ndim >= 2``), not biases or norm gains.

    Args:
        model: the classifier, e.g. :class:`~pdelightning.models.TransformerClassifier` or
            :class:`~pdelightning.models.PDEClassifier` (given by ``class_path`` in YAML). Any module
            mapping a batch's ``x`` to logits works; the KL term needs our bottleneck.
        num_classes: number of classes (linked from the data module by the CLI).
        beta: weight of the information term, ``β >= 0``.
        l2: weight ``λ >= 0`` of the L2 penalty.
        optimizer: optimizer factory (``OptimizerCallable``); ``None`` (the default) means
            ``torch.optim.AdamW`` with its own defaults. The default is ``None`` rather than ``AdamW``
            because jsonargparse carries a default class's arguments over to the class a config
            selects (jsonargparse issue #460): with an ``AdamW`` default, ``class_path: torch.optim.Adam``
            silently got AdamW's ``weight_decay=0.01`` as a coupled L2 penalty.
        lr_scheduler: optional scheduler factory, stepped every epoch.

    Raises:
        ValueError: if ``beta`` or ``l2`` is negative, or ``beta > 0`` on a model without a bottleneck.

    Logged metrics:
        ``train/ce``, ``train/ib_kl`` (nats), ``train/l2`` (``||θ||²``), ``train/loss`` on logging steps;
        ``train/acc`` per epoch; ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` per epoch.

    Example::

        >>> from pdelightning.models import TransformerClassifier
        >>> task = ClassificationTask(TransformerClassifier(num_classes=10, d_model=32, image_size=8), beta=1e-3)
        >>> task.beta
        0.001
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        beta: float = 0.0,
        l2: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta={beta} must be >= 0 (0 switches the information term off)")
        if l2 < 0:
            raise ValueError(f"l2={l2} must be >= 0")
        has_bottleneck = isinstance(model, SequenceClassifier) and model.bottleneck is not None
        if beta > 0 and not has_bottleneck:
            raise ValueError(
                f"beta={beta} needs a model with a Gaussian bottleneck (set bottleneck_dim); "
                f"got {type(model).__name__} without one"
            )
        # Under LightningCLI the hyperparameters are the config (class_path + init_args, plain data), so
        # load_from_checkpoint rebuilds the model. Outside it the module (already in the state dict) and the
        # optimizer/scheduler factories (pickled callables, refused by torch.load(weights_only=True)) stay out.
        in_cli = cli_hyperparameters() is not None
        self.save_hyperparameters(ignore=None if in_cli else ["model", "optimizer", "lr_scheduler"])
        self.model = model
        self.beta = beta
        self.l2 = l2
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self._returns_kl = isinstance(model, SequenceClassifier)
        if self._returns_kl:
            model.set_bottleneck_sampling(beta > 0)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self._acc_epoch: int | None = None  # the epoch train_acc's counts belong to
        self.train_acc.persistent(True)  # a run resumed mid-epoch continues the epoch's accuracy
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Logits of the wrapped model."""
        return self.model(x, padding_mask) if padding_mask is not None else self.model(x)

    def _logits_kl(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._returns_kl:
            return self.model(x, return_kl=True)
        return self.model(x), x.new_zeros((), dtype=torch.float32)

    def _weights(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """CE + λ L2 + β KL on one batch; logs only on the trainer's logging steps."""
        x, y = batch
        logits, kl = self._logits_kl(x)
        ce = F.cross_entropy(logits, y)
        loss = ce + self.beta * kl if self.beta > 0 else ce
        l2 = None
        if self.l2 > 0:
            l2 = l2_penalty(self._weights())
            loss = loss + self.l2 * l2
        if self._acc_epoch != self.current_epoch:  # a new epoch (also after resuming from an epoch's last batch)
            self.train_acc.reset()
            self._acc_epoch = self.current_epoch
        self.train_acc.update(logits.detach(), y)
        if should_log(module_trainer(self)):
            if l2 is None:
                with torch.no_grad():
                    l2 = l2_penalty(self._weights())
            metrics = {"train/ce": ce.detach(), "train/ib_kl": kl.detach(), "train/l2": l2.detach()}
            self.log_dict(metrics, on_step=True, on_epoch=False)
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the epoch the training accuracy's counts belong to, and the class that rebuilds the checkpoint.

        A checkpoint saved on an epoch's last batch holds that epoch's whole count (``on_train_epoch_end``, which
        logs and resets it, has not run yet); the resumed run starts the next epoch, which must not inherit it.
        The class path (:data:`~pdelightning.trust.CHECKPOINT_CLASS_KEY`) lets a reader such as a callback's
        ``reference_checkpoint`` find ``load_from_checkpoint`` without knowing this class.
        """
        checkpoint["train_acc_epoch"] = self._acc_epoch
        checkpoint[CHECKPOINT_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore :meth:`on_save_checkpoint`'s epoch; accept checkpoints written before the training accuracy's
        state was saved (it restarts at zero).
        """
        self._acc_epoch = checkpoint.get("train_acc_epoch", checkpoint.get("epoch"))
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key, value in self.state_dict().items():
                if key.startswith("train_acc.") and key not in state:
                    state[key] = value

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training accuracy (accumulated every step, logged once).

        Nothing when the count is empty: a run resumed from a checkpoint written in ``on_train_epoch_end`` (after
        this hook logged and reset the count) repeats the epoch's end, whose accuracy is already logged.
        """
        # every rank decides alike (compute() is a collective): in an epoch every rank has batches, and a restore gives
        # every rank rank 0's (empty) counts
        if int(self.train_acc.tp.sum() + self.train_acc.fn.sum()) == 0:
            return
        self.log("train/acc", self.train_acc.compute(), sync_dist=False)
        self.train_acc.reset()

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Validation loss and accuracy."""
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Test loss and accuracy."""
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class ids."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x).argmax(-1)

    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler, if given) from the config."""
        factory = self.optimizer if self.optimizer is not None else torch.optim.AdamW
        optimizer = factory(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"},
        }
