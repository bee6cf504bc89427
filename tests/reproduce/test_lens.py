"""The PDE lens of the reproduction: known answers of the eq. (20) fit and the Jacobian measurements, and the
section's comparison of eq. (21) with the measured norms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning_reproduce.lens import fit_values, jacobian_values, lens_values
from pdelightning_reproduce.probe import ProbeData
from pdelightning_reproduce.rules import MNIST_LAYERS
from pdelightning_reproduce.sections.lens import conservativeness, lens
from tests.reproduce.planted import Planter


def _probe(n: int = 12, size: int = 8) -> ProbeData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ProbeData(x, y, torch.arange(n), x, y, x, y, x, y, 3)


def _pde(**kw: object) -> PDEClassifier:
    torch.manual_seed(0)
    args = {
        "num_classes": 3,
        "d_model": 8,
        "n_layers": 3,
        "n_heads": 2,
        "d_ff": 8,
        "image_size": 8,
        "dt": 0.2,
        "diffusion_init": 0.3,
        "alpha_init": 0.7,
        "bottleneck_dim": None,
        **kw,
    }
    model = PDEClassifier(**args).eval()
    with torch.no_grad():  # distinct coefficients per step, so a fit cannot pass by returning the init
        for i, b in enumerate(model.blocks):
            b.alpha.fill_(0.5 + 0.25 * i)
    return model


def test_fit_recovers_the_pde_models_own_coefficients() -> None:
    model = _pde()
    v = fit_values(model, _probe(), "cpu")
    for i, b in enumerate(model.blocks):
        name = f"blocks.{i}"
        assert v["lens_D"][name] == pytest.approx(float(b.diffusion_coefficients().detach().mean()), rel=1e-4)
        assert v["lens_alpha"][name] == pytest.approx(float(b.alpha.detach()), rel=1e-4)
        assert v["lens_ffn_coef"][name] == pytest.approx(1.0, rel=1e-4)
        assert v["lens_r2"][name] > 0.9999


def test_fit_of_a_residual_transformer_gives_one_over_dt() -> None:
    torch.manual_seed(0)
    model = TransformerClassifier(num_classes=3, d_model=8, n_layers=4, n_heads=2, d_ff=8, image_size=8).eval()
    v = fit_values(model, _probe(), "cpu")
    for name in ("blocks.0", "blocks.3"):
        assert v["lens_alpha"][name] == pytest.approx(4.0, rel=1e-4)  # Δt = 1/L, u_{l+1} = u_l + A + F
        assert v["lens_ffn_coef"][name] == pytest.approx(4.0, rel=1e-4)
        assert abs(v["lens_D"][name]) < 1e-4 and v["lens_r2"][name] > 0.9999


def test_jacobian_norms_and_lyapunov_match_dense_jacobians() -> None:
    model = _pde(dt=0.5)
    pdata = _probe(n=3)
    v = jacobian_values(model, pdata, "cpu", n=3, block=4, n_iter=25)
    with torch.no_grad():
        u = model.hook_embed(model.embed(pdata.x)[0])
    norms = {i: [] for i in range(3)}
    minus = {i: [] for i in range(3)}
    ends = []
    for s in range(3):
        us = u[s : s + 1]
        total = torch.eye(us.numel())
        for i, b in enumerate(model.blocks):
            dense = jacobian(lambda z, b=b: b(z, None, z, z), us).reshape(us.numel(), us.numel())
            norms[i].append(float(torch.linalg.matrix_norm(dense, 2)))
            minus[i].append(float(torch.linalg.matrix_norm(dense - torch.eye(us.numel()), 2)))
            total = dense @ total
            with torch.no_grad():
                us = b(us, None, us, us)
        ends.append(math.log(float(torch.linalg.matrix_norm(total, 2))) / 3)
    for i in range(3):
        assert v["lens_jacobian_norm"][f"blocks.{i}"] == pytest.approx(np.mean(norms[i]), rel=1e-3)
        assert v["lens_jacobian_minus_identity"][f"blocks.{i}"] == pytest.approx(np.mean(minus[i]), rel=1e-3)
    assert v["lens_lyapunov"] == pytest.approx(np.mean(ends), abs=1e-3)
    assert 0.0 <= v["lens_jacobian_converged"] <= 1.0


def test_lens_refuses_models_whose_steps_read_u0() -> None:
    with pytest.raises(ValueError, match="forcing"):
        lens_values(_pde(forcing=True), _probe(), "cpu")


@pytest.mark.parametrize(("measured", "words"), [(2.0, "understates"), (0.05, "conservative here")])
def test_section_says_how_conservative_eq21_is(measured: float, words: str) -> None:
    p = Planter()
    n = len(MNIST_LAYERS)
    p.add("mnist_pde", "eq21", lambda s: np.full(n, 0.3), MNIST_LAYERS, noise=0.01)
    p.add("mnist_pde", "lens_jacobian_minus_identity", lambda s: np.full(n, 0.3 * measured), MNIST_LAYERS, noise=0.01)
    p.add("mnist_pde", "lens_jacobian_norm", lambda s: np.full(n, 1.0 + 0.3 * measured), MNIST_LAYERS, noise=0.01)
    p.add("mnist_pde", "lens_lyapunov", lambda s: 0.2, noise=0.01)
    p.add("mnist_pde", "lens_r2", lambda s: np.ones(n), MNIST_LAYERS)
    p.add("mnist_pde", "lens_dt", lambda s: 0.1)
    lines, ests = conservativeness(p.results())
    assert words in lines[0] and ests["ratio"].value == pytest.approx(measured, rel=0.1)
    sec = lens(p.results())
    assert sec is not None and sec.tables
    assert ("understates" in " ".join(sec.notes)) == (words == "understates")
    assert lens(Planter().results()) is None
