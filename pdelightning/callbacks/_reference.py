"""The reference and null models that AttentionSimilarity and InformationFlow compare against."""

from __future__ import annotations

import copy
import importlib
import inspect
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from pdelightning._checks import LINKED_MODEL_ARGS
from pdelightning.adapters.registry import find_adapter
from pdelightning.callbacks._targets import module_copy
from pdelightning.trust import (
    CHECKPOINT_CLASS_KEY,
    SAFE_GLOBALS,
    UntrustedFileError,
    blocked_global,
    checkpoint_class,
    import_class,
    load_data_file,
    untrusted_message,
)


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with gradients off (a reference is never trained)."""
    module.eval()
    module.requires_grad_(False)
    return module


def reinitialised_copy(module: nn.Module, seed: int) -> nn.Module | None:
    """A frozen copy of ``module`` with every parameter drawn afresh by its family's own initialiser, or ``None``.

    The family adapter's initialiser is used (our models' ``reset_parameters``, HuggingFace ``_init_weights``,
    timm's and TransformerLens' ``init_weights``, PyTorch's ``reset_parameters``), so the null is a genuine
    initialisation (e.g. our token embeddings at ``N(0, 1/d)``, not ``nn.Embedding``'s ``N(0, 1)``). The draw is on
    the CPU under a forked RNG seeded with ``seed``: identical on every rank and device, global RNG untouched.
    ``None`` (with a warning) when no initialiser exists or the attention weights came out unchanged: a null that
    is a copy of the model would be compared with the reference as if it were independent.
    """
    clone = module_copy(module).cpu()
    adapter = find_adapter(clone)
    before = _attention_weights(adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ok = adapter.reinitialise(adapter.model) if adapter is not None else False
    after = _attention_weights(adapter)
    if not ok or (before and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))):
        rank_zero_warn(
            f"the re-initialised null of {type(module).__name__} cannot be built: its family "
            f"({adapter.family if adapter is not None else 'unknown'}) has no initialiser that changes the attention "
            "weights; the random_init null is dropped (it would be a copy of the model)"
        )
        return None
    return freeze(clone)


def _attention_weights(adapter: Any) -> list[torch.Tensor]:
    if adapter is None:
        return []
    out = []
    for layer in adapter.targets().layers[:1]:
        if layer.attention is not None:
            out += [p.detach().clone() for p in layer.attention.parameters()]
            w = layer.out_proj_weight()
            if w is not None:
                out.append(w.detach().clone())
    return out


def import_model_class(path: str, arg: str = "reference_class") -> type[nn.Module]:
    """Import the class at dotted ``path``, checked to be an ``nn.Module`` (a ``LightningModule`` is one) before
    anything of it is called (:func:`~pdelightning.trust.import_class`).

    Example::

        >>> import_model_class("torch.nn.Linear").__name__
        'Linear'

    Raises:
        UntrustedClassError: (a ``ValueError``) for a path that does not import or is not an ``nn.Module`` class.
    """
    return import_class(path, (nn.Module,), arg)


def import_lightning_module_class(path: str) -> type[L.LightningModule]:
    """The ``LightningModule`` subclass at ``path`` (it needs ``load_from_checkpoint``), checked before any call."""
    return import_class(path, (L.LightningModule,), "reference_class")


def named_class(path: str | Path, trust: bool = False) -> type[L.LightningModule] | None:
    """The ``LightningModule`` class the checkpoint at ``path`` names for itself (loaded as data), or ``None``.

    See :func:`~pdelightning.trust.checkpoint_class`: pdelightning's tasks record it under
    :data:`~pdelightning.trust.CHECKPOINT_CLASS_KEY`, LightningCLI in subclass mode in its hyperparameters.

    Raises:
        UntrustedFileError: when the file holds a pickle global outside the allow-list (nothing of it ran).
        UntrustedClassError: when the class it names is not a ``LightningModule`` subclass.
    """
    return checkpoint_class(load_data_file(path, map_location="cpu", trust=trust, mmap=True), (L.LightningModule,))


def load_reference_checkpoint(
    path: str | Path, cls: type | None, hint: str, trust: bool = False, default: type | None = None
) -> nn.Module:
    """Load the reference: ``cls.load_from_checkpoint(path)`` on the CPU.

    The class is ``cls`` if given, else the one the checkpoint names (:func:`named_class`: every checkpoint a
    pdelightning task wrote, e.g. ``pdelightning fit``'s, names :class:`~pdelightning.task.ClassificationTask`),
    else ``default``. The file is loaded as data (``weights_only=True``, :data:`~pdelightning.trust.SAFE_GLOBALS`)
    unless ``trust``.

    Args:
        path: the checkpoint.
        cls: the ``LightningModule`` class that wrote it, or ``None``.
        hint: what to do instead when the checkpoint's hyperparameters cannot rebuild the model (a task built
            in Python rather than from a config), in the caller's argument names.
        trust: load with ``weights_only=False`` (runs the file's pickle code).
        default: the class when neither ``cls`` nor the checkpoint names one (e.g. that of the model under
            training).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        UntrustedFileError: when the file holds a pickle global outside the allow-list (nothing of it ran).
        UntrustedClassError: when the class the checkpoint names is not a ``LightningModule`` subclass.
        TypeError: when no class is known, or ``load_from_checkpoint`` cannot rebuild the module, with ``hint``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference_checkpoint={str(path)!r} does not exist")
    if cls is None:
        cls = named_class(path, trust) or default
    if cls is None:
        raise TypeError(
            f"reference_checkpoint={str(path)!r} does not name the LightningModule class that wrote it (no "
            f"{CHECKPOINT_CLASS_KEY!r} entry, no hyper_parameters._class_path): give reference_class, e.g. "
            "'pdelightning.task.ClassificationTask' for a checkpoint of pdelightning fit"
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return cls.load_from_checkpoint(  # type: ignore[attr-defined]
                str(path), map_location="cpu", weights_only=not trust
            )
    except pickle.UnpicklingError as err:
        name = blocked_global(err)
        if name is None:
            raise
        raise UntrustedFileError(untrusted_message(path, name)) from None
    except TypeError as err:
        raise TypeError(
            f"{cls.__name__}.load_from_checkpoint({str(path)!r}) failed ({err}). If the checkpoint comes from a task "
            f"built in Python (its hparams do not hold the model), {hint}; for another LightningModule give "
            "reference_class"
        ) from err


def linked_values(pl_module: nn.Module) -> dict[str, Any]:
    """The data-linked model arguments of the model under training: from its CLI hparams, else its attributes."""
    hp = getattr(pl_module, "hparams", None) or {}
    inner = hp.get("model") if isinstance(hp, Mapping) else None
    if isinstance(inner, Mapping) and isinstance(inner.get("init_args"), Mapping):
        return {k: inner["init_args"][k] for k in LINKED_MODEL_ARGS if k in inner["init_args"]}
    from pdelightning.models.base import SequenceClassifier

    for m in pl_module.modules():
        if isinstance(m, SequenceClassifier):
            e = m.embed
            tokens = e.input_kind == "tokens"
            return {
                "num_classes": m.num_classes,
                "input_kind": e.input_kind,
                "image_size": 0 if tokens else e.image_size,
                "vocab_size": e.proj.num_embeddings if tokens else 0,
                "max_len": e.n_tokens if tokens else 0,
            }
    return {}


def _init_params(class_path: str) -> set[str] | None:
    """Names of the ``__init__`` parameters of ``class_path`` (a short name is looked up in our models)."""
    try:
        cls = (
            import_model_class(class_path, "class_path")
            if "." in class_path
            else getattr(importlib.import_module("pdelightning.models"), class_path)
        )
        return set(inspect.signature(cls).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def build_from_config(
    path: str, linked: Mapping[str, Any], cls: type | None = None, default: Callable[[], type] | None = None
) -> nn.Module:
    """Instantiate the ``model:`` section of a YAML config in our CLI format.

    ``model:`` is itself ``{class_path, init_args}``, or holds the arguments of ``cls``, else of ``default()``
    (asked only then; e.g. :class:`~pdelightning.task.ClassificationTask`'s ``model: {class_path, init_args}``,
    ``num_classes``, ...). Arguments our CLI links from the data module
    (:data:`~pdelightning._checks.LINKED_MODEL_ARGS`) are filled from ``linked`` where the file does not give them;
    the file's ``data:`` section is not read. Every ``class_path`` is checked to be an ``nn.Module`` subclass before
    anything is instantiated (nested ones by jsonargparse's typed parsing, as for a ``-c`` config).

    Raises:
        UntrustedClassError: for a ``class_path`` that does not import or is not an ``nn.Module`` subclass.
        ValueError: when no class is known (no ``class_path``, ``cls`` nor ``default``).
    """
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    section = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(section, Mapping):
        raise ValueError(f"reference_config={path!r} has no `model:` section (keys: {sorted(config)})")
    section = copy.deepcopy(dict(section))
    from lightning.pytorch.cli import instantiate_module

    if "class_path" in section:
        cls = import_model_class(section["class_path"], "model.class_path") if "." in section["class_path"] else cls
        if cls is None:
            raise ValueError(f"reference_config={path!r}: give `model.class_path` as a dotted path")
        section = dict(section.get("init_args") or {})
    inner = section.get("model")
    if isinstance(inner, Mapping) and "class_path" in inner:
        inner = section["model"] = dict(inner)
        if "." in str(inner["class_path"]):
            import_model_class(inner["class_path"], "model.model.class_path")
        accepted = _init_params(inner["class_path"])
        fill = {k: v for k, v in linked.items() if accepted is None or k in accepted}
        inner["init_args"] = {**fill, **dict(inner.get("init_args") or {})}
        if "num_classes" in linked:
            section.setdefault("num_classes", linked["num_classes"])
    if cls is None:  # after every class_path in the file was type-checked
        if default is None:
            raise ValueError(f"reference_config={path!r}: its `model:` names no class_path; give reference_class")
        cls = default()
    return instantiate_module(cls, section)


def load_reference(
    pl_module: nn.Module,
    config: str | None,
    checkpoint: str | None,
    class_path: str | None,
    owner: str,
    trust: bool = False,
) -> nn.Module:
    """A reference model from a YAML ``config`` (with ``checkpoint`` weights, or freshly initialised with a warning)
    or from a Lightning ``checkpoint`` alone.

    The class is ``class_path``, else the class the config's ``model:`` or the checkpoint names
    (:func:`named_class`), else that of ``pl_module`` when it is a ``LightningModule`` (the reference is a model
    of the same task, e.g. a :class:`~pdelightning.task.ClassificationTask` under ``pdelightning fit``).

    Files are data: the checkpoint is loaded with ``weights_only=True`` unless ``trust`` (``trust_checkpoint``),
    and every class named is type-checked before it is called.

    Raises:
        UntrustedFileError: when the checkpoint holds a pickle global outside the allow-list.
        UntrustedClassError: when a class named is not an ``nn.Module`` subclass.
    """
    if config is not None and not Path(config).is_file():
        raise FileNotFoundError(f"reference_config={config!r} does not exist")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"reference_checkpoint={checkpoint!r} does not exist")
    cls = import_model_class(class_path) if class_path else None
    task_class = type(pl_module) if isinstance(pl_module, L.LightningModule) else None

    def default() -> type:
        named = named_class(checkpoint, trust) if checkpoint is not None else None
        if named is None and task_class is None:
            raise ValueError(
                f"{owner}: reference_config={config!r} holds the arguments of a class it does not name, and the "
                f"model under training ({type(pl_module).__name__}) is no LightningModule; give reference_class"
            )
        return named or task_class  # type: ignore[return-value]

    if config is not None:
        module = build_from_config(config, linked_values(pl_module), cls, default)
        if checkpoint is not None:
            ckpt = load_data_file(checkpoint, map_location="cpu", trust=trust)
            module.load_state_dict(ckpt.get("state_dict", ckpt))
        else:
            rank_zero_warn(
                f"{owner}: the reference built from {config!r} is freshly initialised (no reference_checkpoint given)"
            )
        return module
    hint = "also give reference_config (a YAML describing the architecture)"
    return load_reference_checkpoint(checkpoint, cls, hint, trust=trust, default=task_class)
