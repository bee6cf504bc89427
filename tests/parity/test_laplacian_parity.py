"""laplacian_1d against dense finite-difference matrices, one per boundary condition."""

from __future__ import annotations

import pytest
import torch

from pdelightning.analysis.laplacian import laplacian_1d


def dense_laplacian(t: int, dx: float, boundary: str) -> torch.Tensor:
    """The [t, t] three-point matrix: -2 on the diagonal, 1 beside it, the ghost cells folded in."""
    a = -2.0 * torch.eye(t, dtype=torch.float64) + torch.diag(torch.ones(t - 1), 1).double()
    a += torch.diag(torch.ones(t - 1), -1).double()
    if boundary == "neumann":  # ghost = its neighbour: the end rows get -1 on the diagonal
        a[0, 0] = a[-1, -1] = -1.0
    elif boundary == "periodic":  # the ends are neighbours
        a[0, -1] += 1.0
        a[-1, 0] += 1.0
    return a / dx**2  # dirichlet: ghost = 0, nothing to fold in


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_against_the_dense_matrix(boundary: str) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    a = dense_laplacian(6, 0.5, boundary)
    torch.testing.assert_close(laplacian_1d(u, 0.5, boundary), torch.einsum("ij,bjd->bid", a, u))


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_padding_is_outside_the_domain(boundary: str) -> None:
    """A sequence of length 4 padded to 6 behaves as a length-4 domain; padded positions get 0."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[False] * 4 + [True] * 2])
    out = laplacian_1d(u, 1.0, boundary, mask)
    torch.testing.assert_close(out[0, :4], dense_laplacian(4, 1.0, boundary) @ u[0, :4])
    assert torch.equal(out[0, 4:], torch.zeros(2, 3, dtype=torch.float64))


def test_known_answer() -> None:
    u = (torch.arange(5, dtype=torch.float64) ** 2)[None, :, None]  # u = x², u'' = 2 in the interior
    lap = laplacian_1d(u, 1.0, "neumann")[0, :, 0]
    assert lap[1:-1].tolist() == [2.0, 2.0, 2.0]
    assert lap[0].item() == 1.0 and lap[-1].item() == 16 - 2 * 16 + 9  # ghost copies: (1 - 0) and (9 - 16)
