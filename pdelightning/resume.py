"""Resuming a run from a checkpoint without silent changes or duplicated history.

- :func:`check_model_matches`: the checkpoint's saved model configuration must equal the configured one
  (a resume cannot change the architecture); the error names both and the way to resume the checkpoint's
  own configuration.
- :func:`purge_events`: when a run resumes into a logger version that already holds TensorBoard events,
  the events the killed run logged at the steps the resumed run will log again are removed from the files
  (TensorBoard's ``purge_step`` rule, applied to the files so that every reader sees it), so no step
  appears twice. The step is :func:`resume_step`, the one Lightning continues logging from.
- :func:`hparams_logged`: a version whose events hold the hyperparameters already gets no second copy (nor a
  second ``hp_metric`` point at step 0) when a run resumes into it.
- :class:`RNGStateCheckpoint`: saves the global random states in checkpoints and restores them when
  training restarts, so a resumed run draws the same data order and dropout masks as an uninterrupted one.
- :class:`KeepConfigCallback`: never overwrites a ``config.yaml`` that differs from the new one.
"""

from __future__ import annotations

import inspect
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

from pdelightning._checks import LINKED_MODEL_ARGS
from pdelightning.checkpointing import atomic_write
from pdelightning.compat import set_batches_that_stepped
from pdelightning.utils import InputError, rng_states, set_rng_states


class CheckpointMismatchError(InputError):
    """The checkpoint given to resume holds another model than the configured one."""


# ---- the model configuration -----------------------------------------------------------------------------
def plain_config(value: Any) -> Any:
    """A jsonargparse ``Namespace`` (or anything holding them) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        return plain_config(value.as_dict())
    if isinstance(value, Mapping):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return value


def class_defaults(class_path: str) -> dict[str, Any]:
    """The ``__init__`` defaults of the class at ``class_path`` (empty if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def model_config_diff(saved: Mapping[str, Any], configured: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, configured value)`` for every architecture setting that differs.

    Both arguments are ``{"class_path": ..., "init_args": {...}}``. The class counts as the key
    ``"class_path"``. Arguments linked from the data module (:data:`~pdelightning._checks.LINKED_MODEL_ARGS`,
    compared through the state dict's shapes instead) and dropout rates (training-time only) are not compared; an
    argument missing on one side is taken at its default.

    Example::

        >>> a = {"class_path": "m.T", "init_args": {"n_layers": 4, "dropout": 0.1}}
        >>> model_config_diff(a, {"class_path": "m.T", "init_args": {"n_layers": 2, "dropout": 0.0}})
        [('n_layers', 4, 2)]
    """
    saved, configured = plain_config(saved), plain_config(configured)
    if saved.get("class_path") != configured.get("class_path"):
        return [("class_path", saved.get("class_path"), configured.get("class_path"))]
    defaults = class_defaults(str(saved.get("class_path")))
    a, b = saved.get("init_args") or {}, configured.get("init_args") or {}
    diff = []
    for key in sorted(set(a) | set(b)):
        if key in LINKED_MODEL_ARGS or "dropout" in key:
            continue
        va, vb = a.get(key, defaults.get(key)), b.get(key, defaults.get(key))
        if va != vb:
            diff.append((key, va, vb))
    return diff


def describe_model(config: Mapping[str, Any], keys: list[str] | None = None) -> str:
    """``Name(key=value, ...)`` of a ``{"class_path", "init_args"}`` model config (only ``keys`` if given)."""
    config = plain_config(config)
    name = str(config.get("class_path", "?")).rpartition(".")[2]
    args = config.get("init_args") or {}
    shown = [k for k in (keys if keys is not None else args) if k != "class_path"]
    return f"{name}(" + ", ".join(f"{k}={args.get(k)!r}" for k in shown) + ")"


def run_config_of(ckpt_path: str | Path) -> Path:
    """Where the ``config.yaml`` of the run that wrote ``ckpt_path`` lives (``<version>/checkpoints/x.ckpt``)."""
    ckpt_path = Path(ckpt_path)
    version = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return version / "config.yaml"


def check_model_matches(ckpt_path: str | Path, checkpoint: Mapping[str, Any], configured: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` if the checkpoint's saved model config differs from ``configured``.

    Checkpoints without a saved model config (written outside the CLI) pass; their state dict is checked
    by :func:`check_state_dict_matches` once the model exists.
    """
    saved = (checkpoint.get("hyper_parameters") or {}).get("model")
    if not isinstance(saved, Mapping) or "class_path" not in saved:
        return
    diff = model_config_diff(saved, configured)
    if not diff:
        return
    keys = [k for k, _, _ in diff]
    if keys == ["class_path"]:
        ours, theirs = describe_model(saved, []), describe_model(configured, [])
        ours = f"{ours[:-2]} ({plain_config(saved)['class_path']})"
        theirs = f"{theirs[:-2]} ({plain_config(configured)['class_path']})"
    else:
        ours, theirs = describe_model(saved, keys), describe_model(configured, keys)
    raise CheckpointMismatchError(
        f"--ckpt_path {ckpt_path} holds a {ours} but the config builds a {theirs}; a resume cannot change "
        f"the model. {_how_to_resume(ckpt_path, saved, diff)}"
    )


def _how_to_resume(ckpt_path: str | Path, saved: Mapping[str, Any], diff: list[tuple[str, Any, Any]]) -> str:
    config = run_config_of(ckpt_path)
    if config.is_file():
        return f"To resume that run, use its own config: pdelightning fit -c {config} --ckpt_path {ckpt_path}"
    saved = plain_config(saved)
    if diff[0][0] == "class_path":  # another class: all of the checkpoint's arguments
        args = [(k, v) for k, v in (saved.get("init_args") or {}).items() if k not in LINKED_MODEL_ARGS]
        flags = [f"--model.model={saved['class_path']}"]
    else:
        args = [(k, v) for k, v, _ in diff]
        flags = []
    flags += [f"--model.model.init_args.{k}={_cli_value(v)}" for k, v in args]
    return (
        f"Its run's config ({config}) is missing; to resume it, set the checkpoint's model on the command line: "
        + " ".join(flags)
    )


def _cli_value(value: Any) -> str:
    """``value`` as a command-line value: ``true``, ``null``, ``3``, ``[1, 2]``, ``pre``."""
    return value if isinstance(value, str) else json.dumps(value)


def check_state_dict_matches(
    ckpt_path: str | Path, checkpoint: Mapping[str, Any], model: torch.nn.Module, configured: Mapping[str, Any]
) -> None:
    """Raise :class:`CheckpointMismatchError` if parameter names or shapes of the checkpoint and ``model`` differ."""
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping):
        return
    ours = model.state_dict()
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    shapes = [k for k in sorted(set(ours) & set(saved)) if tuple(ours[k].shape) != tuple(saved[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} tensors differ in shape (e.g. {k}: {tuple(saved[k].shape)} in the checkpoint, "
            f"{tuple(ours[k].shape)} configured)"
        )
    if missing:
        parts.append(f"{len(missing)} configured tensors are not in the checkpoint (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint tensors are not in the model (e.g. {unexpected[0]})")
    theirs = (checkpoint.get("hyper_parameters") or {}).get("model")
    saved_desc = f" ({describe_model(theirs)})" if isinstance(theirs, Mapping) else ""
    raise CheckpointMismatchError(
        f"--ckpt_path {ckpt_path}{saved_desc} does not fit the configured {describe_model(configured)}: "
        + "; ".join(parts)
        + f". Resume with the checkpoint's own config ({run_config_of(ckpt_path)}) and the same data settings."
    )


def resume_step(checkpoint: Mapping[str, Any]) -> int:
    """The first logging step of a fit resumed from ``checkpoint``.

    Lightning logs with ``_batches_that_stepped``, which it saves *before* incrementing it for the batch that
    ends a step; on restart it adds that 1 unless the checkpoint was written after the batch was fully done
    (at an epoch's end, ``batch_progress.total.completed == processed``). This mirrors
    ``_TrainingEpochLoop.reset`` (Lightning 2.6) for ``accumulate_grad_batches=1``; without loop state it
    falls back to ``global_step``.

    Example::

        >>> loops = {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": 44},
        ...     "epoch_loop.batch_progress": {"total": {"ready": 45, "started": 45, "processed": 45, "completed": 44}}}}
        >>> resume_step({"loops": loops})  # saved in on_train_batch_end of the 45th batch: logs go on at 45
        45
    """
    try:
        loop = checkpoint["loops"]["fit_loop"]
        step = int(loop["epoch_loop.state_dict"]["_batches_that_stepped"])
        total = loop["epoch_loop.batch_progress"]["total"]
    except (KeyError, TypeError):
        return int(checkpoint.get("global_step", 0))
    on_last = total["started"] == total["ready"] and total["completed"] == total["processed"] == total["started"]
    return step if on_last else step + 1


# ---- TensorBoard history -------------------------------------------------------------------------------
def event_files(log_dir: str | Path) -> list[Path]:
    """The TensorBoard event files under ``log_dir``, sorted."""
    return sorted(p for p in Path(log_dir).rglob("events.out.tfevents.*") if p.is_file())


def _records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file; a truncated last record (a writer killed mid-write) is dropped."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def purge_events(log_dir: str | Path, step: int, files: list[Path] | None = None) -> int:
    """Remove the events at ``step`` or later from the event files under ``log_dir``; returns how many.

    This is TensorBoard's ``purge_step`` rule, applied to the files (rewritten atomically) rather than left
    to readers. The file header (``file_version``) is kept, and a truncated last record is dropped.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    removed = 0
    for path in files if files is not None else event_files(log_dir):
        kept, dropped, size = [], 0, path.stat().st_size
        for record in _records(path):
            event = Event.FromString(record)
            keep = event.HasField("file_version") or event.step < step
            if keep:
                kept.append(record)
            else:
                dropped += 1
        if dropped or sum(len(r) + 16 for r in kept) != size:

            def write(f: Any, records: list[bytes] = kept) -> None:
                writer = RecordWriter(f)
                for r in records:
                    writer.write(r)

            atomic_write(path, write)
        removed += dropped
    return removed


def hparams_logged(log_dir: str | Path) -> bool:
    """Whether the TensorBoard events under ``log_dir`` already hold the run's hyperparameters (``_hparams_/*``) or
    Lightning's ``hp_metric`` placeholder: a run resumed into that version must not write them again.
    """
    from tensorboard.compat.proto.event_pb2 import Event

    for path in event_files(log_dir):
        for record in _records(path):
            event = Event.FromString(record)
            if any(v.tag == "hp_metric" or v.tag.startswith("_hparams_/") for v in event.summary.value):
                return True
    return False


# ---- random states -------------------------------------------------------------------------------------
class RNGStateCheckpoint(L.Callback):
    """Save the global random states in every checkpoint and restore them when the checkpoint is loaded.

    Lightning restores weights, optimizer and loops but not the random generators, so a resumed run shuffles
    its next epoch and draws its dropout masks from another state than an uninterrupted one. With this
    callback (and a resumable train loader, see :class:`~pdelightning.data.base.ResumableDataLoader`) both
    continue identically. The states are applied as the checkpoint is restored, before the train loader is
    iterated (Lightning's sanity check runs with the random state isolated). Under DDP the states of rank 0
    are saved and every rank restores them.

    A checkpoint written at an epoch's end (``ModelCheckpoint`` with ``every_n_epochs``, or monitoring a validation
    metric with validation every epoch: saved in ``on_train_epoch_end``) makes Lightning iterate the train loader
    once more and repeat that epoch's end before the next epoch. The states are applied again as the next epoch
    starts (what that repetition drew is discarded), a checkpoint written during it holds the restored states, and
    Lightning's logging step, advanced by one on that restart, is set back (:func:`saved_at_epoch_end`).

    Example::

        >>> trainer = L.Trainer(callbacks=[RNGStateCheckpoint()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None
        self._epoch_end: tuple[int, int] | None = None  # (epoch, logging step) of an epoch-end checkpoint

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._epoch_end is not None and self._restored is not None:
            return self._restored  # the repeated epoch end: the uninterrupted run had these states here
        return rng_states()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict)
        self._restored = dict(state_dict)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._epoch_end = saved_at_epoch_end(checkpoint)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_end is not None and trainer.current_epoch == self._epoch_end[0]:
            set_batches_that_stepped(trainer, self._epoch_end[1])

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_end is not None and self._restored is not None:
            set_rng_states(self._restored)
        self._epoch_end, self._restored = None, None


def saved_at_epoch_end(checkpoint: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(epoch, logging step)`` of a checkpoint written in ``on_train_epoch_end``, else ``None``.

    That is Lightning's ``RESTARTED_ON_EPOCH_END`` (``FitLoop.update_restart_stage``, Lightning 2.6): the epoch is
    processed but not completed.

    Example::

        >>> total = {"ready": 1, "started": 1, "processed": 1, "completed": 0}
        >>> steps = {"_batches_that_stepped": 5}
        >>> loops = {"fit_loop": {"epoch_progress": {"total": total}, "epoch_loop.state_dict": steps}}
        >>> saved_at_epoch_end({"loops": loops, "epoch": 0})
        (0, 5)
    """
    try:
        loop = checkpoint["loops"]["fit_loop"]
        total = loop["epoch_progress"]["total"]
        step = int(loop["epoch_loop.state_dict"]["_batches_that_stepped"])
    except (KeyError, TypeError):
        return None
    at_end = total["started"] == total["ready"] == total["processed"] == total["completed"] + 1
    return (int(checkpoint.get("epoch", 0)), step) if at_end else None


# ---- config.yaml ---------------------------------------------------------------------------------------
def _without_ckpt_path(config: Any) -> Any:
    """A config without what a resume of the same run changes: ``ckpt_path`` and the logger's ``version``."""
    if not isinstance(config, dict):
        return config
    out = {k: v for k, v in config.items() if k != "ckpt_path"}
    logger = (out.get("trainer") or {}).get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        init = {k: v for k, v in logger["init_args"].items() if k != "version"}
        out["trainer"] = {**out["trainer"], "logger": {**logger, "init_args": init}}
    return out


class KeepConfigCallback(SaveConfigCallback):
    """``SaveConfigCallback`` that never overwrites a different ``config.yaml`` in a reused log directory.

    When the log directory already holds ``config.yaml`` (a run resumed into its own version, or a version
    number given twice): an identical file is left alone (``ckpt_path`` and the logger's ``version``, which a
    resume sets, are not compared); a different one is kept and the new config goes to ``config.1.yaml``
    (the first free number).
    """

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            super().setup(trainer, pl_module, stage)
            return
        log_dir = trainer.log_dir
        name: str | None = self.config_filename
        if trainer.is_global_zero and log_dir is not None:
            name = self._free_name(Path(log_dir))
        name = trainer.strategy.broadcast(name)
        if name is None:  # the same config is there already
            if trainer.is_global_zero:
                self.save_config(trainer, pl_module, stage)
            self.already_saved = trainer.strategy.broadcast(True)
            return
        self.config_filename = name
        self.overwrite = False
        super().setup(trainer, pl_module, stage)

    def _free_name(self, log_dir: Path) -> str | None:
        existing = log_dir / self.config_filename
        if not existing.is_file():
            return self.config_filename
        new = _without_ckpt_path(yaml.safe_load(self.parser.dump(self.config, skip_none=False)))
        stem, suffix = Path(self.config_filename).stem, Path(self.config_filename).suffix
        for path in [existing, *sorted(log_dir.glob(f"{stem}.*{suffix}"))]:
            try:
                if _without_ckpt_path(yaml.safe_load(path.read_text())) == new:
                    return None
            except (OSError, yaml.YAMLError):
                continue
        k = 1
        while (log_dir / f"{stem}.{k}{suffix}").exists():
            k += 1
        return f"{stem}.{k}{suffix}"
