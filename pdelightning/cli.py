"""``pdelightning`` command line: LightningCLI with YAML configs (``fit``, ``validate``, ``test``, ``predict``)."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that their classes are known by short name in YAML (class_path: PDEClassifier, ...).
import pdelightning.callbacks
import pdelightning.data
import pdelightning.models  # noqa: F401
from pdelightning.data.base import ClassificationDataModule
from pdelightning.task import ClassificationTask

_DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "logs", "name": "pdelightning"},
}


class PDELightningCLI(LightningCLI):
    """LightningCLI whose data module tells the model what it would otherwise be told twice.

    Linked (``apply_on="instantiate"``): ``data.num_classes`` into the task and the model,
    ``data.input_kind``, ``data.image_size``, ``data.vocab_size`` and ``data.max_len`` into the model.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the data module's attributes to the model's arguments."""
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        for attr in ("num_classes", "input_kind", "image_size", "vocab_size", "max_len"):
            parser.link_arguments(f"data.{attr}", f"model.model.init_args.{attr}", apply_on="instantiate")

    def after_fit(self) -> None:
        """Say where the logs are, how to view them, and the final validation numbers."""
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.logger is None:
            return
        log_dir = trainer.logger.log_dir or trainer.default_root_dir
        final = ", ".join(
            f"{k}={float(v):.4f}"
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith(("val/", "train/acc"))
        )
        print(f"\nFinished after {trainer.global_step} steps ({trainer.current_epoch} epochs). {final}")
        print(f"Logs and checkpoints: {log_dir}")
        print(f"View them with:       tensorboard --logdir {trainer.logger.save_dir}")


def build_cli(args: ArgsType = None, run: bool = True) -> PDELightningCLI:
    """Build (and by default run) the CLI; ``args`` as for ``LightningCLI``."""
    return PDELightningCLI(
        ClassificationTask,
        ClassificationDataModule,
        subclass_mode_data=True,
        trainer_defaults={"logger": _DEFAULT_LOGGER},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``pdelightning`` console script and ``python -m pdelightning``.

    ``pdelightning report ...`` and ``pdelightning reproduce ...`` go to the reproduction tools; everything
    else (``fit``, ``validate``, ``test``, ``predict``) to LightningCLI.
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] in ("report", "reproduce"):
        if argv[0] == "report":
            from pdelightning.reproduce.report import main as tool
        else:
            from pdelightning.reproduce.run import main as tool
        sys.exit(tool(argv[1:]))
    build_cli(args)


if __name__ == "__main__":
    main()
