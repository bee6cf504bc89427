"""Data is never code: files a user names as data are loaded as data, and classes named in them are type-checked.

Two ways a file meant as data could run code, and how each is closed:

- **Pickles.** Every ``torch.load`` of a file the user names (``--ckpt_path``, ``reference_checkpoint``, the
  reproduction tools' ``*.pt`` files) goes through :func:`load_data_file`: ``weights_only=True`` with the few
  extra globals pdelightning's own checkpoints may hold allowed (:data:`SAFE_GLOBALS`). Any other global
  (``os.system``, ``subprocess.Popen``, a user class) is refused with :class:`UntrustedFileError`, naming the
  global and the explicit way to load a file whose author you trust (``trust_checkpoint=True`` in Python,
  ``--weights_only false`` on the command line).
- **Class paths.** A class named in a YAML file (``PDELIGHTNING_CALLBACKS=file.yaml``, ``reference_config``,
  ``reference_class``) is resolved by :func:`import_class`, which checks that it is a subclass of the type the
  slot needs (``Callback``, ``nn.Module``, ``LightningDataModule``) *before* anything is called, as the typed
  parsing of a ``-c`` config does. ``class_path: subprocess.Popen`` is refused without being called.

  Choice: the module of a dotted path is imported through the normal import system (as jsonargparse does for
  a ``-c`` config), so a user's own ``my_pkg.MyCallback`` works. Only modules already on the Python path can be
  named (never a file path), and importing such a module runs only code that is installed on the machine; what
  is never done is *calling* a named object that is not of the required type.

Example::

    >>> import_class("torch.nn.Linear", (torch.nn.Module,), "reference_class").__name__
    'Linear'
    >>> import_class("subprocess.Popen", (torch.nn.Module,), "reference_class")
    Traceback (most recent call last):
    ...
    pdelightning.trust.UntrustedClassError: reference_class='subprocess.Popen' is not a Module subclass ...
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import pathlib
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pdelightning.compat import lightning_class_path
from pdelightning.utils import InputError

SAFE_GLOBALS: tuple[Any, ...] = (
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.WindowsPath,
    pathlib.PureWindowsPath,
    argparse.Namespace,
)
"""Globals beyond torch's own allow-list that a checkpoint written by pdelightning may hold (paths and namespaces
in hyperparameters). Each is a plain value type whose reconstruction runs no user code."""

TRUST_HINT = (
    "if you trust the file's author, load it with trust_checkpoint=True (Python) or --weights_only false "
    "(command line), which runs the file's pickle code"
)
"""The explicit way to load an untrusted pickle, named in every refusal."""

CHECKPOINT_CLASS_KEY = "pdelightning_class_path"
"""The checkpoint entry where a pdelightning ``LightningModule`` records its own dotted class path, so a checkpoint
names the class that rebuilds it (:func:`checkpoint_class`) without the reader importing it by name."""

_BLOCKED_RE = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (?P<name>[\w.<>]+)")


class UntrustedFileError(InputError):
    """A file named as data holds a pickle global outside the allow-list (code would run to load it)."""


class UntrustedClassError(InputError):
    """A class named in a YAML file is not of the type its slot needs, or cannot be imported."""


def blocked_global(err: BaseException) -> str | None:
    """The global that ``torch.load(weights_only=True)`` refused in ``err`` (or its causes), or ``None``.

    Example::

        >>> blocked_global(pickle.UnpicklingError("... Trying to load unsupported GLOBAL posix.system whose ..."))
        'posix.system'
    """
    link: BaseException | None = err
    seen: list[BaseException] = []
    while link is not None and link not in seen:
        seen.append(link)
        m = _BLOCKED_RE.search(str(link))
        if m:
            return m["name"]
        link = link.__cause__ or link.__context__
    return None


def untrusted_message(path: str | Path, name: str, hint: str = TRUST_HINT) -> str:
    """One line: ``path`` contains a non-allowed object ``name``, it was not loaded, and how to proceed."""
    return (
        f"{path} contains a non-allowed object {name} (a pickle global that loading would import and call); it was "
        f"not loaded, only tensors and plain values are. {hint[0].upper()}{hint[1:]}"
    )


def load_data_file(
    path: str | Path, map_location: Any = "cpu", trust: bool = False, mmap: bool = False, hint: str = TRUST_HINT
) -> Any:
    """``torch.load`` a file the user named, as data: ``weights_only=True`` with :data:`SAFE_GLOBALS` allowed.

    Args:
        path: the file.
        map_location: as ``torch.load``.
        trust: load with ``weights_only=False`` (runs the file's pickle code: only for files you trust).
        mmap: memory-map the tensor data (falls back to a plain load for a legacy, non-zip file).
        hint: the way to proceed named in a refusal.

    Raises:
        UntrustedFileError: when the file holds any other global; nothing of it was called.
    """
    kwargs: dict[str, Any] = {"map_location": map_location, "weights_only": not trust}
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        try:
            if mmap:
                try:
                    return torch.load(path, mmap=True, **kwargs)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
            return torch.load(path, **kwargs)
        except pickle.UnpicklingError as err:
            name = blocked_global(err)
            if name is None:
                raise
            raise UntrustedFileError(untrusted_message(path, name, hint)) from None


def _subclasses_in(module: Any, bases: tuple[type, ...]) -> list[str]:
    return sorted(
        n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, bases) and not n.startswith("_")
    )


def _base_names(bases: Sequence[type]) -> str:
    return " or ".join(b.__name__ for b in bases)


def import_class(path: str, bases: tuple[type, ...], arg: str) -> type:
    """Import the class at dotted ``path`` and check it subclasses one of ``bases``; nothing of it is called.

    Args:
        path: ``package.module.Name``.
        bases: the types the slot accepts.
        arg: the name of the setting, for the message (``class_path``, ``reference_class``, ...).

    Raises:
        UntrustedClassError: for a path that is not dotted, a module that does not import, a missing attribute
            (with the closest names of the module's classes of the right type), or an object that is not a
            subclass of ``bases``.
    """
    module_name, _, name = str(path).rpartition(".")
    want = _base_names(bases)
    if not module_name or not name:
        raise UntrustedClassError(f"{arg}={path!r} must be a dotted path (package.module.Name) of a {want} subclass")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module failing at import
        raise UntrustedClassError(
            f"{arg}={path!r} cannot be imported: module {module_name!r} fails ({type(err).__name__}: {err})"
        ) from None
    obj = getattr(module, name, None)
    if obj is None:
        names = _subclasses_in(module, bases)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(f'{module_name}.{c}' for c in close)}?" if close else ""
        listing = f"; its {want} classes: {', '.join(names)}" if names and len(names) <= 25 else ""
        raise UntrustedClassError(f"{arg}={path!r} cannot be imported: {module_name} has no {name!r}{hint}{listing}")
    if not (isinstance(obj, type) and issubclass(obj, bases)):
        kind = f"class {obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else type(obj).__name__
        raise UntrustedClassError(
            f"{arg}={path!r} is not a {want} subclass (it is a {kind}); refused without calling it"
        )
    return obj


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def init_arguments(cls: type) -> list[str] | None:
    """The keyword arguments ``cls(...)`` takes: those of its ``__init__`` and, while an ``__init__`` takes
    ``**kwargs``, those of the next ``__init__`` up the MRO (where ``super().__init__(**kwargs)`` sends them, as
    jsonargparse assumes too): a callback's own arguments, then ``ProbeCallback``'s.

    Returns:
        The names in that order, or ``None`` when any keyword may be valid: ``**kwargs`` that reach no ``__init__``
        without ``**kwargs`` (a class that keeps them itself), or a signature that cannot be read.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass is object:
            return None
        try:
            params = list(inspect.signature(init).parameters.values())[1:]  # without self
        except (TypeError, ValueError):
            return None
        names += [p.name for p in params if p.kind in _NAMED and p.name not in names]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names
    return None


def check_kwargs(cls: type, kwargs: dict[str, Any], where: str) -> None:
    """Refuse keyword arguments ``cls`` does not take (:func:`init_arguments`), suggesting the closest ones (as the
    CLI does).

    Raises:
        InputError: naming the unknown argument, the closest valid ones and the full list.
    """
    names = init_arguments(cls)
    if names is None:
        return
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise InputError(
                f"{where}: {cls.__name__} has no argument {key!r}; {hint}its arguments: {', '.join(names)}"
            )


def checkpoint_class(checkpoint: Any, bases: tuple[type, ...], arg: str = "reference_checkpoint") -> type | None:
    """The class a loaded checkpoint names for itself, type-checked by :func:`import_class`; ``None`` if none.

    Read, in order: :data:`CHECKPOINT_CLASS_KEY` (written by pdelightning's tasks) and Lightning's own
    ``hyper_parameters["_class_path"]`` (written by LightningCLI in subclass mode).

    Raises:
        UntrustedClassError: when the named class does not import or is not a subclass of ``bases``.
    """
    if not isinstance(checkpoint, dict):
        return None
    named = checkpoint.get(CHECKPOINT_CLASS_KEY) or lightning_class_path(checkpoint.get("hyper_parameters"))
    if not isinstance(named, str):
        return None
    return import_class(named, bases, f"{arg}'s class")
