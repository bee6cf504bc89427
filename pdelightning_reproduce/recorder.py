"""What training records for the later analysis: weights at fixed steps, divergence, and the run's outcome.

:class:`RunRecorder` is the one callback the reproduction adds to a ``pdelightning fit`` run. It saves the model's
weights (not the optimizer) at step 0 and at every step of a fixed list, plus the final weights; watches every
training loss for divergence (non-finite, or above ``divergence_loss`` — the rule's bound) and stops the run at the
first such batch; and keeps the per-epoch validation accuracy. :func:`load_model` rebuilds a model from one of its
checkpoints, so every analysis number can be computed afterwards from the saved weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import Tensor, nn
from typing_extensions import override

from pdelightning.trust import import_class, load_data_file

CKPT_DIR = "ckpt"
FINAL = "final.pt"


def step_name(step: int) -> str:
    """File name of the checkpoint of ``step``."""
    return f"step{step:06d}.pt"


def save_model(
    path: Path, model: nn.Module, step: int, epoch: int, model_class: str, init_args: dict[str, Any]
) -> None:
    """Save ``model``'s weights with what :func:`load_model` needs to rebuild it (atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload = {"step": step, "epoch": epoch, "model_class": model_class, "init_args": init_args, "state_dict": state}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_payload(path: Path) -> dict[str, Any]:
    """The payload :func:`save_model` wrote at ``path``, loaded as data (``weights_only=True``).

    Raises:
        UntrustedFileError: when the file holds a pickle global outside the allow-list (nothing of it ran).
    """
    hint = "the runs folder holds a file this tool did not write; delete it and re-run the step that writes it"
    return load_data_file(path, map_location="cpu", hint=hint)


def load_model(
    path: Path, device: str | torch.device = "cpu", **init_overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :class:`RunRecorder` at ``path``, in eval mode on ``device``.

    ``init_overrides`` replace constructor arguments (e.g. ``n_layers``, ``dt``); the state dict is then loaded
    non-strictly only if the caller changed the architecture, else strictly. The file is read as data and its
    ``model_class`` checked to be an ``nn.Module`` subclass before it is called.

    Returns:
        ``(model, payload)`` where ``payload`` holds ``step``, ``epoch``, ``model_class`` and ``init_args``.

    Raises:
        UntrustedFileError: when the file holds a pickle global outside the allow-list.
        UntrustedClassError: when its ``model_class`` is not an ``nn.Module`` subclass.
    """
    payload = read_payload(path)
    cls = import_class(str(payload["model_class"]), (nn.Module,), f"model_class in {path}")
    model = cls(**{**payload["init_args"], **init_overrides})
    if not init_overrides:
        model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), payload


class RunRecorder(Callback):
    """Save weights at fixed steps, stop at divergence, and keep the run's record.

    Args:
        run_dir: where ``ckpt/step<k>.pt`` and ``ckpt/final.pt`` go.
        steps: the steps (optimizer steps done) whose weights are saved; 0 is the initialisation.
        model_class: import path of the model's class.
        init_args: the model's constructor arguments (linked values included).
        divergence_loss: a training loss above this (or non-finite) is a divergence; ``None`` disables the check.
        check_every_n_steps: losses are buffered on the device and read every ``n`` steps (and at epoch end), so
            the hot path does not synchronise; the first divergent step is still exact.

    Attributes:
        record: ``val_acc`` (per epoch), ``first_nonfinite_step``, ``divergence_step``, ``max_train_loss``,
            ``saved_steps``, ``final_step``, ``epochs``, ``stop_reason`` (``diverged``, ``plateau``, ``max_steps``,
            ``max_epochs``), ``plateau_met``, ``plateau_epoch``.
    """

    def __init__(
        self,
        run_dir: Path,
        steps: tuple[int, ...],
        model_class: str,
        init_args: dict[str, Any],
        divergence_loss: float | None,
        check_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps} must be >= 1")
        self.run_dir = Path(run_dir)
        self.steps = frozenset(int(s) for s in steps)
        self.model_class = model_class
        self.init_args = init_args
        self.divergence_loss = divergence_loss
        self.check_every_n_steps = check_every_n_steps
        self._buffer: list[tuple[int, Tensor]] = []
        self.record: dict[str, Any] = {
            "val_acc": [],
            "first_nonfinite_step": None,
            "divergence_step": None,
            "max_train_loss": None,
            "saved_steps": [],
            "final_step": None,
            "epochs": None,
            "stop_reason": None,
            "plateau_met": False,
            "plateau_epoch": None,
        }
        # (repro-models) the loss series of divergence.training_divergence: every training batch's loss and the step
        # it was recorded at; the validation loss per epoch beside val_acc (the plateau criterion's curve)
        self.record.update(losses=[], loss_steps=[], val_loss=[])

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        model = getattr(pl_module, "model", pl_module)
        save_model(
            self.run_dir / CKPT_DIR / name,
            model,
            trainer.global_step,
            trainer.current_epoch,
            self.model_class,
            self.init_args,
        )

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._save(trainer, pl_module, step_name(0))
            self.record["saved_steps"].append(0)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self._buffer.append((trainer.global_step, loss.detach().float().reshape(())))
        if len(self._buffer) >= self.check_every_n_steps:
            self._check(trainer)
        step = trainer.global_step
        if step in self.steps and step not in self.record["saved_steps"]:
            self._save(trainer, pl_module, step_name(step))
            self.record["saved_steps"].append(step)

    def _check(self, trainer: L.Trainer) -> None:
        if not self._buffer:
            return
        steps = [s for s, _ in self._buffer]
        values = torch.stack([v for _, v in self._buffer]).cpu().tolist()  # one device sync per window
        self._buffer.clear()
        self.record["loss_steps"] += steps
        self.record["losses"] += values
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            m = max(finite)
            prev = self.record["max_train_loss"]
            self.record["max_train_loss"] = m if prev is None else max(prev, m)
        for s, v in zip(steps, values, strict=True):
            if not math.isfinite(v) and self.record["first_nonfinite_step"] is None:
                self.record["first_nonfinite_step"] = s
            bad = not math.isfinite(v) or (self.divergence_loss is not None and v > self.divergence_loss)
            if bad and self.record["divergence_step"] is None:
                self.record["divergence_step"] = s
                self.record["stop_reason"] = "diverged"
                trainer.should_stop = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None:
            self.record["val_acc"].append(float(acc))
        val_loss = trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            self.record["val_loss"].append(float(val_loss))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)
        self._save(trainer, pl_module, FINAL)
        self.record["final_step"] = trainer.global_step
        self.record["epochs"] = trainer.current_epoch
        stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
        if stopper is not None and stopper.stopped_epoch > 0:
            self.record["plateau_met"] = True
            self.record["plateau_epoch"] = int(stopper.stopped_epoch)
        if self.record["stop_reason"] is None:
            if self.record["plateau_met"]:
                self.record["stop_reason"] = "plateau"
            elif trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
                self.record["stop_reason"] = "max_steps"
            else:
                self.record["stop_reason"] = "max_epochs"
