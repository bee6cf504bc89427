"""Gradient and update norms per parameter group (paper §3.4, experiment 4).

:func:`tensor_norms` takes one fused ``torch._foreach_norm`` over many tensors; :func:`segment_norms` and
:func:`grouped_norms` combine them per group (a layer, the embedding, the head); :func:`update_ratio` is the
update-to-weight ratio of an optimizer step. :class:`~pdelightning.callbacks.GradientFlow` is the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
