"""Gradient and update norms per parameter group (paper §3.4, experiment 4).

:func:`tensor_norms` takes one fused ``torch._foreach_norm`` over many tensors; :func:`segment_norms` and
:func:`grouped_norms` combine them per group (a layer, the embedding, the head); :func:`update_ratio` is the
update-to-weight ratio of an optimizer step. :func:`group_parameters` assigns every parameter to a layer (or the
embedding, head, other) and :func:`param_group_members` to its optimizer param group; :func:`gradient_norms`
gives the per-layer and per-param-group magnitudes of one step. :class:`~pdelightning.callbacks.GradientFlow` is the
adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

EMBEDDING, HEAD, OTHER = "embedding", "head", "other"


def tensor_norms(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """The norm of each tensor, from ONE fused ``torch._foreach_norm`` call: ``[len(tensors)]`` float32.

    Example::

        >>> tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0])], ord=1)
        tensor([7., 2.])
    """
    if ord not in (1, 2):
        raise ValueError(f"ord={ord} must be 1 or 2")
    if not tensors:
        return torch.zeros(0)
    return torch.stack([n.float() for n in torch._foreach_norm(list(tensors), ord)])


def segment_norms(norms: Tensor, groups: Tensor, num_groups: int, ord: float = 2.0) -> Tensor:
    """Combine per-tensor norms into per-group norms: ``sqrt(sum n_i²)`` for ``ord=2``, ``sum n_i`` for ``ord=1``.

    This is the norm of each group's tensors flattened into one vector; empty groups get ``0``.

    Example::

        >>> segment_norms(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0, 0, 2]), 3)
        tensor([5., 0., 1.])
    """
    values = norms.pow(2) if ord == 2 else norms
    out = torch.zeros(num_groups, device=norms.device).index_add_(0, groups.to(norms.device), values)
    return out.sqrt() if ord == 2 else out


def grouped_norms(tensors: Sequence[Tensor], groups: Tensor, num_groups: int, ord: float = 2.0) -> Tensor:
    """Norm of each group of tensors, as if each group's tensors were flattened into one vector.

    :func:`tensor_norms` (one fused ``torch._foreach_norm`` over all tensors) then :func:`segment_norms`.

    Args:
        tensors: the tensors (e.g. gradients), any shapes, on one device.
        groups: ``[len(tensors)]`` long, the group index of each tensor.
        num_groups: number of groups.
        ord: ``2`` (Euclidean) or ``1`` (sum of absolute values).

    Returns:
        ``[num_groups]`` float32 norms.

    Raises:
        ValueError: for another ``ord``.

    Example::

        >>> grads = [torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([-2.0, 2.0])]
        >>> grouped_norms(grads, torch.tensor([0, 0, 1]), 2)
        tensor([5.0000, 2.8284])
        >>> grouped_norms([torch.tensor([3.0]), torch.tensor([-2.0, 2.0])], torch.tensor([0, 0]), 1, ord=1)
        tensor([7.])
    """
    norms = tensor_norms(tensors, ord)
    if not len(norms):
        return torch.zeros(num_groups)
    return segment_norms(norms, groups, num_groups, ord)


def update_ratio(before: Sequence[Tensor], after: Sequence[Tensor], groups: Tensor, num_groups: int) -> Tensor:
    """``||θ_after - θ_before|| / ||θ_before||`` per group (the update-to-weight ratio of one optimizer step).

    Example::

        >>> update_ratio([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 4.5])], torch.tensor([0]), 1)
        tensor([0.1000])
    """
    delta = torch._foreach_sub(list(after), list(before))
    return grouped_norms(delta, groups, num_groups) / grouped_norms(before, groups, num_groups).clamp_min(1e-30)


def gradient_norms(
    grads: Sequence[Tensor], groups: Tensor, num_groups: int, members: Tensor, member_groups: Tensor, num_members: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-layer L2 and L1 gradient norms and per-param-group L2 norms of one step, from ONE fused norm call.

    The paper's "average gradient magnitude" of a layer (section 3.4) is its L1 norm over its number of entries.

    Args:
        grads: the gradients, any shapes, on one device.
        groups: ``[len(grads)]`` long, the layer group of each gradient.
        num_groups: number of layer groups.
        members: long positions in ``grads`` of the gradients that belong to an optimizer param group.
        member_groups: the param group of each of ``members``.
        num_members: number of param groups.

    Returns:
        ``(l2, l1, param_group_l2)``: ``[num_groups]``, ``[num_groups]``, ``[num_members]``.

    Example::

        >>> g = [torch.tensor([3.0, -4.0]), torch.tensor([1.0])]
        >>> gradient_norms(g, torch.tensor([0, 1]), 2, torch.tensor([0, 1]), torch.tensor([0, 0]), 1)
        (tensor([5., 1.]), tensor([7., 1.]), tensor([5.0990]))
    """
    l2_each = tensor_norms(grads)  # serves the layers and the param groups
    l2 = segment_norms(l2_each, groups, num_groups)
    l1 = segment_norms(tensor_norms(grads, ord=1), groups, num_groups, ord=1)
    pg = segment_norms(l2_each[members.to(l2_each.device)], member_groups, num_members)
    return l2, l1, pg


def param_group_members(
    param_groups: Iterable[Mapping[str, Any]], params: Sequence[Tensor]
) -> tuple[list[int], Tensor, Tensor]:
    """The optimizer param groups that hold any of ``params``.

    Returns:
        ``(groups, members, index)``: the positions of those param groups in ``param_groups``, and for each of their
        parameters found in ``params`` its position there and its group's position in ``groups``.

    Example::

        >>> a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
        >>> param_group_members([{"params": [c]}, {"params": [b, a]}], [a, b])
        ([1], tensor([1, 0]), tensor([0, 0]))
    """
    where = {id(p): i for i, p in enumerate(params)}
    found: dict[int, list[int]] = {}
    for i, group in enumerate(param_groups):
        hits = [where[id(p)] for p in group["params"] if id(p) in where]
        if hits:
            found[i] = hits
    index = [k for k, hits in enumerate(found.values()) for _ in hits]
    flat = [m for hits in found.values() for m in hits]
    return list(found), torch.tensor(flat, dtype=torch.long), torch.tensor(index, dtype=torch.long)


@dataclass
class ParameterGroups:
    """Every trainable parameter of a module and its group (:func:`group_parameters`)."""

    names: list[str]  # group names: layers in depth order, then embedding / head / other (non-empty only)
    params: list[nn.Parameter]  # every trainable parameter of the module, in registration order
    index: list[int]  # group of each parameter


def _block_of(target_module: nn.Module, parents: dict[int, nn.Module], all_targets: set[int]) -> nn.Module:
    """The module whose parameters make up a layer.

    The layer module itself if it has parameters, else its parent (our ``hook_resid_post`` lives in its
    block), unless that parent also holds another layer.
    """
    if next(target_module.parameters(), None) is not None:
        return target_module
    parent = parents.get(id(target_module))
    if parent is None:
        return target_module
    if any(id(m) in all_targets for m in parent.modules() if m is not target_module):
        return target_module
    return parent


def group_parameters(
    module: nn.Module, layers: list[tuple[str, nn.Module]], embedding: nn.Module | None
) -> ParameterGroups:
    """Assign every trainable parameter of ``module`` to one group.

    A layer's group is the parameters of its block (see :func:`_block_of`). The remaining parameters go to
    ``"embedding"`` (the embedding module's own parameters, and any registered before the first layer's),
    ``"head"`` (registered after the last layer's) or ``"other"`` (in between). Empty groups are dropped.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
        >>> group_parameters(net, [("1", net[1])], None).names
        ['1', 'embedding', 'head']
    """
    parents = {id(child): m for m in module.modules() for child in m.children()}
    target_ids = {id(m) for _, m in layers}
    owner: dict[int, str] = {}
    for name, layer in layers:
        for p in _block_of(layer, parents, target_ids).parameters():
            owner.setdefault(id(p), name)
    if embedding is not None:
        for p in embedding.parameters():
            owner.setdefault(id(p), EMBEDDING)
    params = [p for p in module.parameters() if p.requires_grad]
    layer_names = {name for name, _ in layers}
    positions = [i for i, p in enumerate(params) if owner.get(id(p)) in layer_names]
    first, last = (positions[0], positions[-1]) if positions else (len(params), len(params))
    labels = []
    for i, p in enumerate(params):
        label = owner.get(id(p))
        labels.append(label if label is not None else (EMBEDDING if i < first else HEAD if i > last else OTHER))
    names = [n for n, _ in layers if n in labels] + [n for n in (EMBEDDING, HEAD, OTHER) if n in labels]
    slot = {n: i for i, n in enumerate(names)}
    return ParameterGroups(names, params, [slot[label] for label in labels])
