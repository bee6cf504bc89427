"""Finding the adapter of a model, and the targets it gives, with the user's glob patterns on top."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from pdelightning.adapters.base import ModelAdapter, find_attention, linear_weight, out_proj_of, value_weight_of
from pdelightning.adapters.families import BUILTIN_ADAPTERS
from pdelightning.adapters.huggingface import sublayers
from pdelightning.adapters.windowed import SwinAdapter
from pdelightning.models.protocol import AnalysisTargets, LayerTarget

_COMPILED_PREFIX = "_orig_mod."
_REGISTRY: list[type[ModelAdapter]] = [*BUILTIN_ADAPTERS, SwinAdapter]


class TargetNotFoundError(LookupError):
    """Raised when a callback cannot find the layers or attention modules it needs."""


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter for your own architecture (usable as a class decorator).

    Adapters are tried in descending ``priority`` (built-ins: protocol 100, TransformerLens 90, Swin 85, HuggingFace 80,
    timm 70, PyTorch 60, generic 10); give yours a priority above the family it specialises.

    Example::

        @register_adapter
        class MyAdapter(ModelAdapter):
            family, priority = "mine", 95

            @classmethod
            def detect(cls, module):
                return isinstance(module, MyTransformer)

            def targets(self):
                return AnalysisTargets(layers=[LayerTarget(f"layers.{i}", blk, attention=blk.attn)
                                               for i, blk in enumerate(self.model.layers)])
    """
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
        raise TypeError(f"register_adapter expects a ModelAdapter subclass, got {adapter!r}")
    if adapter not in _REGISTRY:
        _REGISTRY.append(adapter)
    return adapter


def registered_adapters() -> list[type[ModelAdapter]]:
    """The adapters in the order they are tried."""
    return sorted(_REGISTRY, key=lambda a: -a.priority)


def clean_name(name: str) -> str:
    """Strip ``torch.compile``'s ``_orig_mod.`` prefix (anywhere in the dotted path)."""
    return name.replace(_COMPILED_PREFIX, "")


def unwrap(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``d one (hooks on it fire when it is called directly)."""
    return getattr(module, "_orig_mod", module)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a dotted module-name glob: ``*`` matches one name segment, ``**`` any number of segments.

    Example::

        >>> bool(glob_to_regex("encoder.layers.*").match("encoder.layers.3"))
        True
        >>> bool(glob_to_regex("encoder.layers.*").match("encoder.layers.3.self_attn"))
        False
    """
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": "[^.]*", "?": "[^.]"}.get(part, re.escape(part)))
    return re.compile("^" + "".join(out) + "$")


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{clean name: module}`` of ``model``'s tree (root excluded)."""
    return {clean_name(n): m for n, m in model.named_modules() if n}


def match(modules: dict[str, nn.Module], pattern: str) -> list[tuple[str, nn.Module]]:
    """The modules whose names match the glob ``pattern``, in natural (depth) order."""
    rx = glob_to_regex(pattern)
    return sorted(((n, m) for n, m in modules.items() if rx.match(n)), key=lambda nm: _natural_key(nm[0]))


def describe(model: nn.Module, limit: int = 40) -> str:
    """The first ``limit`` module names and types of ``model``, for error messages."""
    names = [f"{n} ({type(m).__name__})" for n, m in named_modules(model).items()]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def find_adapter(root: nn.Module) -> ModelAdapter | None:
    """The adapter of the first (highest-priority) family found in ``root``'s tree, or ``None``.

    For each registered adapter in priority order, the modules of ``root`` are visited root first; the first module
    the adapter's :meth:`~ModelAdapter.detect` accepts is the model it serves.
    """
    root = unwrap(root)
    modules = [(clean_name(n), m) for n, m in root.named_modules()]
    for adapter in registered_adapters():
        for name, module in modules:
            if adapter.detect(module):
                return adapter(root, module, name)
    return None


def _glob_targets(root: nn.Module, layers: str, attention: str | None, base: AnalysisTargets | None) -> AnalysisTargets:
    modules = named_modules(root)
    matched = match(modules, layers)
    if not matched:
        raise TargetNotFoundError(f"layers={layers!r} matched no module. Modules seen: {describe(root)}")
    attn_matched = match(modules, attention) if attention else []
    if attention and len(attn_matched) != len(matched):
        raise TargetNotFoundError(
            f"attention={attention!r} matched {len(attn_matched)} modules ({[n for n, _ in attn_matched]}) but "
            f"layers={layers!r} matched {len(matched)} ({[n for n, _ in matched]}); they must pair up one attention "
            "module per layer"
        )
    out = []
    for i, (n, m) in enumerate(matched):
        attn = attn_matched[i][1] if attn_matched else find_attention(m)
        proj = out_proj_of(attn, m) if attn is not None else None
        attn_out, mlp_out = sublayers(m, attn)
        out.append(
            LayerTarget(
                name=n,
                module=m,
                attention=attn,
                out_proj=proj,
                block=m,
                attn_out=attn_out,
                mlp_out=mlp_out,
                w_o=(lambda p: lambda: linear_weight(p))(proj) if proj is not None else None,
                w_v=value_weight_of(attn) if attn is not None else None,
            )
        )
    if base is not None:
        return replace(base, layers=out)
    return AnalysisTargets(layers=out, embedding=matched[0][1], embedding_is_input=True, family="glob")


def resolve(
    root: nn.Module,
    layers: str | None = None,
    attention: str | None = None,
    embedding: str | None = None,
    need: Sequence[str] = ("layers",),
) -> tuple[ModelAdapter | None, AnalysisTargets]:
    """Find what to analyse in ``root``: ``(adapter, targets)``.

    The family adapter (:func:`find_adapter`) gives the targets; glob patterns, when given, replace its layers
    (``layers``/``attention``) or its embedding (``embedding``: the module whose *output* is ``u_0``).

    Args:
        root: the module the callback was given.
        layers: glob of the layer modules, e.g. ``"encoder.layers.*"``; ``*`` is one name segment.
        attention: glob of their attention modules, matched in depth order to the layers.
        embedding: name or glob of the module whose output is ``u_0``.
        need: what the caller requires: ``"layers"``, ``"attention"`` (every layer has one) and/or ``"embedding"``.

    Raises:
        TargetNotFoundError: naming what was looked for and what was found.
    """
    root = unwrap(root)
    adapter = find_adapter(root)
    targets = adapter.targets() if adapter is not None else None
    source = f"the {adapter.family} adapter ({type(adapter.model).__name__})" if adapter is not None else "no adapter"
    if layers is not None:
        targets = _glob_targets(root, layers, attention, targets)
        source = "glob patterns"
    elif attention is not None and targets is not None:
        found = match(named_modules(root), attention)
        if len(found) != len(targets.layers):
            raise TargetNotFoundError(
                f"attention={attention!r} matched {len(found)} modules but {source} found {len(targets.layers)} "
                "layers; give `layers` too"
            )
        targets = replace(
            targets, layers=[replace(t, attention=a) for t, (_, a) in zip(targets.layers, found, strict=True)]
        )
    if embedding is not None:
        found = match(named_modules(root), embedding)
        if not found:
            raise TargetNotFoundError(f"embedding={embedding!r} matched no module. Modules seen: {describe(root)}")
        base = targets if targets is not None else AnalysisTargets(layers=[])
        targets = replace(base, embedding=found[0][1], embedding_is_input=False)
    if targets is None:
        targets = AnalysisTargets(layers=[])
    families = ", ".join(a.family for a in registered_adapters())
    if "layers" in need and not targets.layers:
        raise TargetNotFoundError(
            f"{type(root).__name__} has no Transformer layers to analyse: no adapter recognised it (looked for: "
            f"{families}: analysis_targets(), TransformerLens hook names, a HuggingFace PreTrainedModel, a timm "
            "VisionTransformer, nn.TransformerEncoder/Decoder, or a list of >= 2 identical blocks), and no `layers` "
            f"glob was given (e.g. layers: 'encoder.layers.*'). Modules seen: {describe(root)}"
        )
    if "attention" in need:
        missing = [t.name for t in targets.layers if t.attention is None]
        if missing or not targets.layers:
            raise TargetNotFoundError(
                f"no attention module found for layers {missing or '(none found)'} (via {source}); give an "
                f"`attention` glob such as 'encoder.layers.*.self_attn'. Modules seen: {describe(root)}"
            )
    if "embedding" in need and targets.embedding is None:
        raise TargetNotFoundError(
            f"no input-embedding module found (via {source}); give an `embedding` name such as 'embed'. "
            f"Modules seen: {describe(root)}"
        )
    return adapter, targets
