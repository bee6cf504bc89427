"""The batch / forward contract: how a probe calls the user's model exactly the way training does.

A probe batch is whatever the validation ``DataLoader`` yields, collated, for the probe samples:

* a tuple/list ``(x, y)`` -> ``model(x)``; ``(x, mask, y)`` -> ``model(x, mask)`` (every element but the last
  is a positional input, the last is the labels); a bare tensor -> ``model(x)`` without labels;
* a dict (HuggingFace style: ``input_ids``, ``attention_mask``, ``pixel_values``, ``labels`` ...) -> the
  entries other than the labels (``labels``, ``label``, ``y``, ``target``, ``targets``) are passed as keyword
  arguments;
* these inputs go to the LightningModule's ``forward`` when it has one of its own that accepts them. A module
  without ``forward()`` (``training_step`` calls ``self.model(**batch)``: the most common way to wrap a HuggingFace
  model), or whose ``forward`` does not take the batch, is called through the sub-model its adapter recognised: the
  outermost module from its attribute (``self.model``) down to that model that takes the inputs (the HuggingFace
  model with its head, a timm model, the user's module around an ``nn.TransformerEncoder``). Labels are left out
  (the logits do not depend on them, and the probe computes its own per-sample losses), except for an
  encoder-decoder model given no ``decoder_input_ids``, which derives its decoder inputs from ``labels`` as in
  training;
* anything else, or a model that needs something special: define ``probe_forward(self, batch) -> logits`` on
  the LightningModule (and optionally ``probe_loss(self, batch, logits) -> [B]`` per-sample losses).

The output may be a tensor, a tuple (its first element), or a ``ModelOutput``/dict with ``logits``. The
per-sample loss is cross-entropy of the logits against the labels (mean over the labelled tokens of a sequence
for ``[B, T, V]`` logits, ``-100`` ignored), so the mean over a validation batch equals the usual validation
loss of a classifier. The padding mask comes from the batch (``attention_mask``: 1 = token; a boolean middle
element of a tuple: PyTorch's convention, ``True`` = padding) or from what the model itself receives (see the
adapters' ``padding``), never from a guessed ``pad_id``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

LABEL_KEYS = ("labels", "label", "y", "target", "targets")


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict, keeping the structure (and the mapping type)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, Mapping):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except Exception:
            return items
    return obj


def batch_size(batch: Any) -> int:
    """The number of samples: the leading size of the first tensor found."""
    found: list[int] = []

    def visit(t: Tensor) -> Tensor:
        if not found and t.dim() > 0:
            found.append(t.shape[0])
        return t

    map_tensors(batch, visit)
    if not found:
        raise ValueError(f"no tensor with a batch dimension in a probe batch of type {type(batch).__name__}")
    return found[0]


def take_rows(batch: Any, rows: Tensor | slice, size: int | None = None) -> Any:
    """The samples ``rows`` of a batch: every tensor whose leading size is the batch size is indexed."""
    n = batch_size(batch) if size is None else size
    return map_tensors(batch, lambda t: t[rows] if t.dim() > 0 and t.shape[0] == n else t)


def repeat_batch(batch: Any, k: int) -> Any:
    """``k`` copies of a batch stacked along the batch axis (copy ``j`` is rows ``j*B .. (j+1)*B - 1``)."""
    n = batch_size(batch)
    return map_tensors(batch, lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if t.dim() > 0 and t.shape[0] == n else t)


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
    """``(args, kwargs, labels)`` of a collated batch, by the rules in the module docstring.

    Example::

        >>> x, m, y = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.tensor([0, 1])
        >>> args, kwargs, labels = split_batch((x, m, y))
        >>> len(args), kwargs, labels.tolist()
        (2, {}, [0, 1])
        >>> split_batch({"input_ids": x, "labels": y})[1].keys()
        dict_keys(['input_ids'])
    """
    if isinstance(batch, Mapping):
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        kwargs = {k: v for k, v in batch.items() if k != label_key}
        return (), kwargs, (batch[label_key] if label_key is not None else None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return (batch[0],), {}, None
        return tuple(batch[:-1]), {}, batch[-1]
    return (batch,), {}, None


def valid_from_batch(batch: Any) -> Tensor | None:
    """The ``[B, T]`` valid-token mask a batch carries (``True`` = real token), or ``None``.

    A dict's ``attention_mask`` (HuggingFace: 1 = token); a tuple ``(x, mask, y)``'s middle element: a boolean mask
    is PyTorch's key padding mask (``True`` = padding), a float mask with ``-inf`` is additive, a 0/1 integer or float
    mask is HuggingFace's convention.

    Example::

        >>> valid_from_batch({"input_ids": torch.ones(1, 3), "attention_mask": torch.tensor([[1, 1, 0]])}).tolist()
        [[True, True, False]]
        >>> valid_from_batch((torch.ones(1, 3), torch.tensor([[False, True, True]]), torch.tensor([0]))).tolist()
        [[True, False, False]]
    """
    mask: Any = None
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            return mask != 0
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        mask = batch[1]
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if mask.dtype.is_floating_point and bool(torch.isinf(mask).any()):
        return mask == 0
    return mask != 0


def extract_logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, a tuple's first element, or ``.logits`` / ``["logits"]``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: expected a tensor, a tuple starting "
        "with one, or an output with `.logits`; define probe_forward(batch) -> logits on your LightningModule"
    )


def _binds(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether ``fn(*args, **kwargs)`` matches ``fn``'s signature (checked without calling it)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _only_var(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes nothing but ``*args`` / ``**kwargs`` (a pass-through that may not be meant for a batch)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in params)


def forward_implemented(module: nn.Module) -> bool:
    """Whether ``module``'s class defines a ``forward`` of its own (not ``nn.Module``'s or ``LightningModule``'s
    inherited placeholder, which raises for any input).

    Example::

        >>> forward_implemented(nn.Linear(2, 2)), forward_implemented(nn.ModuleList())
        (True, False)
    """
    fwd = getattr(type(eager(module)), "forward", None)
    if fwd is None or fwd is nn.Module.forward or getattr(fwd, "__name__", "") == "_forward_unimplemented":
        return False
    lightning = sys.modules.get("lightning.pytorch")
    return lightning is None or fwd is not lightning.LightningModule.forward


_CHAINS: weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[nn.Module]]] = weakref.WeakKeyDictionary()
_TOLD: set[tuple[type, str]] = set()


def _chain(root: nn.Module) -> list[nn.Module]:
    """The modules from ``root``'s child down to the model its adapter recognised (outermost first); without an
    adapter (or when it recognised ``root`` itself), ``root``'s only child that owns parameters, if there is one.
    """
    cached = _CHAINS.get(root)
    if cached is not None:
        chain = [r() for r in cached]
        if all(m is not None for m in chain) and (not chain or any(c is chain[0] for c in root.children())):
            return chain  # type: ignore[return-value]
    from pdelightning.adapters.registry import find_adapter  # the adapters import nothing from probing

    adapter = find_adapter(root)
    name = next((n for n, m in root.named_modules() if adapter is not None and m is adapter.model and n), None)
    chain = []
    if name is not None:
        module = root
        for part in name.split("."):
            module = getattr(module, part)
            chain.append(module)
    else:
        owners = [c for c in root.children() if next(c.parameters(), None) is not None]
        chain = owners[:1] if len(owners) == 1 else []
    _CHAINS[root] = [weakref.ref(m) for m in chain]
    return chain


def _keyword_inputs(model: nn.Module, batch: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs of a wrapped model: the batch without its labels, except for an encoder-decoder model given
    no decoder inputs, which derives them from the labels (T5, BART: ``labels`` shifted right), as in training.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch or "labels" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if (
        "labels" in params
        and "decoder_input_ids" in params
        and not kwargs.keys() & {"decoder_input_ids", "decoder_inputs_embeds"}
    ):
        return {**kwargs, "labels": batch["labels"]}
    return kwargs


def wrapped_model(
    pl_module: nn.Module, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, batch: Any = None
) -> nn.Module | None:
    """The sub-model a probe calls when ``pl_module`` has no usable ``forward`` (see :func:`call_model`).

    Of the modules from ``pl_module``'s attribute (``self.model``) down to the model the adapter recognised (a
    HuggingFace ``PreTrainedModel``, a timm model, an ``nn.TransformerEncoder`` ...), the outermost whose ``forward``
    is implemented and accepts ``(*args, **kwargs)`` (or, given the dict ``batch``, the whole batch, labels included:
    a wrapper whose ``forward`` requires them): the whole wrapped model (with its head) when ``training_step`` calls
    ``self.model(...)``. ``None`` when there is none.
    """
    picked = _pick(pl_module, args, kwargs or {}, batch)
    return picked[0] if picked is not None else None


def _pick(
    pl_module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], batch: Any
) -> tuple[nn.Module, dict[str, Any]] | None:
    """``(sub-model, keyword inputs)`` of :func:`wrapped_model`."""
    for module in _chain(eager(pl_module)):
        if not forward_implemented(module):
            continue
        if _binds(module.forward, args, kwargs):
            return module, _keyword_inputs(module, batch, dict(kwargs))
        if isinstance(batch, Mapping) and not args and _binds(module.forward, (), batch):
            return module, dict(batch)
    return None


def uncallable(pl_module: nn.Module) -> str | None:
    """Why a probe could never call ``pl_module`` (checked at setup), or ``None`` when it can.

    It can when it defines ``probe_forward`` or a ``forward`` of its own, or when :func:`wrapped_model` has a sub-model
    with a ``forward`` to fall back on (whether that takes the batch is only known with a batch).
    """
    if callable(getattr(pl_module, "probe_forward", None)) or forward_implemented(pl_module):
        return None
    root = eager(pl_module)
    if any(forward_implemented(m) for m in _chain(root)):
        return None
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in root.named_children()) or "none"
    return (
        f"{type(root).__name__} defines no forward() and no probe_forward(), and has no sub-model a probe could call "
        "instead (looked for the model its adapter recognised, or a single child module that owns parameters; "
        f"children: {children}); define forward() or probe_forward(self, batch) -> logits on it"
    )


def eager(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``d one."""
    return getattr(module, "_orig_mod", module)


def call_model(pl_module: nn.Module, batch: Any) -> Any:
    """One forward of the user's model on a probe batch, by the contract in the module docstring (eager mode).

    ``probe_forward(batch)`` when the module defines it; else ``pl_module(*args, **kwargs)`` when its ``forward`` is
    implemented and accepts the batch's inputs; else (no ``forward()`` of its own, as in a LightningModule whose
    ``training_step`` calls ``self.model(**batch)``; a ``forward`` whose signature does not take the batch; or a
    ``*args/**kwargs``-only ``forward`` that raises ``NotImplementedError``) the sub-model of :func:`wrapped_model`
    with the same inputs, said once per class.

    Raises:
        TypeError: when there is no usable ``forward`` and no wrapped model that takes the batch.
    """
    stance = getattr(torch.compiler, "set_stance", None)
    ctx = stance("force_eager") if stance is not None else contextlib.nullcontext()
    with ctx:
        hook = getattr(pl_module, "probe_forward", None)
        if callable(hook):
            return hook(batch)
        args, kwargs, _ = split_batch(batch)
        own = forward_implemented(pl_module)
        if own and _binds(pl_module.forward, args, kwargs):
            try:
                return pl_module(*args, **kwargs)
            except NotImplementedError:
                if not _only_var(pl_module.forward):
                    raise
        picked = _pick(pl_module, args, kwargs, batch)
        cls = type(eager(pl_module))
        if picked is None:
            what = f"keyword inputs {sorted(kwargs)}" if kwargs else f"{len(args)} positional input(s)"
            why = (
                "defines no forward()" if not own else f"forward{inspect.signature(pl_module.forward)} does not take it"
            )
            raise TypeError(
                f"pdelightning cannot call {cls.__name__} on a probe batch ({what}): it {why}, and no sub-model that "
                "takes the batch was found (looked for the model its adapter recognised, or a single child module). "
                "Define forward() or probe_forward(self, batch) -> logits on it"
            )
        inner, inputs = picked
        if (cls, type(inner).__name__) not in _TOLD:
            _TOLD.add((cls, type(inner).__name__))
            name = next((n for n, m in eager(pl_module).named_modules() if m is inner), "?")
            why = "defines no forward()" if not own else "forward() does not take the batch"
            rank_zero_info(
                f"pdelightning: {cls.__name__} {why}; probes call its `{name}` ({type(inner).__name__}) with the "
                "batch, as training_step does. Define probe_forward(self, batch) -> logits to choose otherwise"
            )
        return inner(*args, **inputs)


def per_sample_loss(pl_module: nn.Module, batch: Any, logits: Tensor, labels: Tensor | None) -> Tensor | None:
    """Per-sample losses ``[B]``: ``probe_loss(batch, logits)`` if the module defines it, else cross-entropy.

    ``[B, C]`` logits with integer labels: cross-entropy per sample. ``[B, T, V]`` logits with ``[B, T]`` labels: the
    mean token cross-entropy of each sample over labelled tokens (``-100`` ignored). Float labels of the logits'
    shape: squared error per sample. ``None`` when there are no labels.
    """
    hook = getattr(pl_module, "probe_loss", None)
    if callable(hook):
        loss = hook(batch, logits)
        if not isinstance(loss, Tensor) or loss.dim() != 1:
            raise ValueError(
                f"probe_loss must return per-sample losses [B], got {getattr(loss, 'shape', type(loss).__name__)}"
            )
        return loss.float()
    if labels is None:
        return None
    logits = logits.float()
    if labels.dtype.is_floating_point:
        return (logits - labels.float().reshape(logits.shape)).pow(2).flatten(1).mean(1)
    if logits.dim() == 3 and labels.dim() == 2:
        token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        keep = (labels != -100).float()
        return (token * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    return F.cross_entropy(logits, labels.long(), reduction="none")


def labels_of(batch: Any) -> Tensor | None:
    """The labels of a batch (see :func:`split_batch`)."""
    return split_batch(batch)[2]


def _primary_path(batch: Any) -> tuple[str, Any] | None:
    """Where a batch's main input is: ``("arg", 0)`` for tuples, ``("kw", name)`` for dicts, ``None`` if unknown."""
    args, kwargs, _ = split_batch(batch)
    if args and isinstance(args[0], Tensor):
        return ("arg", 0)
    for name in ("pixel_values", "input_ids", "inputs_embeds", "x", "input", "inputs"):
        if isinstance(kwargs.get(name), Tensor):
            return ("kw", name)
    first = next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
    return ("kw", first) if first is not None else None


def primary_input(batch: Any) -> Tensor | None:
    """The main input tensor of a batch (what ``mode="input"`` perturbs)."""
    path = _primary_path(batch)
    if path is None:
        return None
    args, kwargs, _ = split_batch(batch)
    return args[path[1]] if path[0] == "arg" else kwargs[path[1]]


def with_primary_input(batch: Any, value: Tensor) -> Any:
    """The batch with its main input replaced by ``value`` (the structure kept)."""
    path = _primary_path(batch)
    assert path is not None
    if path[0] == "kw":
        out = dict(batch)
        out[path[1]] = value
        return out
    if isinstance(batch, Tensor):
        return value
    return type(batch)([value, *list(batch)[1:]])
