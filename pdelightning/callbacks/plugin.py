"""Opt-in plugin: attach the analysis callbacks to *any* Lightning script through an environment variable.

pdelightning registers :func:`callbacks_factory` in Lightning's ``lightning.pytorch.callbacks_factory``
entry-point group, which every ``Trainer`` consults when it is built. It does nothing unless
``PDELIGHTNING_CALLBACKS`` is set:

* ``PDELIGHTNING_CALLBACKS=all``: the six callbacks with their defaults;
* ``PDELIGHTNING_CALLBACKS=gradient_flow,stability_monitor``: a comma list (snake-case or class names);
* ``PDELIGHTNING_CALLBACKS=path/to/bundle.yaml``: callbacks with arguments, either one of our
  ``callbacks/*.yaml`` bundles (``trainer: callbacks+: [...]``) or a plain list of
  ``{class_path: ..., init_args: {...}}``.

Callbacks attached this way never stop the user's run: each is built with ``on_missing="warn"`` (unless the
YAML says otherwise), so one that finds nothing it can analyse in the model warns once, naming what it looked
for and what it found, and steps aside.

Example::

    PDELIGHTNING_CALLBACKS=all python my_train.py   # my_train.py builds a plain lightning Trainer
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

ENV_VAR = "PDELIGHTNING_CALLBACKS"
CALLBACK_NAMES = (
    "AttentionSimilarity",
    "InformationFlow",
    "LayerMutualInformation",
    "GradientFlow",
    "PerturbationEval",
    "StabilityMonitor",
)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _resolve_class(name: str) -> type[Callback]:
    import pdelightning.callbacks as cbs

    by_name = {n.lower(): n for n in CALLBACK_NAMES} | {_snake(n): n for n in CALLBACK_NAMES}
    key = name.strip()
    if key.lower() in by_name:
        return getattr(cbs, by_name[key.lower()])
    if "." in key:
        module, _, cls = key.rpartition(".")
        return getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"{ENV_VAR}: unknown callback {name!r}; valid names: 'all', "
        f"{', '.join(_snake(n) for n in CALLBACK_NAMES)} (or their class names), or a YAML file path"
    )


def _entries_from_yaml(path: Path) -> list[Any]:
    content = yaml.safe_load(path.read_text()) or []
    if isinstance(content, dict):
        trainer = content.get("trainer", content)
        content = trainer.get("callbacks+", trainer.get("callbacks", []))
    if not isinstance(content, list):
        raise ValueError(f"{ENV_VAR}={path}: expected a list of callbacks or a `trainer: callbacks+:` bundle")
    return content


def _make(cls: type[Callback], kwargs: dict[str, Any] | None = None) -> Callback:
    kwargs = dict(kwargs or {})
    if "on_missing" in inspect.signature(cls.__init__).parameters or _takes_probe_kwargs(cls):
        kwargs.setdefault("on_missing", "warn")
    return cls(**kwargs)


def _takes_probe_kwargs(cls: type[Callback]) -> bool:
    from pdelightning.callbacks._probe import ProbeCallback

    return issubclass(cls, ProbeCallback)


def build_callbacks(spec: str) -> list[Callback]:
    """Instantiate the callbacks named by ``spec`` (the value of ``PDELIGHTNING_CALLBACKS``).

    Raises:
        ValueError: for an unknown name or a malformed YAML file.
        FileNotFoundError: for a YAML path that does not exist.
    """
    spec = spec.strip()
    if not spec:
        return []
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={spec}: no such YAML file")
        out = []
        for entry in _entries_from_yaml(path):
            if isinstance(entry, str):
                out.append(_make(_resolve_class(entry)))
            else:
                out.append(_make(_resolve_class(entry["class_path"]), entry.get("init_args")))
        return out
    names = [n for n in spec.split(",") if n.strip()]
    if any(n.strip().lower() == "all" for n in names):
        names = list(CALLBACK_NAMES)
    return [_make(_resolve_class(n)) for n in names]


def callbacks_factory() -> list[Callback]:
    """Entry point for ``lightning.pytorch.callbacks_factory``: callbacks from ``PDELIGHTNING_CALLBACKS``, or none."""
    return build_callbacks(os.environ.get(ENV_VAR, ""))
