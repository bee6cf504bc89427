"""The paper's PDE variants (§3.1-3.4): the diffusion step against a numpy stencil, the linear steps against their
formula, shapes, the analysis protocol, and a few training steps on planted separable tasks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pdelightning.models import DiffusionPDEClassifier, DiffusionStep, LinearPDEClassifier, LinearStep


def numpy_diffusion(u: np.ndarray, d: np.ndarray, dt: float, dx: float, boundary: str) -> np.ndarray:
    """``u + Δt D (u[i-1] - 2u[i] + u[i+1]) / Δx²`` over axis 1 of ``[B, T, d]``, ghost cells by ``boundary``."""
    if boundary == "dirichlet":
        pad = np.pad(u, ((0, 0), (1, 1), (0, 0)))  # zeros outside
    elif boundary == "neumann":
        pad = np.pad(u, ((0, 0), (1, 1), (0, 0)), mode="edge")  # the ghost copies its neighbour
    else:
        pad = np.pad(u, ((0, 0), (1, 1), (0, 0)), mode="wrap")
    lap = (pad[:, :-2] - 2 * u + pad[:, 2:]) / dx**2
    return u + dt * d * lap


def _step(boundary: str, d_model: int = 3, learn: bool = True, shape: str = "diagonal") -> DiffusionStep:
    return DiffusionStep(
        d_model, dt=0.3, dx=0.5, diffusion=shape, diffusion_init=0.2, learn_diffusion=learn, boundary=boundary
    )


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_diffusion_step_equals_the_numpy_stencil(boundary: str) -> None:
    step = _step(boundary)
    with torch.no_grad():
        step.raw_diffusion.copy_(torch.tensor([0.1, 0.5, 1.0]))
    d = F.softplus(torch.tensor([0.1, 0.5, 1.0])).numpy()
    u = torch.randn(2, 6, 3, dtype=torch.float64).float()
    got = step(u, None, u, u).detach().numpy()
    np.testing.assert_allclose(got, numpy_diffusion(u.numpy(), d, 0.3, 0.5, boundary), rtol=1e-5, atol=1e-6)


def test_diffusion_step_by_hand() -> None:
    # u = [1, 2, 4], D = 0.2 fixed, dt = 0.3, dx = 0.5 (1/dx² = 4), Dirichlet: ∇²u = [0, 4, -24]
    # u' = u + 0.06 ∇²u = [1, 2.24, 2.56]
    step = _step("dirichlet", d_model=1, learn=False, shape="scalar")
    u = torch.tensor([[[1.0], [2.0], [4.0]]])
    torch.testing.assert_close(step(u, None, u, u)[0, :, 0], torch.tensor([1.0, 2.24, 2.56]))
    assert not list(step.parameters()) and step.step_params().alpha == 0.0


def test_diffusion_padding_is_outside_the_domain() -> None:
    step = _step("dirichlet")
    u = torch.randn(1, 5, 3)
    mask = torch.tensor([[False, False, False, True, True]])
    out = step(u, mask, u, u)
    torch.testing.assert_close(out[:, 3:], u[:, 3:])  # padded positions are not updated
    torch.testing.assert_close(out[:, :3], step(u[:, :3], None, u, u))  # the valid part is the 3-token sequence


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_mixing_matrix_is_the_step(boundary: str) -> None:
    step = _step(boundary)
    u = torch.randn(2, 7, 3)
    m = step.mixing_matrix(7)  # [d, T, T]
    expected = torch.einsum("ftj,bjf->btf", m, u)
    torch.testing.assert_close(step(u, None, u, u).detach(), expected)


def test_learned_diffusion_gets_a_gradient_and_fixed_does_not_train() -> None:
    learned, fixed = _step("neumann"), _step("neumann", learn=False)
    u = torch.randn(2, 6, 3)
    learned(u, None, u, u).pow(2).sum().backward()
    assert learned.raw_diffusion.grad is not None and learned.raw_diffusion.grad.abs().sum() > 0
    torch.testing.assert_close(fixed.diffusion_coefficients(), torch.full((3,), 0.2))
    with torch.no_grad():
        learned.raw_diffusion.fill_(3.0)
    learned.reset_parameters()
    torch.testing.assert_close(learned.diffusion_coefficients(), torch.full((3,), 0.2))


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_linear_step_is_an_euler_step_of_its_linear_layer(activation: str) -> None:
    step = LinearStep(4, dt=0.25, activation=activation, dropout=0.0)
    u = torch.randn(2, 5, 4)
    f = u @ step.linear.weight.T + step.linear.bias
    f = f.clamp_min(0) if activation == "relu" else f
    torch.testing.assert_close(step(u, None, u, u), u + 0.25 * f)
    mask = torch.tensor([[False, False, True, True, True], [False] * 5])
    out = step(u, mask, u, u)
    torch.testing.assert_close(out[0, 2:], u[0, 2:])  # padding untouched
    torch.testing.assert_close(out[1], (u + 0.25 * f)[1])


def test_shapes_and_analysis_protocol() -> None:
    diff = DiffusionPDEClassifier(num_classes=10, d_model=16, n_layers=3, image_size=8, final_norm=True)
    logits, kl = diff(torch.rand(5, 8, 8), return_kl=True)
    assert logits.shape == (5, 10) and kl.shape == ()
    lin = LinearPDEClassifier(num_classes=4, d_model=8, n_layers=2, vocab_size=30, max_len=10, bottleneck_dim=None)
    x = torch.randint(1, 30, (3, 10))
    x[0, 6:] = 0  # padding
    assert lin(x).shape == (3, 4)
    for model, n in ((diff, 3), (lin, 2)):
        targets = model.analysis_targets()
        assert [t.name for t in targets.layers] == [f"blocks.{i}" for i in range(n)]
        assert targets.family == "ours" and targets.embedding is model.hook_embed
        assert all(t.attention is None and t.out_proj is None for t in targets.layers)
        assert all(t.module is model.blocks[i].hook_resid_post for i, t in enumerate(targets.layers))
    assert diff.analysis_targets().layers[0].pde.dt == 0.1
    assert lin.analysis_targets().layers[0].pde is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dt": 0.0}, "dt=0.0"),
        ({"dx": -1.0}, "dx=-1.0"),
        ({"diffusion_init": 0.0}, "diffusion_init"),
        ({"diffusion": "full"}, "diffusion='full' is not one of"),
        ({"boundary": "open"}, "boundary='open' is not one of"),
        ({"n_layers": 0}, "n_layers=0"),
    ],
)
def test_diffusion_classifier_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiffusionPDEClassifier(image_size=8, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "gelu"}, "activation='gelu' is not one of"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dt": -0.1}, "dt=-0.1"),
    ],
)
def test_linear_classifier_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinearPDEClassifier(vocab_size=10, **kwargs)


def _train(model: torch.nn.Module, x: Tensor, y: Tensor, steps: int = 40, lr: float = 1e-2) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return first, float(F.cross_entropy(model(x), y))


def test_diffusion_model_learns_a_planted_separable_task() -> None:
    # class 0: bright left half of every row, class 1: bright right half (visible to the row-mean the model pools)
    torch.manual_seed(0)
    y = torch.arange(64) % 2
    x = 0.1 * torch.rand(64, 8, 8)
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    model = DiffusionPDEClassifier(num_classes=2, d_model=16, n_layers=3, image_size=8, bottleneck_dim=None)
    first, last = _train(model, x, y)
    assert last < 0.25 * first, (first, last)


@pytest.mark.parametrize("activation", ["relu", "none"])
def test_linear_models_learn_a_planted_separable_task(activation: str) -> None:
    # tokens 1-9 are neutral; a post of class c contains the token 10 + c somewhere
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randint(1, 10, (60, 12))
    x[torch.arange(60), torch.randint(0, 12, (60,))] = 10 + y
    x[::4, 9:] = 0  # some padding
    x[::4, 0] = 10 + y[::4]  # keep the planted token in the padded rows
    model = LinearPDEClassifier(
        num_classes=3, d_model=16, n_layers=2, activation=activation, vocab_size=13, max_len=12, bottleneck_dim=None
    )
    first, last = _train(model, x, y)
    assert last < 0.25 * first, (first, last)
