"""Finding what to analyse in a model: the protocol, TransformerLens hook names, or glob patterns."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import replace

from torch import Tensor, nn

from pdelightning.models.protocol import AnalysisTargets, LayerTarget

_COMPILED_PREFIX = "_orig_mod."
_RESID_POST = re.compile(r"^(?P<prefix>(?:.*\.)?)blocks\.(?P<i>\d+)\.hook_resid_post$")


class TargetNotFoundError(LookupError):
    """Raised when a callback cannot find the layers or attention modules it needs."""


def clean_name(name: str) -> str:
    """Strip ``torch.compile``'s ``_orig_mod.`` prefix (anywhere in the dotted path)."""
    return name.replace(_COMPILED_PREFIX, "")


def unwrap(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``d one (hooks on it fire when it is called directly)."""
    return getattr(module, "_orig_mod", module)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def module_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``'s submodules, parameters and buffers that *shares* its other attributes.

    A LightningModule carries configuration objects (optimizer factories, hyperparameters) that need not,
    and sometimes cannot, be copied; sharing them keeps the copy cheap and safe. Take it before the
    strategy wraps the model: under DDP the parameters carry reducer hooks that cannot be copied.
    """
    module = unwrap(module)
    memo: dict[int, object] = {}
    for m in module.modules():
        for k, v in vars(m).items():
            if k not in _MODULE_INTERNALS and not isinstance(v, (nn.Module, Tensor)):
                memo[id(v)] = v
    return copy.deepcopy(module, memo)


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


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {clean_name(n): m for n, m in model.named_modules() if n}


def _match(modules: dict[str, nn.Module], pattern: str) -> list[tuple[str, nn.Module]]:
    rx = glob_to_regex(pattern)
    return sorted(((n, m) for n, m in modules.items() if rx.match(n)), key=lambda nm: _natural_key(nm[0]))


def _out_proj(attn: nn.Module | None) -> nn.Module | None:
    if attn is None:
        return None
    proj = getattr(attn, "out_proj", None)
    return proj if isinstance(proj, nn.Module) else None


def _value_weight(attn: nn.Module | None) -> Tensor | None:
    if attn is None:
        return None
    if hasattr(attn, "value_weight"):
        return attn.value_weight
    if isinstance(attn, nn.MultiheadAttention):
        if attn.in_proj_weight is not None:
            return attn.in_proj_weight[2 * attn.embed_dim :]
        return attn.v_proj_weight
    return None


def _describe(modules: dict[str, nn.Module], limit: int = 40) -> str:
    names = [f"{n} ({type(m).__name__})" for n, m in modules.items()]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def find_protocol(model: nn.Module) -> nn.Module | None:
    """The first module (``model`` itself, then its submodules) implementing ``analysis_targets()``."""
    for m in model.modules():
        m = unwrap(m)
        if callable(getattr(m, "analysis_targets", None)):
            return m
    return None


def resolve_targets(
    model: nn.Module,
    layers: str | None = None,
    attention: str | None = None,
    embedding: str | None = None,
    need: Sequence[str] = ("layers",),
) -> AnalysisTargets:
    """Find the layers (and attention modules) of ``model`` to analyse.

    Order: glob patterns when given (they override discovery); else the analysis protocol
    (:class:`~pdelightning.models.SupportsAnalysis`); else TransformerLens hook names
    (``blocks.{i}.hook_resid_post``, ``blocks.{i}.attn``, ``hook_embed``).

    Args:
        model: the module to search (usually the LightningModule).
        layers: glob for the layer modules, e.g. ``"encoder.layers.*"``; ``*`` is one name segment.
        attention: glob for their attention modules, e.g. ``"encoder.layers.*.self_attn"``; matched in
            depth order to the layers.
        embedding: name or glob of the module whose output is the input embedding ``u_0``.
        need: what the caller requires: ``"layers"``, ``"attention"`` (every layer has one) and/or
            ``"embedding"``.

    Raises:
        TargetNotFoundError: when nothing matches, naming what was looked for and the modules seen.
    """
    modules = _named_modules(model)
    source = ""
    targets: AnalysisTargets | None = None
    if layers is not None:
        matched = _match(modules, layers)
        if not matched:
            raise TargetNotFoundError(f"layers={layers!r} matched no module. Modules seen: {_describe(modules)}")
        attn_matched: list[tuple[str, nn.Module]] = _match(modules, attention) if attention else []
        if attention and len(attn_matched) != len(matched):
            raise TargetNotFoundError(
                f"attention={attention!r} matched {len(attn_matched)} modules "
                f"({[n for n, _ in attn_matched]}) but layers={layers!r} matched {len(matched)} "
                f"({[n for n, _ in matched]}); they must pair up one attention module per layer"
            )
        targets = AnalysisTargets(
            layers=[
                LayerTarget(
                    name=n,
                    module=m,
                    attention=attn_matched[i][1] if attn_matched else None,
                    out_proj=_out_proj(attn_matched[i][1]) if attn_matched else None,
                    value_weight=_value_weight(attn_matched[i][1]) if attn_matched else None,
                )
                for i, (n, m) in enumerate(matched)
            ]
        )
        source = "glob patterns"
    else:
        owner = find_protocol(model)
        if owner is not None:
            targets = owner.analysis_targets()
            source = f"analysis_targets() of {type(owner).__name__}"
        else:
            hooked = sorted(
                ((n, m) for n, m in modules.items() if _RESID_POST.match(n)), key=lambda nm: _natural_key(nm[0])
            )
            if hooked:
                layer_targets = []
                for n, m in hooked:
                    block = n[: -len(".hook_resid_post")]
                    attn = modules.get(f"{block}.attn")
                    layer_targets.append(
                        LayerTarget(
                            name=block,
                            module=m,
                            attention=attn,
                            out_proj=_out_proj(attn),
                            value_weight=_value_weight(attn),
                        )
                    )
                prefix = _RESID_POST.match(hooked[0][0]).group("prefix")  # type: ignore[union-attr]
                targets = AnalysisTargets(layers=layer_targets, embedding=modules.get(f"{prefix}hook_embed"))
                source = "TransformerLens hook names"
    if (targets is None or not targets.layers) and "layers" not in need:
        targets = AnalysisTargets(layers=[], embedding=targets.embedding if targets is not None else None)
    if targets is None or (not targets.layers and "layers" in need):
        raise TargetNotFoundError(
            f"{type(model).__name__} has no layers to analyse: it does not implement analysis_targets(), has no "
            f"TransformerLens hook points (blocks.<i>.hook_resid_post), and no `layers` glob was given "
            f"(e.g. layers: 'encoder.layers.*', attention: 'encoder.layers.*.self_attn'). "
            f"Modules seen: {_describe(modules)}"
        )
    if embedding is not None:
        found = _match(modules, embedding)
        if not found:
            raise TargetNotFoundError(f"embedding={embedding!r} matched no module. Modules seen: {_describe(modules)}")
        targets = replace(targets, embedding=found[0][1])
    if "attention" in need:
        missing = [t.name for t in targets.layers if t.attention is None]
        if missing:
            raise TargetNotFoundError(
                f"no attention module found for layers {missing} (found via {source}); give an `attention` glob "
                f"such as 'encoder.layers.*.self_attn'. Modules seen: {_describe(modules)}"
            )
    if "embedding" in need and targets.embedding is None:
        raise TargetNotFoundError(
            f"no input-embedding module found (via {source}); give an `embedding` name such as 'embed'. "
            f"Modules seen: {_describe(modules)}"
        )
    return targets
