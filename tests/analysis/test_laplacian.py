"""The three-point Laplacian along tokens, eq. (20), for each boundary condition: known values by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pdelightning.analysis.laplacian import laplacian_1d

# ---------------------------------------------------------------- Laplacian, known values

# u = [1, 2, 4, 7] (feature 0) and -10 u (feature 1), dx = 0.5 so 1/dx^2 = 4:
#   interior: (1 - 4 + 4) * 4 = 4, (2 - 8 + 7) * 4 = 4
#   dirichlet ghosts 0:        (0 - 2 + 2) * 4 = 0,   (4 - 14 + 0) * 4 = -40
#   neumann ghost = neighbour: (1 - 2 + 2) * 4 = 4,   (4 - 14 + 7) * 4 = -12
#   periodic wraps:            (7 - 2 + 2) * 4 = 28,  (4 - 14 + 1) * 4 = -36
FULL = {"dirichlet": [0.0, 4.0, 4.0, -40.0], "neumann": [4.0, 4.0, 4.0, -12.0], "periodic": [28.0, 4.0, 4.0, -36.0]}
# u = [1, 2, 4, pad, pad]: the last valid token (4) is the boundary
#   dirichlet: (0 - 2 + 2) * 4 = 0, 4, (2 - 8 + 0) * 4 = -24
#   neumann:   (1 - 2 + 2) * 4 = 4, 4, (2 - 8 + 4) * 4 = -8
#   periodic:  (4 - 2 + 2) * 4 = 16, 4, (2 - 8 + 1) * 4 = -20
PADDED = {
    "dirichlet": [0.0, 4.0, -24.0, 0.0, 0.0],
    "neumann": [4.0, 4.0, -8.0, 0.0, 0.0],
    "periodic": [16.0, 4.0, -20.0, 0.0, 0.0],
}


def _two_features(values: list[float]) -> Tensor:
    u = torch.tensor(values)
    return torch.stack([u, -10 * u], -1)[None]  # [1, T, 2]


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_laplacian_known_values(boundary: str) -> None:
    lap = laplacian_1d(_two_features([1.0, 2.0, 4.0, 7.0]), dx=0.5, boundary=boundary)
    torch.testing.assert_close(lap, _two_features(FULL[boundary]))


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_laplacian_padding_at_end_is_a_boundary(boundary: str) -> None:
    # the padded values (99, -5) must not leak into the valid tokens; row 1 has no padding
    u = torch.cat([_two_features([1.0, 2.0, 4.0, 99.0, -5.0]), _two_features([1.0, 2.0, 4.0, 7.0, 11.0])])
    mask = torch.tensor([[False, False, False, True, True], [False] * 5])
    lap = laplacian_1d(u, dx=0.5, boundary=boundary, padding_mask=mask)
    torch.testing.assert_close(lap[:1], _two_features(PADDED[boundary]))
    torch.testing.assert_close(lap[1:], laplacian_1d(u[1:], dx=0.5, boundary=boundary))


def test_laplacian_without_padding_mask_equals_all_false_mask() -> None:
    u = torch.randn(2, 6, 3)
    for boundary in ("dirichlet", "neumann", "periodic"):
        torch.testing.assert_close(
            laplacian_1d(u, 0.7, boundary), laplacian_1d(u, 0.7, boundary, torch.zeros(2, 6, dtype=torch.bool))
        )


def test_laplacian_bad_arguments_raise() -> None:
    u = torch.zeros(1, 3, 1)
    with pytest.raises(ValueError, match=r"boundary='robin' is not one of \('dirichlet', 'neumann', 'periodic'\)"):
        laplacian_1d(u, boundary="robin")
    with pytest.raises(ValueError, match=r"dx=0 must be positive"):
        laplacian_1d(u, dx=0)
