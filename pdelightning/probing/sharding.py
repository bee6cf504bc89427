"""Sharded parameters and gradients (FSDP2 ``fully_shard``, DTensor): what the analysis reads, and how.

Under FSDP2 every parameter of a sharded module is a ``DTensor`` that holds only its rank's shard; its gradient
likewise. The analysis touches them in three ways, each handled here:

* **Full weights** (StabilityMonitor's exact ``||W_O||_2`` and ``||W_O W_V||_2``, PDEFit's and JacobianStability's
  eq. (21) norm) are gathered with :func:`full` (``DTensor.full_tensor()``, a collective every rank runs), by
  :meth:`ProbeSession.full_weights <pdelightning.probing.session.ProbeSession.full_weights>` once per probe for all
  layers and shared by every callback, and only on probe steps. They live until the probe ends: two ``d x d``
  matrices per layer, on every rank, for the length of one probe.
* **Gradient norms** (GradientFlow) are reduced from the shards without gathering anything: each rank sums the
  squares (and absolute values) of its local shards, weighted by ``1 / replicas`` so that a replicated tensor counts
  once, and one ``all_reduce`` adds them up (:func:`sharded_sums`); the square root is taken after the sum.
* **Reference and null copies** of a sharded model (AttentionSimilarity) are sharded the same way as the model
  (:func:`shard_like`: ``fully_shard`` on the same submodules with the same mesh), so each rank holds its shard of
  each copy, not a full copy; their probe forwards gather layer by layer as the model's do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - a torch build without distributed support: nothing can be sharded this way
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2 ``fully_shard`` or tensor parallel)."""
    return any(is_dtensor(p) for p in module.parameters())


def full(t: Tensor | None) -> Tensor | None:
    """``t`` itself, or the full tensor of a ``DTensor`` (``full_tensor()``: a collective every rank must run)."""
    if t is not None and is_dtensor(t):
        return t.full_tensor()  # type: ignore[union-attr]
    return t


def local_part(t: Tensor) -> tuple[Tensor, float]:
    """``(local shard, weight)``: summing ``weight * f(shard)`` over every rank gives ``f`` of the whole tensor for an
    additive ``f`` (a sum of squares, of absolute values).

    A plain tensor in a sharded run is replicated on every rank (weight ``1 / world``); a ``DTensor`` counts once
    per replica along its mesh's ``Replicate`` dimensions.

    Raises:
        ValueError: for a ``Partial`` placement (a pending reduction: the shards do not add up to the tensor).
    """
    if not is_dtensor(t):
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return t, 1.0 / world
    replicas = 1
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Replicate):
            replicas *= t.device_mesh.size(dim)  # type: ignore[attr-defined]
        elif not isinstance(placement, Shard):
            raise ValueError(f"a DTensor with placement {placement} cannot be summed shard by shard")
    mesh_size = t.device_mesh.size()  # type: ignore[attr-defined]
    world = dist.get_world_size() if dist.is_initialized() else 1
    # ranks outside this tensor's mesh hold it as well (e.g. a mesh of a sub-group): count each copy once
    return t.to_local(), 1.0 / (replicas * max(world // max(mesh_size, 1), 1))  # type: ignore[attr-defined]


def sharded_sums(tensors: Sequence[Tensor], groups: Tensor, num_groups: int, device: torch.device) -> Tensor:
    """Per group, ``[sum of squares, sum of absolute values]`` of the whole tensors, from every rank's shards.

    Every rank must call this (one ``all_reduce``, sum). Returns ``[2, num_groups]`` float64: row 0 the sums of
    squares (the L2 norm is its square root, taken after the sum), row 1 the L1 norms.
    """
    out = torch.zeros(2, num_groups, dtype=torch.float64, device=device)
    for t, g in zip(tensors, groups.tolist(), strict=True):
        local, weight = local_part(t)
        flat = local.detach().reshape(-1).double()
        out[0, g] += weight * flat.square().sum().to(device)
        out[1, g] += weight * flat.abs().sum().to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out)
    return out


def shard_like(copy: nn.Module, model: nn.Module) -> nn.Module:
    """Shard ``copy`` (a plain deep copy of ``model`` taken before sharding) the way ``model`` is sharded.

    ``fully_shard`` is applied to the submodules of ``copy`` whose counterparts in ``model`` are FSDP modules, with
    the same mesh, innermost first. ``copy``'s own values are kept (each rank keeps its shard of them); load
    ``model``'s state afterwards for a snapshot. Nothing is done when ``model`` has no FSDP module.

    Raises:
        ValueError: when ``copy`` lacks one of ``model``'s sharded submodules.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = dict(copy.named_modules())
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    for name, unit in sorted(units, key=lambda nm: -nm[0].count(".") if nm[0] else 1):  # innermost first
        target = names.get(name)
        if target is None:
            raise ValueError(f"the copy has no submodule {name!r} to shard like the model's")
        mesh = next((p.device_mesh for p in unit.parameters() if is_dtensor(p)), None)
        fully_shard(target, mesh=mesh)
    return copy


def shard_copies(model: nn.Module, device: torch.device, *copies: nn.Module | None) -> None:
    """:func:`shard_like` each copy of ``model`` that is not sharded yet (``None`` skipped), on ``device``, frozen."""
    for copy in copies:
        if copy is not None and not is_sharded(copy):
            shard_like(copy.to(device), model)
            copy.eval()
            copy.requires_grad_(False)
