r"""The three-point Laplacian along the token axis, the diffusion term ``D ∇²u`` of eq. (20).

Pure math on tensors, shared by the PDE model (:class:`~pdelightning.models.PDEStep` takes one explicit Euler
step with it) and the least-squares fit of a layer's update to that step (:mod:`pdelightning.analysis.pde_fit`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pdelightning._checks import check_choice

BoundaryCondition = Literal["dirichlet", "neumann", "periodic"]
BOUNDARY_CONDITIONS = ("dirichlet", "neumann", "periodic")


def laplacian_1d(u: Tensor, dx: float = 1.0, boundary: str = "dirichlet", padding_mask: Tensor | None = None) -> Tensor:
    r"""Three-point Laplacian along the token axis of ``u`` ``[B, T, d]``, as in eq. (20):

    ``(u(x+Δx) - 2u(x) + u(x-Δx)) / Δx²``, feature by feature.

    Boundary conditions act on ghost cells beyond the first and last *valid* token:

    * ``"dirichlet"``: ``u = 0`` outside the sequence, eq. (7).
    * ``"neumann"``: zero flux, the ghost cell copies its neighbour.
    * ``"periodic"``: the sequence wraps around (last valid token neighbours the first).

    Padded positions (``padding_mask`` ``True``) lie outside the domain: they act as boundary for their
    valid neighbours and get a zero Laplacian. For ``"periodic"`` the padding must be at the end of each
    sequence (as our data modules produce it).

    Raises:
        ValueError: for an unknown ``boundary`` or ``dx <= 0``.

    Example::

        >>> u = torch.tensor([[[1.0], [2.0], [4.0]]])
        >>> laplacian_1d(u, boundary="dirichlet")[0, :, 0]
        tensor([ 0.,  1., -6.])
    """
    check_choice("boundary", boundary, BOUNDARY_CONDITIONS)
    if dx <= 0:
        raise ValueError(f"dx={dx} must be positive")
    if boundary == "periodic":
        if padding_mask is None:
            left, right = u.roll(1, dims=1), u.roll(-1, dims=1)
        else:
            T = u.shape[1]
            length = (~padding_mask).sum(1, keepdim=True).clamp_min(1)  # [B, 1]
            idx = torch.arange(T, device=u.device).expand_as(padding_mask)
            prev_idx = ((idx - 1) % length).unsqueeze(-1).expand_as(u)
            next_idx = ((idx + 1) % length).unsqueeze(-1).expand_as(u)
            left, right = u.gather(1, prev_idx), u.gather(1, next_idx)
    else:
        left = F.pad(u, (0, 0, 1, 0))[:, :-1]  # left[:, i] = u[:, i-1], zero ghost at i=0
        right = F.pad(u, (0, 0, 0, 1))[:, 1:]  # right[:, i] = u[:, i+1], zero ghost at i=T-1
        if boundary == "neumann" or padding_mask is not None:
            T = u.shape[1]
            outside_left = torch.zeros(u.shape[:2], dtype=torch.bool, device=u.device)
            outside_left[:, 0] = True
            outside_right = torch.zeros_like(outside_left)
            outside_right[:, T - 1] = True
            if padding_mask is not None:
                outside_left[:, 1:] |= padding_mask[:, :-1]
                outside_right[:, :-1] |= padding_mask[:, 1:]
            ghost = u if boundary == "neumann" else torch.zeros_like(u)
            left = torch.where(outside_left.unsqueeze(-1), ghost, left)
            right = torch.where(outside_right.unsqueeze(-1), ghost, right)
    lap = (left - 2.0 * u + right) / (dx * dx)
    if padding_mask is not None:
        lap = lap.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return lap
