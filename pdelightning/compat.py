"""Every use of a Lightning private API, in one place (L0: imports nothing of pdelightning).

A name that starts with ``_`` on a Lightning module or object can change in any release. pdelightning reads or
calls such names only through the small functions below; each names the Lightning versions it was checked against
and what it does when the name is gone. :data:`PRIVATE_NAMES` lists every private name used here (and the private
methods overridden elsewhere), and ``tests/test_compat.py`` checks that each still exists in the installed
Lightning, so an upgrade that removes one fails loudly in the tests rather than quietly in a user's run.

Checked against Lightning 2.6 (2.6.6 installed when written; ``tests/test_compat.py`` passes on 2.6.0 too);
``pyproject.toml`` asks for ``lightning>=2.6``: before 2.5.5 ``LightningCLI`` has no ``_parse_ckpt_path`` (so the
``--ckpt_path`` check below would silently never run), and before 2.6 ``Trainer.fit`` has no ``weights_only``
(the way to resume a trusted checkpoint that is not plain data).

Overrides that cannot move here: :class:`~pdelightning.cli.PDELightningCLI` overrides three private methods of
``LightningCLI`` (``_parse_ckpt_path``, ``_instantiate_trainer``, ``_run_subcommand``; listed in
:data:`CLI_PRIVATE_OVERRIDES`). An override must live in the subclass; each is kept thin (our logic is in public
methods of the CLI, and it calls ``super()`` once). If Lightning renames one, the override is silently never called:
the hasattr test is what catches that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# --- probing ---


def fit_val_dataloader(trainer: Any) -> Any:
    """The validation loader given to ``trainer.fit(...)``, before the loops have loaded it (at ``setup``).

    Reads ``trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()`` (the ``_DataLoaderSource`` of the fit
    loop's validation loop). Checked with Lightning 2.6.6. Fallback: ``None`` when that attribute is missing or
    raises (the caller then looks elsewhere for data).
    """
    try:
        return trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
    except Exception:
        return None


def fit_train_dataloader(trainer: Any) -> Any:
    """The training loader given to ``trainer.fit(...)``, before the fit loop has loaded it (at ``setup``).

    Reads ``trainer.fit_loop._data_source.dataloader()``. Checked with Lightning 2.6.6. Fallback: ``None`` when that
    attribute is missing or raises.
    """
    try:
        return trainer.fit_loop._data_source.dataloader()
    except Exception:
        return None


def callback_state_key(callback: Any, **kwargs: Any) -> str:
    """The checkpoint key of ``callback`` made of its class name and ``kwargs``, as Lightning's own callbacks make it.

    Calls ``Callback._generate_state_key(**kwargs)`` (``f"{qualname}{kwargs!r}"``). Checked with Lightning 2.6.6.
    Fallback: the same string built here when the method is missing.
    """
    generate = getattr(callback, "_generate_state_key", None)
    if callable(generate):
        return str(generate(**kwargs))
    return f"{type(callback).__qualname__}{kwargs!r}"


# --- cli, task, resume, checkpointing ---

CLI_PRIVATE_OVERRIDES = ("_parse_ckpt_path", "_instantiate_trainer", "_run_subcommand")
"""Private methods of ``lightning.pytorch.cli.LightningCLI`` that ``PDELightningCLI`` overrides (Lightning 2.6):
``_parse_ckpt_path`` (check ``--ckpt_path`` instead of merging its hyperparameters into the config),
``_instantiate_trainer`` (add the atomic checkpoint IO and the random-state callback) and ``_run_subcommand``
(remove the log directory of a run that failed before its first step)."""


def cli_hyperparameters() -> dict[str, Any] | None:
    """The hyperparameters LightningCLI hands the ``LightningModule`` it is instantiating, or ``None`` outside it.

    Reads ``lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters`` (a ``ContextVar``; Lightning 2.6).
    Fallback when it is gone: ``None`` (the task saves its hyperparameters as outside the CLI: the checkpoint then
    needs ``model=`` to load, as one written by a plain script).
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:
        return None
    return _given_hyperparameters.get()


def module_trainer(module: Any) -> Any | None:
    """The trainer a ``LightningModule`` is attached to, or ``None`` (``module.trainer`` raises when there is none).

    Reads ``LightningModule._trainer`` (Lightning 2.0-2.6). Fallback: ``None``.
    """
    return getattr(module, "_trainer", None)


def should_update_logs(trainer: Any) -> bool:
    """Whether the trainer writes logs on the current step (honours ``log_every_n_steps``).

    Reads ``trainer._logger_connector.should_update_logs`` (Lightning 2.0-2.6). Fallback: ``True`` (log every step,
    slower but nothing is lost).
    """
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except (AttributeError, NotImplementedError):
        return True


def set_batches_that_stepped(trainer: Any, value: int) -> bool:
    """Set the fit loop's logging-step counter (``trainer.fit_loop.epoch_loop._batches_that_stepped``).

    Used to resume at the logging step of an epoch-end checkpoint (Lightning 2.0-2.6). Fallback when the attribute
    is gone: nothing is set and ``False`` is returned (the resumed run's logging steps are off by one batch).
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is None or not hasattr(loop, "_batches_that_stepped"):
        return False
    loop._batches_that_stepped = value
    return True


def disable_default_hp_metric(logger: Any) -> None:
    """Stop a ``TensorBoardLogger`` from writing the placeholder ``hp_metric = -1`` with its hyperparameters.

    Sets ``TensorBoardLogger._default_hp_metric`` (the constructor's ``default_hp_metric``; Lightning 2.0-2.6).
    Fallback when it is gone: nothing (a resumed run then writes a second placeholder point).
    """
    if hasattr(logger, "_default_hp_metric"):
        logger._default_hp_metric = False


def last_checkpoints(callback: Any, trainer: Any) -> set[str]:
    """The ``last*.ckpt`` files a ``ModelCheckpoint`` would resume from (``--ckpt_path last``).

    Calls ``ModelCheckpoint._find_last_checkpoints(trainer)`` (Lightning 2.1-2.6). Fallback: the files matching
    ``last*.ckpt`` in the callback's ``dirpath`` (local folders only).
    """
    find = getattr(callback, "_find_last_checkpoints", None)
    if find is not None:
        return set(find(trainer))
    dirpath = getattr(callback, "dirpath", None)
    name = getattr(callback, "CHECKPOINT_NAME_LAST", "last")
    return {os.path.normpath(p) for p in Path(dirpath).glob(f"{name}*.ckpt")} if dirpath else set()


def logger_hparams(logger: Any) -> dict[str, Any]:
    """A logger's hyperparameters flattened and sanitised as Lightning writes them to TensorBoard's HParams tab.

    Calls ``lightning.fabric.utilities.logger._convert_params`` and ``_flatten_dict`` and the logger's
    ``_sanitize_params`` (Lightning 2.0-2.6). Fallback: a ``/``-joined flattening with non-numbers as strings.
    """
    params = dict(logger.hparams)
    try:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        return logger._sanitize_params(_flatten_dict(_convert_params(params)))
    except (ImportError, AttributeError):
        return _flatten(params)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def tensorboard_file_writer(logger: Any) -> Any | None:
    """The ``FileWriter`` under a ``TensorBoardLogger``'s ``SummaryWriter`` (to add raw summaries), or ``None``.

    Calls ``logger.experiment._get_file_writer()`` (``torch.utils.tensorboard`` and ``tensorboardX``; Lightning
    2.0-2.6 builds one of the two). Fallback: ``None`` (the caller skips the HParams summary).
    """
    get = getattr(logger.experiment, "_get_file_writer", None)
    return get() if get is not None else None


def lightning_class_path(hparams: Any) -> str | None:
    """The class path LightningCLI (subclass mode) records in a checkpoint's ``hyper_parameters``, or ``None``.

    Reads the key ``"_class_path"`` (Lightning 2.3-2.6). Fallback: ``None`` (the checkpoint names no class).
    """
    value = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    return value if isinstance(value, str) else None


PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    # the probing section
    ("lightning.pytorch.Trainer().fit_loop.epoch_loop.val_loop", "_data_source"),
    ("lightning.pytorch.Trainer().fit_loop", "_data_source"),
    ("lightning.pytorch.Callback", "_generate_state_key"),
    # cli, task, resume, checkpointing
    *(("lightning.pytorch.cli.LightningCLI", name) for name in CLI_PRIVATE_OVERRIDES),
    ("lightning.pytorch.core.mixins.hparams_mixin", "_given_hyperparameters"),
    ("lightning.pytorch.LightningModule()", "_trainer"),
    ("lightning.pytorch.Trainer()", "_logger_connector"),
    ("lightning.pytorch.Trainer().fit_loop.epoch_loop", "_batches_that_stepped"),
    ("lightning.pytorch.loggers.TensorBoardLogger()", "_default_hp_metric"),
    ("lightning.pytorch.loggers.TensorBoardLogger", "_sanitize_params"),
    ("lightning.pytorch.loggers.TensorBoardLogger().experiment", "_get_file_writer"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_find_last_checkpoints"),
    ("lightning.fabric.utilities.logger", "_convert_params"),
    ("lightning.fabric.utilities.logger", "_flatten_dict"),
    ("lightning.pytorch.cli source", "_class_path"),
)
"""Every Lightning private name pdelightning uses, as ``(owner, name)``. The owner is a dotted module or class;
``X()`` means an instance of ``X`` (an attribute set in ``__init__``), followed by attributes to reach from it; and
``M source`` means the string key ``name`` appears in module ``M``'s source (a checkpoint key, not an attribute)."""
