"""PDE model: the three-point Laplacian for each boundary condition and one explicit Euler step, eq. (20)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from pdelightning.models import PDEClassifier, PDEStep
from tests.models.test_attention import reference_attention

# ---------------------------------------------------------------- one Euler step, independent reference


def reference_laplacian(u: Tensor, dx: float, boundary: str, padding_mask: Tensor | None) -> Tensor:
    """Loop-by-loop three-point stencil; ghost cells beyond the first and last valid token."""
    B, T, _ = u.shape
    out = torch.zeros_like(u)
    for b in range(B):
        n = T if padding_mask is None else int((~padding_mask[b]).sum())
        for i in range(n):
            c = u[b, i]
            ghost_l = {"dirichlet": torch.zeros_like(c), "neumann": c, "periodic": u[b, n - 1]}[boundary]
            ghost_r = {"dirichlet": torch.zeros_like(c), "neumann": c, "periodic": u[b, 0]}[boundary]
            left = u[b, i - 1] if i > 0 else ghost_l
            right = u[b, i + 1] if i < n - 1 else ghost_r
            out[b, i] = (left - 2 * c + right) / dx**2
    return out


def reference_step(step: PDEStep, u: Tensor, mask: Tensor | None, u_prev: Tensor, u0: Tensor) -> Tensor:
    """u + dt (D Lap(u) + alpha A(u) + FFN(u) + g + C_in(u_prev) - C_out(u)), eq. (20), norm='none'."""
    lin1, lin2 = step.mlp[0], step.mlp[3]
    ffn = torch.clamp(u @ lin1.weight.T + lin1.bias, min=0) @ lin2.weight.T + lin2.bias  # eq. (13)
    rhs = step.alpha * reference_attention(step.attn, u, mask) + ffn
    if step.diffusion != "none":
        D = torch.log1p(torch.exp(step.raw_diffusion))  # softplus
        rhs = rhs + D * reference_laplacian(u, step.dx, step.boundary, mask)
    if step.forcing:
        rhs = rhs + u0
    if step.c_in is not None:
        rhs = rhs + (u_prev @ step.c_in.weight.T + step.c_in.bias) - (u @ step.c_out.weight.T + step.c_out.bias)
    new = u + step.dt * rhs
    if mask is not None:
        new = torch.where(mask[..., None], u, new)
    return new


def _step(**kw) -> PDEStep:
    args = dict(
        d_model=4, n_heads=1, d_ff=5, dt=0.1, dx=0.5, diffusion="diagonal", diffusion_init=0.3, alpha_init=0.7,
        boundary="dirichlet", forcing=False, coupling=False, norm="none", dropout=0.0,
    )  # fmt: skip
    args.update(kw)
    return PDEStep(**args).double()


def test_euler_step_fully_by_hand() -> None:
    """d=2, T=3: Q=K=0 (uniform attention), V=W^O=I, FFN = b_2, scalar D = 0.5, alpha = 2, dt = 0.5, dx = 2."""
    step = _step(d_model=2, d_ff=2, dt=0.5, dx=2.0, diffusion="scalar", diffusion_init=0.5, alpha_init=2.0)
    with torch.no_grad():
        for p in step.parameters():
            p.zero_()
        step.raw_diffusion.fill_(math.log(math.e**0.5 - 1))  # softplus^-1(0.5)
        step.alpha.fill_(2.0)
        step.attn.in_proj.weight[4:] = torch.eye(2)  # W_V
        step.attn.out_proj.weight.copy_(torch.eye(2))
        step.mlp[3].bias.copy_(torch.tensor([0.1, -0.1]))
    u = torch.tensor([[[1.0, -1.0], [2.0, 0.0], [4.0, 3.0]]], dtype=torch.float64)
    # Dirichlet Laplacian, 1/dx^2 = 1/4:
    #   feature 0: (0-2+2)/4 = 0, (1-4+4)/4 = 0.25, (2-8+0)/4 = -1.5
    #   feature 1: (0+2+0)/4 = 0.5, (-1-0+3)/4 = 0.5, (0-6+0)/4 = -1.5
    lap = [[0.0, 0.5], [0.25, 0.5], [-1.5, -1.5]]
    attn = [7 / 3, 2 / 3]  # uniform attention: the mean token
    ffn = [0.1, -0.1]
    expected = [
        [u[0, i, j].item() + 0.5 * (0.5 * lap[i][j] + 2.0 * attn[j] + ffn[j]) for j in range(2)] for i in range(3)
    ]
    out = step(u, None, u, u)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
@pytest.mark.parametrize(("forcing", "coupling"), [(False, False), (True, False), (False, True), (True, True)])
def test_euler_step_matches_reference(boundary: str, forcing: bool, coupling: bool) -> None:
    torch.manual_seed(0)
    step = _step(boundary=boundary, forcing=forcing, coupling=coupling).eval()
    with torch.no_grad():
        step.raw_diffusion.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0]))  # a different D per feature
        for p in (*step.attn.parameters(), *step.mlp.parameters()):
            p.normal_()
    u, u_prev, u0 = torch.randn(3, 3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True], [False, False, False, False, True]])
    for m in (None, mask):
        out = step(u, m, u_prev, u0)
        torch.testing.assert_close(out, reference_step(step, u, m, u_prev, u0))
    assert torch.equal(out[mask], u[mask])  # padded positions are not updated


def test_euler_step_without_diffusion() -> None:
    torch.manual_seed(0)
    step = _step(diffusion="none")
    assert step.raw_diffusion.numel() == 0
    u, u0 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(step(u, None, u0, u0), reference_step(step, u, None, u0, u0))


def test_pde_classifier_first_step_sees_u0_as_previous_layer() -> None:
    """``u_{l-1}`` of step 0 is ``u_0``; of step 1 it is ``u_0`` again (the input to step 0)."""
    torch.manual_seed(0)
    model = PDEClassifier(num_classes=3, d_model=4, n_layers=2, n_heads=1, d_ff=5, image_size=4, coupling=True)
    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, args, out: seen.append((args[0], args[2], out)))
    model(torch.rand(2, 4, 4))
    (u0, prev0, out0), (u1, prev1, _) = seen
    assert prev0 is u0 and u1 is out0 and prev1 is u0


# ---------------------------------------------------------------- parameters and argument checks


def test_diffusion_is_softplus_of_raw_and_nonnegative() -> None:
    step = _step(diffusion="diagonal", diffusion_init=0.3)
    torch.testing.assert_close(step.diffusion_coefficients(), torch.full((4,), 0.3, dtype=torch.float64))
    with torch.no_grad():
        step.raw_diffusion.fill_(-50.0)
    assert (step.diffusion_coefficients() >= 0).all()
    assert _step(diffusion="scalar").diffusion_coefficients().shape == (1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dt": 0.0}, r"dt=0.0 must be positive"),
        ({"dt": -0.1}, r"dt=-0.1 must be positive"),
        ({"dx": 0.0}, r"dx=0.0 must be positive"),
        ({"boundary": "robin"}, r"boundary='robin' is not one of \('dirichlet', 'neumann', 'periodic'\)"),
        ({"diffusion": "full"}, r"diffusion='full' is not one of \('diagonal', 'scalar', 'none'\)"),
        ({"diffusion_init": 0.0}, r"diffusion_init=0.0 must be positive when diffusion='diagonal'"),
        ({"norm": "rms"}, r"norm='rms' is not one of \('pre', 'post', 'none'\)"),
        ({"n_layers": 0}, r"n_layers=0 must be positive"),
        ({"d_model": 6, "n_heads": 4}, r"d_model=6 must be divisible by n_heads=4; valid n_heads .*\[1, 2, 3, 6\]"),
        ({"input_kind": "audio"}, r"input_kind='audio' is not one of \('image', 'tokens'\)"),
        ({"tokenization": "pixels"}, r"tokenization='pixels' is not one of \('rows', 'patches'\)"),
        ({"tokenization": "patches", "patch_size": 3}, r"patch_size=3 must be positive and divide image_size=8"),
        ({"num_classes": 1}, r"num_classes=1 must be at least 2"),
    ],
)
def test_pde_classifier_bad_arguments_raise(kwargs: dict, match: str) -> None:
    args = dict(num_classes=3, d_model=4, n_layers=1, n_heads=1, d_ff=4, image_size=8)
    with pytest.raises(ValueError, match=match):
        PDEClassifier(**(args | kwargs))


def test_norm_none_has_no_layernorm() -> None:
    model = PDEClassifier(num_classes=3, d_model=4, n_layers=2, n_heads=1, d_ff=4, image_size=8, norm="none")
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
