"""``pdelightning`` command line: LightningCLI with YAML configs (``fit``, ``validate``, ``test``, ``predict``).

On top of LightningCLI:

- checkpoints are written by :class:`~pdelightning.checkpointing.AtomicCheckpointIO` (atomic, finite only,
  unreadable files named) unless the trainer config gives its own ``CheckpointIO`` plugin, and the random
  states travel in them (:class:`~pdelightning.resume.RNGStateCheckpoint`);
- ``--ckpt_path`` must hold the configured model (no silent switch to the checkpoint's), a resume into a
  logger version that has TensorBoard events drops the events logged after the checkpoint, and a
  different ``config.yaml`` already in the log directory is kept (:mod:`pdelightning.resume`);
- a run stopped by ``StabilityMonitor(action="stop")`` exits with status 3 and says why on its last line;
- bad input (values, config files, data files, checkpoints) ends with one ``error:`` line naming the value
  and the valid choices or the file and the fix (status 2), and a run that fails before its first step
  removes the log directory it created.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from typing_extensions import override

# Imported so that their classes are known by short name in YAML (class_path: PDEClassifier, ...).
import pdelightning.callbacks
import pdelightning.data
import pdelightning.models  # noqa: F401
from pdelightning._checks import LINKED_MODEL_ARGS
from pdelightning._hparams import log_final_hparams
from pdelightning.adapters.registry import TargetNotFoundError
from pdelightning.checkpointing import AtomicCheckpointIO, load_checkpoint_file
from pdelightning.cli_errors import (
    check_config_files,
    check_trainer_values,
    clarify_parse_error,
    instantiation_message,
    storage_message,
    trainer_message,
)
from pdelightning.compat import disable_default_hp_metric, last_checkpoints
from pdelightning.data.base import ClassificationDataModule
from pdelightning.resources import list_configs, resolve_config_args
from pdelightning.resume import (
    KeepConfigCallback,
    RNGStateCheckpoint,
    check_model_matches,
    check_state_dict_matches,
    event_files,
    hparams_logged,
    plain_config,
    purge_events,
    resume_step,
)
from pdelightning.task import ClassificationTask
from pdelightning.utils import InputError

EXIT_BAD_INPUT = 2
"""Exit status for a bad value, config, data file or checkpoint (as argparse uses for bad arguments)."""
EXIT_UNSTABLE = 3
"""Exit status of a run that ``StabilityMonitor(action="stop")`` stopped."""
_DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "logs", "name": "pdelightning", "default_hp_metric": False},
}
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")
_COUNTS = "pdelightning/run/"  # RunCounts' keys in callback_metrics (removed again before the summary line)


class RunCounts(Callback):
    """At the end of fit: write the final ``hp_metric`` and hparams (:func:`log_final_hparams`, before Lightning
    closes the loggers), and put the run's step and epoch counts in ``trainer.callback_metrics`` (rank 0 reads them).

    Under ``ddp_spawn`` training runs in spawned processes and the main process's trainer never steps; Lightning
    sends back the rank-0 ``callback_metrics`` (not the loops' counters), so the CLI's summary line reads them there.
    """

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_final_hparams(trainer)  # hp_metric and the HParams tab: the final val metrics, not Lightning's -1
        trainer.callback_metrics[_COUNTS + "steps"] = torch.tensor(trainer.global_step, dtype=torch.int64)
        trainer.callback_metrics[_COUNTS + "epochs"] = torch.tensor(trainer.current_epoch, dtype=torch.int64)


class _ArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors end with the root cause (see :func:`clarify_parse_error`)."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(clarify_parse_error(message, getattr(ex, "subcommand_parser", None) or self), ex)


class PDELightningCLI(LightningCLI):
    """LightningCLI whose data module tells the model what it would otherwise be told twice.

    Linked (``apply_on="instantiate"``): ``data.num_classes`` into the task and the model,
    ``data.input_kind``, ``data.image_size``, ``data.vocab_size`` and ``data.max_len`` into the model.
    A model setting that contradicts the linked value (set to something other than its default) is an error.

    Attributes:
        stop_reason: why ``StabilityMonitor`` stopped the run, or ``None``.
    """

    stop_reason: str | None = None

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the data module's attributes to the model's arguments."""
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        for attr in LINKED_MODEL_ARGS:
            parser.link_arguments(f"data.{attr}", f"model.model.init_args.{attr}", apply_on="instantiate")

    # ---- before anything is built ----------------------------------------------------------------------
    def _section(self) -> Any:
        return self.config[self.config.subcommand] if self.config.get("subcommand") else self.config

    # The three LightningCLI private methods overridden here are listed in pdelightning.compat.CLI_PRIVATE_OVERRIDES
    # (tests/test_compat.py checks they still exist); each override is thin and calls a public method of ours.
    @override
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (:meth:`check_ckpt_path`) instead of merging its hyperparameters into the config."""
        self.check_ckpt_path()

    def check_ckpt_path(self) -> None:
        """Check ``--ckpt_path``: it exists, is readable, and holds the configured model.

        LightningCLI would overwrite the configured model with the checkpoint's; here a different model is
        an error that says how to resume the checkpoint's own configuration.
        """
        self._ckpt: tuple[Path, dict[str, Any]] | None = None
        if not self.config.get("subcommand"):
            return
        ckpt_path = self._section().get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT or ":" in str(ckpt_path).split("/")[0]:
            return
        path = Path(ckpt_path).expanduser()
        if path.is_dir():
            found = sorted(str(p) for pattern in ("*.ckpt", "checkpoints/*.ckpt") for p in path.glob(pattern))[:5]
            raise InputError(
                f"--ckpt_path {path} is a directory; give a checkpoint file"
                + (f", e.g. one of: {', '.join(found)}" if found else " (it holds no *.ckpt files)")
            )
        if not path.is_file():
            near = sorted(str(p) for p in path.parent.glob("*.ckpt"))[:5] if path.parent.is_dir() else []
            raise FileNotFoundError(
                f"--ckpt_path {path} does not exist"
                + (f"; checkpoints in {path.parent}: {', '.join(near)}" if near else "")
            )
        trusted = self._section().get("weights_only") is False  # --weights_only false: the user trusts the file
        try:
            checkpoint = load_checkpoint_file(path, weights_only=not trusted, mmap=True)
        except InputError:  # corrupt, or a foreign pickle global (UntrustedFileError): exit 2 before anything runs
            raise
        except Exception:  # leave anything else to the trainer's own load
            return
        self._ckpt = (path, checkpoint)
        model = self._section().get("model")
        configured = model.get("model") if model is not None else None
        if configured is not None and configured.get("class_path"):
            check_model_matches(path, checkpoint, plain_config(configured))

    @override
    def before_instantiate_classes(self) -> None:
        """Remember model settings that the data links will overwrite, to compare once the data module exists."""
        self._explicit: dict[str, Any] = {}
        section = self._section()
        model = section.get("model")
        if model is None:
            return
        inner = model.get("model")
        init = inner.get("init_args") if inner is not None and inner.get("class_path") else None
        defaults = _class_defaults_of(inner.get("class_path")) if init is not None else {}
        for attr in LINKED_MODEL_ARGS:
            value = init.get(attr) if init is not None else None
            if value is not None and attr in defaults and value != defaults[attr]:
                self._explicit[f"model.model.init_args.{attr}"] = (attr, value)
        task_classes = model.get("num_classes")
        if task_classes is not None and task_classes != _class_defaults_of(ClassificationTask).get("num_classes"):
            self._explicit["model.num_classes"] = ("num_classes", task_classes)

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            err._pdelightning_instantiating = True  # type: ignore[attr-defined]
            raise

    @override
    def after_instantiate_classes(self) -> None:
        """Refuse model settings contradicted by the data links; check the checkpoint's tensor shapes."""
        dm = self.datamodule
        for key, (attr, value) in getattr(self, "_explicit", {}).items():
            data_value = getattr(dm, attr, None)
            if dm is not None and data_value is not None and data_value != value:
                raise InputError(
                    f"{key}={value!r} contradicts the data: {type(dm).__name__} has {attr}={data_value!r}, which "
                    f"the CLI links into the model; remove {key} from the config (the data module sets it)"
                )
        if isinstance(self.model, ClassificationTask) and self.subcommand == "fit":
            try:  # build the optimizer once now, so a bad setting fails before any log directory exists
                self.model.configure_optimizers()
            except Exception as err:
                raise InputError(f"model.optimizer / model.lr_scheduler: {type(err).__name__}: {err}") from err
        if self._ckpt is not None and self.model is not None:
            configured = plain_config(self._section().model.model)
            check_state_dict_matches(self._ckpt[0], self._ckpt[1], self.model, configured)

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Any:
        """Build the trainer from :meth:`trainer_arguments`; a bad device setting is one line naming the value."""
        config, callbacks = self.trainer_arguments(config, callbacks)
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except MisconfigurationException as err:  # no GPU, bad devices: name the value and the fix
            message = trainer_message(err, config)
            if message is None:
                raise
            raise InputError(message) from err
        # the PDELIGHTNING_CALLBACKS plugin's RunReport is for plain scripts: this command prints the summary itself
        trainer.callbacks = [c for c in trainer.callbacks if not getattr(c, "from_plugin", False)]
        return trainer

    def trainer_arguments(
        self, config: dict[str, Any], callbacks: list[Callback]
    ) -> tuple[dict[str, Any], list[Callback]]:
        """Add the atomic checkpoint plugin (unless one is configured or the strategy shards the checkpoint), the
        random-state callback and :class:`RunCounts`; check the trainer's values.
        """
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = config.get("strategy", "auto")
        name = (strategy if isinstance(strategy, str) else type(strategy).__name__).lower()
        sharded = any(s in name for s in ("deepspeed", "fsdp", "modelparallel"))
        if not sharded and not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config = {**config, "plugins": plugins or None}
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if not any(isinstance(c, RNGStateCheckpoint) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, RNGStateCheckpoint()]
        callbacks = [*callbacks, RunCounts()]
        check_trainer_values(config)
        return config, callbacks

    # ---- running ---------------------------------------------------------------------------------------
    @override
    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; when it fails before its first step, remove the log directories this run created."""
        created = self._log_dirs_not_yet_there()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_if_nothing_written(created)
            raise

    def _log_dirs_not_yet_there(self) -> list[Path]:
        if not self.trainer.is_global_zero:
            return []
        missing = []
        for logger in self.trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if not log_dir:
                continue
            path = Path(log_dir).resolve()
            while not path.exists() and path != path.parent:
                missing.append(path)
                path = path.parent
        return missing

    def _remove_if_nothing_written(self, created: list[Path]) -> None:
        if not created or self.trainer.global_step > 0:
            return
        if any(any(d.rglob("*.ckpt")) for d in created if d.is_dir()):
            return
        for d in created:  # deepest first: the version directory, then parents left empty
            if d.is_dir() and (d == created[0] or not any(d.iterdir())):
                shutil.rmtree(d, ignore_errors=True)

    def before_fit(self) -> None:
        """Drop the events logged after the checkpoint, log hyperparameters once per version, warn on probes without
        validation.
        """
        trainer = self.trainer
        if self._section().get("ckpt_path") == "last" and trainer.is_global_zero:
            _warn_if_no_last(trainer)
        for logger in trainer.loggers if trainer.is_global_zero else []:
            if isinstance(logger, TensorBoardLogger) and logger.log_dir and Path(logger.log_dir).is_dir():
                if self._ckpt is not None:
                    self._purge(logger, *self._ckpt)
                if hparams_logged(logger.log_dir):  # once per version: a resume adds no second hp_metric point
                    disable_default_hp_metric(logger)
        if trainer.limit_val_batches == 0:
            probes = [type(c).__name__ for c in trainer.callbacks if _is_probe(c)]
            if probes:
                warnings.warn(
                    f"trainer.limit_val_batches=0 turns validation off, but {', '.join(probes)} still probe a fixed "
                    "sample set every time they run; with no validation loop their probe set comes from the "
                    "training data. Set limit_val_batches > 0 (or remove the callbacks) for held-out probes.",
                    UserWarning,
                    stacklevel=2,
                )

    @staticmethod
    def _purge(logger: TensorBoardLogger, ckpt_path: Path, checkpoint: dict[str, Any]) -> None:
        log_dir = Path(logger.log_dir).resolve()
        files = event_files(log_dir)
        if not files:
            return
        step = resume_step(checkpoint)
        if log_dir not in ckpt_path.resolve().parents:
            warnings.warn(
                f"resuming {ckpt_path} into {log_dir}, which already holds TensorBoard events of another run: both "
                f"histories continue there from step {step}. Leave trainer.logger.init_args.version unset to log "
                "into a new version instead.",
                UserWarning,
                stacklevel=3,
            )
            return
        removed = purge_events(log_dir, step, files)
        if removed:
            print(f"Resuming at step {step}: removed {removed} TensorBoard events logged after {ckpt_path.name}")

    def after_fit(self) -> None:
        """Say where the logs are, how to view them, the final numbers, and why the run stopped if it was unstable."""
        trainer = self.trainer
        reasons = [c.stop_reason for c in trainer.callbacks if _is_stability_monitor(c) and c.stop_reason]
        self.stop_reason = reasons[0] if reasons else None
        metrics = trainer.callback_metrics  # under ddp_spawn, what the spawned rank 0 sent back (see RunCounts)
        steps = int(metrics.pop(_COUNTS + "steps", trainer.global_step))
        epochs = int(metrics.pop(_COUNTS + "epochs", trainer.current_epoch))
        if not trainer.is_global_zero or trainer.logger is None:
            return
        log_dir = trainer.logger.log_dir or trainer.default_root_dir
        final = ", ".join(
            f"{k}={float(v):.4f}"
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith(("val/", "train/acc"))
        )
        verb = "Stopped (unstable)" if self.stop_reason else "Finished"
        print(f"\n{verb} after {steps} steps ({epochs} epochs). {final}")
        if not any(type(c).__name__ == "RunReport" for c in trainer.callbacks):  # RunReport printed it already
            from pdelightning.report import report_after_fit

            print("\n".join(report_after_fit(trainer)))
        print(f"Logs and checkpoints: {log_dir}")
        print(f"View them with:       tensorboard --logdir {trainer.logger.save_dir}")

    def unstable_message(self) -> str | None:
        """The last line of a run ``StabilityMonitor`` stopped: the reason, and which files keep finite weights."""
        if not self.stop_reason:
            return None
        io = getattr(self.trainer.strategy, "checkpoint_io", None)
        refused = sorted({p for p, _, _ in getattr(io, "refused", [])})
        kept = [p for p in refused if os.path.isfile(p)]
        note = ""
        if refused:
            note = (
                f"; non-finite weights were not saved, {', '.join(kept)} keep the last finite ones"
                if kept
                else "; non-finite weights were not saved and no finite checkpoint was written before"
            )
        return f"training stopped at step {self.trainer.global_step} as unstable: {self.stop_reason}{note}"


def _warn_if_no_last(trainer: Any) -> None:
    """``--ckpt_path last`` with no last checkpoint in this run's folder starts from scratch: say so, and name the
    newest ``last.ckpt`` of an earlier version to resume instead.
    """
    found = {p for c in trainer.checkpoint_callbacks for p in last_checkpoints(c, trainer) if p and os.path.isfile(p)}
    if found:
        return
    root = getattr(trainer.logger, "root_dir", None) if trainer.logger is not None else None
    earlier = sorted(Path(root).glob("version_*/checkpoints/last*.ckpt"), key=os.path.getmtime) if root else []
    hint = (
        f"to resume the newest earlier run give its file: --ckpt_path {earlier[-1]}"
        if earlier
        else f"no earlier run under {root or trainer.default_root_dir} has a last checkpoint either"
    )
    warnings.warn(
        f"--ckpt_path last: this run's checkpoint folder holds no last checkpoint, so training starts from scratch; "
        f"{hint}",
        UserWarning,
        stacklevel=3,
    )


def _class_defaults_of(cls_or_path: Any) -> dict[str, Any]:
    from pdelightning.resume import class_defaults

    if isinstance(cls_or_path, str):
        return class_defaults(cls_or_path)
    return class_defaults(f"{cls_or_path.__module__}.{cls_or_path.__qualname__}")


def _is_probe(callback: Callback) -> bool:
    return any(c.__name__ == "ProbeCallback" for c in type(callback).__mro__)


def _is_stability_monitor(callback: Callback) -> bool:
    return any(c.__name__ == "StabilityMonitor" for c in type(callback).__mro__) and hasattr(callback, "stop_reason")


def build_cli(args: ArgsType = None, run: bool = True) -> PDELightningCLI:
    """Build (and by default run) the CLI; ``args`` as for ``LightningCLI``."""
    return PDELightningCLI(
        ClassificationTask,
        ClassificationDataModule,
        subclass_mode_data=True,
        trainer_defaults={"logger": _DEFAULT_LOGGER},
        save_config_callback=KeepConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_class=_ArgumentParser,
        args=args,
        run=run,
    )


def _fail(message: str) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(EXIT_BAD_INPUT)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``pdelightning`` console script and ``python -m pdelightning``.

    ``pdelightning summary <log_dir>`` reports a finished run (:mod:`pdelightning.report`); ``pdelightning configs``
    lists the configs and callback bundles that ship with the package (``-c NAME`` finds them from any directory,
    :mod:`pdelightning.resources`);
    the paper's reproduction is a separate command, ``pdelightning-reproduce``; everything
    else (``fit``, ``validate``, ``test``, ``predict``) to LightningCLI. Exit status: 0 on success, 2 on bad
    input (one ``error:`` line; set ``PDELIGHTNING_TRACEBACK=1`` for the traceback), 3 when
    ``StabilityMonitor`` stopped training, 1 on any other failure (with its traceback).
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] == "summary":  # the report of a finished run (pdelightning.report)
        from pdelightning.report import main as summary

        sys.exit(summary(argv[1:]))
    if argv and argv[0] == "configs":  # the configs and callback bundles that ship with the package
        print(list_configs())
        sys.exit(0)
    if argv and argv[0] in ("report", "reproduce"):  # the reproduction is its own package and command
        rest = " ".join(argv[1:]) if argv[0] == "reproduce" else " ".join(argv)
        _fail(
            f"`pdelightning {argv[0]}` moved: the paper's reproduction has its own command, "
            f"`pdelightning-reproduce {rest}` (package pdelightning_reproduce)"
        )
    debug = os.environ.get("PDELIGHTNING_TRACEBACK", "") not in ("", "0")
    try:
        if argv is not None:
            argv = resolve_config_args(argv)
            check_config_files(argv)
        cli = build_cli(argv if argv is not None else args)
    except (InputError, FileNotFoundError, TargetNotFoundError) as err:
        if debug:
            raise
        _fail(str(err))
    except Exception as err:
        # a read-only folder or a full disk (the machine, not the run), or a class that failed to build
        message = storage_message(err)
        if message is None and getattr(err, "_pdelightning_instantiating", False):
            message = instantiation_message(err)
        if debug or message is None:
            raise
        _fail(message)
    message = cli.unstable_message()
    if message:
        sys.stdout.flush()
        sys.stderr.write(f"error: {message}\n")
        sys.exit(EXIT_UNSTABLE)


if __name__ == "__main__":
    main()
