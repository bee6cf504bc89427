"""One PDE step against eq. (20) written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pdelightning.models.pde import PDEStep


def attention_by_hand(step: PDEStep, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eqs. (9)-(11): per-head softmax(Q K^T / sqrt(d_k)) V over the valid keys, concatenated, times W^O."""
    attn = step.attn
    d, h = attn.d_model, attn.n_heads
    dk = d // h
    w, b = attn.in_proj.weight, attn.in_proj.bias
    q, k, v = (u @ w[i * d : (i + 1) * d].T + b[i * d : (i + 1) * d] for i in range(3))
    heads = []
    for head in range(h):
        c = slice(head * dk, (head + 1) * dk)
        s = (q[..., c] @ k[..., c].transpose(-1, -2) / math.sqrt(dk)).masked_fill(mask[:, None, :], -math.inf)
        heads.append(torch.softmax(s, -1) @ v[..., c])
    return torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias


def laplacian_dirichlet_by_hand(u: torch.Tensor, dx: float, length: int) -> torch.Tensor:
    """(u[i-1] - 2u[i] + u[i+1]) / dx² with u = 0 outside the first ``length`` positions, 0 beyond them."""
    out = torch.zeros_like(u)
    for i in range(length):
        left = u[:, i - 1] if i > 0 else torch.zeros_like(u[:, 0])
        right = u[:, i + 1] if i + 1 < length else torch.zeros_like(u[:, 0])
        out[:, i] = (left - 2 * u[:, i] + right) / dx**2
    return out


@pytest.mark.parametrize("forcing,coupling", [(False, False), (True, True)])
def test_euler_step_eq20(forcing: bool, coupling: bool) -> None:
    """u_{l+1} = u_l + Δt (D ∇²u + α A(u) + FFN(u) + g + C_in(u_{l-1}) - C_out(u_l)); padded positions frozen."""
    torch.manual_seed(0)
    kw = {"diffusion": "diagonal", "diffusion_init": 0.3, "alpha_init": 0.7, "boundary": "dirichlet"}
    step = PDEStep(8, 2, 16, 0.2, 0.5, **kw, forcing=forcing, coupling=coupling, norm="none", dropout=0.0).double()
    g = torch.Generator().manual_seed(1)
    u, u_prev, u0 = (torch.randn(1, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[False, False, False, True, True]])  # 3 valid tokens
    d = F.softplus(step.raw_diffusion)  # D_l = softplus(raw) >= 0, here 0.3 for every feature
    torch.testing.assert_close(d, torch.full((8,), 0.3, dtype=torch.float64))
    ffn = step.mlp[3](torch.relu(step.mlp[0](u)))
    rhs = d * laplacian_dirichlet_by_hand(u, 0.5, 3) + 0.7 * attention_by_hand(step, u, mask) + ffn
    if forcing:
        rhs = rhs + u0
    if coupling:
        rhs = rhs + step.c_in(u_prev) - step.c_out(u)
    rhs[:, 3:] = 0.0
    expected = u + 0.2 * rhs
    torch.testing.assert_close(step(u, mask, u_prev, u0), expected)
    assert torch.equal(step(u, mask, u_prev, u0)[:, 3:], u[:, 3:])  # padding is not updated
