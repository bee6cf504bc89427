"""Opt-in plugin: attach the analysis callbacks to *any* Lightning script through an environment variable.

pdelightning registers :func:`callbacks_factory` in Lightning's ``lightning.pytorch.callbacks_factory``
entry-point group, which every ``Trainer`` consults when it is built. It does nothing unless
``PDELIGHTNING_CALLBACKS`` is set:

* ``PDELIGHTNING_CALLBACKS=all``: every callback with its defaults (``paper``: the six of the paper's experiments;
  ``lens``: PDEFit, JacobianStability, AttentionRollout), all under one shared time budget;
* ``PDELIGHTNING_CALLBACKS=gradient_flow,stability_monitor``: a comma list (snake-case or class names);
* ``PDELIGHTNING_CALLBACKS=path/to/bundle.yaml``: callbacks with arguments, either one of the bundles that ship
  with the package (``callbacks/all.yaml`` or ``callbacks:all`` from any directory; ``trainer: callbacks+: [...]``)
  or a plain list of ``{class_path: ..., init_args: {...}}``.

Callbacks attached this way never stop the user's run: each is built with ``on_missing="warn"`` and
``on_error="warn"`` (unless the YAML says otherwise), so one that finds nothing it can analyse in the model warns
once, naming what it looked for and what it found, and steps aside; and one that raises (in any hook or probe)
warns once, naming the error and where it happened, and is switched off on every rank while training goes on
(:mod:`pdelightning.probing.guard`).

With any analysis callback the plugin also attaches :class:`~pdelightning.report.RunReport`: the script ends with the
analysis summary and writes ``report.html`` beside the TensorBoard events (once, also beside the script's own
``RunReport``).

Example::

    PDELIGHTNING_CALLBACKS=all python my_train.py   # my_train.py builds a plain lightning Trainer
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from pdelightning.resources import UnknownConfigError, resolve_config
from pdelightning.trust import check_kwargs, import_class

ENV_VAR = "PDELIGHTNING_CALLBACKS"
CALLBACK_NAMES = (
    "AttentionSimilarity",
    "InformationFlow",
    "LayerMutualInformation",
    "GradientFlow",
    "PerturbationEval",
    "StabilityMonitor",
)
"""The six analysis callbacks of the paper's experiments."""
LENS_NAMES = ("PDEFit", "JacobianStability", "AttentionRollout")
"""The PDE lens: how PDE-like and how stable any Transformer's depth dynamics are."""
GROUPS = {"all": CALLBACK_NAMES + LENS_NAMES, "paper": CALLBACK_NAMES, "lens": LENS_NAMES}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _resolve_class(name: str) -> type[Callback]:
    import pdelightning.callbacks as cbs

    known = CALLBACK_NAMES + LENS_NAMES
    by_name = {n.lower(): n for n in known} | {_snake(n): n for n in known}
    key = name.strip()
    if key.lower() in by_name:
        return getattr(cbs, by_name[key.lower()])
    if "." in key:  # checked to be a Callback subclass before anything of it is called
        return import_class(key, (Callback,), f"{ENV_VAR}: class_path")
    names = [*known, *(_snake(n) for n in known)]
    close = difflib.get_close_matches(key, names, n=2, cutoff=0.6) or difflib.get_close_matches(
        key.lower(), [n.lower() for n in known], n=2, cutoff=0.6
    )
    hint = f"did you mean {' or '.join(repr(by_name.get(c.lower(), c)) for c in close)}? " if close else ""
    raise ValueError(
        f"{ENV_VAR}: unknown callback {name!r}; {hint}valid names: {', '.join(repr(g) for g in GROUPS)}, "
        f"{', '.join(_snake(n) for n in CALLBACK_NAMES + LENS_NAMES)} (or their class names), or a YAML file path"
    )


def _entries_from_yaml(path: Path) -> list[Any]:
    content = yaml.safe_load(path.read_text()) or []
    if isinstance(content, dict):
        trainer = content.get("trainer", content)
        content = trainer.get("callbacks+", trainer.get("callbacks", [])) if isinstance(trainer, dict) else None
    if not isinstance(content, list):
        raise ValueError(f"{ENV_VAR}={path}: expected a list of callbacks or a `trainer: callbacks+:` bundle")
    for entry in content:
        if not (isinstance(entry, str) or (isinstance(entry, dict) and isinstance(entry.get("class_path"), str))):
            raise ValueError(
                f"{ENV_VAR}={path}: entry {entry!r} is neither a callback name nor a mapping with a class_path"
            )
    if not content:
        warnings.warn(f"{ENV_VAR}={path} lists no callbacks: nothing is attached", UserWarning, stacklevel=3)
    return content


def _make(cls: type[Callback], kwargs: dict[str, Any] | None = None) -> Callback:
    kwargs = dict(kwargs or {})
    params = inspect.signature(cls.__init__).parameters
    for arg in ("on_missing", "on_error"):  # never stop the user's run: warn once and step aside
        if arg in params or _takes_probe_kwargs(cls):
            kwargs.setdefault(arg, "warn")
    return cls(**kwargs)


def _takes_probe_kwargs(cls: type[Callback]) -> bool:
    from pdelightning.callbacks.base import ProbeCallback

    return issubclass(cls, ProbeCallback)


def build_callbacks(spec: str) -> list[Callback]:
    """Instantiate the callbacks named by ``spec`` (the value of ``PDELIGHTNING_CALLBACKS``).

    Every class named is checked to be a ``Callback`` subclass, and every argument to be one it takes, before
    anything is instantiated.

    Raises:
        ValueError: for an unknown name (with the closest valid ones), a malformed YAML file, a class that is not
            a ``Callback`` (``UntrustedClassError``) or an argument the class does not take.
        FileNotFoundError: for a YAML path that does not exist.
    """
    spec = spec.strip()
    if not spec:
        return []
    if spec.endswith((".yaml", ".yml")) or spec.startswith("callbacks:"):
        try:  # a file, or one of the bundles that ship with the package (callbacks/all.yaml, callbacks:all)
            path = resolve_config(spec)
        except UnknownConfigError as err:
            raise FileNotFoundError(f"{ENV_VAR}={spec}: {err}") from None
        out = []
        for entry in _entries_from_yaml(path):
            if isinstance(entry, str):
                out.append(_make(_resolve_class(entry)))
            else:
                cls, kwargs = _resolve_class(entry["class_path"]), dict(entry.get("init_args") or {})
                check_kwargs(cls, kwargs, f"{ENV_VAR}={path}")
                out.append(_make(cls, kwargs))
        return out
    names: list[str] = []
    for n in (n.strip() for n in spec.split(",") if n.strip()):
        names += list(GROUPS.get(n.lower(), (n,)))
    return [_make(_resolve_class(n)) for n in names]


def with_report(callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` and, when one of them is an analysis callback, a :class:`~pdelightning.report.RunReport` (the
    summary and ``report.html`` at the end of ``fit``), unless they hold one already.

    A ``RunReport`` the user's script attaches as well does not print a second summary: only the first ``RunReport``
    of a trainer reports (the factory cannot see the user's list); ``pdelightning fit`` drops this one and prints
    the summary itself.
    """
    from pdelightning.probing.guard import GuardedCallback
    from pdelightning.report import RunReport

    if not any(isinstance(c, GuardedCallback) for c in callbacks) or any(isinstance(c, RunReport) for c in callbacks):
        return callbacks
    report = RunReport()
    report.from_plugin = True
    return [*callbacks, report]


def callbacks_factory() -> list[Callback]:
    """Entry point for ``lightning.pytorch.callbacks_factory``: callbacks from ``PDELIGHTNING_CALLBACKS`` (with a
    :class:`~pdelightning.report.RunReport`, see :func:`with_report`), or none.
    """
    return with_report(build_callbacks(os.environ.get(ENV_VAR, "")))
