"""Known-answer tests for the eq. (20) least-squares fit (pdelightning.analysis.pde_fit)."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pdelightning.analysis import pde_fit
from pdelightning.analysis.laplacian import laplacian_1d
from pdelightning.analysis.pde_fit import (
    STAT_KEYS,
    add_pde_fit_statistics,
    fit_pde_layer,
    pde_fit_statistics,
    solve_pde_fit,
)
from pdelightning.analysis.stability import eq21_number
from pdelightning.models import PDEClassifier, TransformerClassifier


def capture_layers(model: nn.Module, x: Tensor) -> list[dict[str, Tensor]]:
    """Per block: u_l (hook_resid_pre), u_{l+1} (hook_resid_post), the attention module's and the MLP's outputs."""
    store: list[dict[str, Tensor]] = [{} for _ in model.blocks]
    handles = []
    for i, blk in enumerate(model.blocks):
        for key, mod in (("u_in", blk.hook_resid_pre), ("u_out", blk.hook_resid_post), ("attn", blk.attn),
                         ("mlp", blk.mlp)):  # fmt: skip
            handles.append(mod.register_forward_hook(lambda m, a, o, i=i, key=key: store[i].__setitem__(key, o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return store


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


def pde_model(diffusion: str = "diagonal", **kw) -> PDEClassifier:
    torch.manual_seed(0)
    model = PDEClassifier(num_classes=3, d_model=16, n_layers=3, n_heads=2, d_ff=24, dt=0.1, diffusion=diffusion,
                          dropout=0.0, norm="none", forcing=False, coupling=False, **kw).eval()  # fmt: skip
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            n = blk.raw_diffusion.numel()
            target = torch.linspace(0.05, 0.9, n) * (1 + 0.3 * i) if n > 1 else torch.tensor([0.4 + 0.2 * i])
            blk.raw_diffusion.copy_(_inverse_softplus(target[torch.randperm(n)]))
            blk.alpha.fill_([0.7, -0.4, 1.6][i])
    return model


def token_batch(vocab: int = 30, B: int = 24, T: int = 12) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T  # one full-length sequence
    valid = torch.arange(T)[None, :] < lengths[:, None]
    return x.masked_fill(~valid, 0), valid


def assert_recovers_pde(model: PDEClassifier, layers: list[dict[str, Tensor]], valid: Tensor | None, kind: str) -> None:
    for blk, cap in zip(model.blocks, layers, strict=True):
        res = fit_pde_layer(cap["u_in"], cap["u_out"], cap["attn"], cap["mlp"], valid, dt=blk.dt, dx=blk.dx,
                            boundary=blk.boundary, diffusion=kind)  # fmt: skip
        D_true = blk.diffusion_coefficients().detach().double().expand(model.d_model)
        torch.testing.assert_close(res.diffusion, D_true, rtol=0.01, atol=0.0)
        assert res.alpha == pytest.approx(float(blk.alpha.detach()), rel=0.01)
        assert res.ffn_coef == pytest.approx(1.0, rel=0.01)
        assert res.r2 >= 0.999
        assert res.n_positions == (valid.sum() if valid is not None else cap["u_in"].shape[0] * cap["u_in"].shape[1])


def test_recovers_pde_classifier_on_images() -> None:
    model = pde_model(image_size=8)
    x = torch.rand(32, 8, 8, generator=torch.Generator().manual_seed(2))
    assert_recovers_pde(model, capture_layers(model, x), None, "diagonal")


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann", "periodic"])
def test_recovers_pde_classifier_on_padded_tokens(boundary: str) -> None:
    model = pde_model(input_kind="tokens", vocab_size=30, max_len=12, boundary=boundary)
    x, valid = token_batch()
    assert_recovers_pde(model, capture_layers(model, x), valid, "diagonal")


def test_recovers_scalar_diffusion_and_eq21() -> None:
    model = pde_model(diffusion="scalar", image_size=8)
    layers = capture_layers(model, torch.rand(32, 8, 8, generator=torch.Generator().manual_seed(3)))
    assert_recovers_pde(model, layers, None, "scalar")
    blk, cap = model.blocks[2], layers[2]
    w_o = float(torch.linalg.matrix_norm(blk.attn.out_proj.weight.detach(), 2))
    res = fit_pde_layer(cap["u_in"], cap["u_out"], cap["attn"], cap["mlp"], dt=blk.dt, diffusion="scalar",
                        w_o_norm=w_o)  # fmt: skip
    p = blk.step_params()
    assert res.eq21 == pytest.approx(eq21_number(p.diffusion, p.alpha, p.dt, p.dx, w_o), rel=0.01)
    assert res.eq21 == eq21_number(res.diffusion, res.alpha, blk.dt, blk.dx, w_o)
    # a diagonal fit of a scalar-D model finds the same D in every feature
    diag = fit_pde_layer(cap["u_in"], cap["u_out"], cap["attn"], cap["mlp"], dt=blk.dt)
    torch.testing.assert_close(diag.diffusion, res.diffusion, rtol=0.01, atol=0.0)


def test_streamed_statistics_equal_one_batch() -> None:
    """Summing per-batch statistics (as over probe batches or DDP ranks) gives the one-batch fit."""
    model = pde_model(input_kind="tokens", vocab_size=30, max_len=12)
    x, valid = token_batch()
    cap = capture_layers(model, x)[1]
    kw = {"dt": 0.1, "boundary": "dirichlet"}
    whole = pde_fit_statistics(cap["u_in"], cap["u_out"], cap["attn"], cap["mlp"], valid, **kw)
    parts = [pde_fit_statistics(cap["u_in"][s], cap["u_out"][s], cap["attn"][s], cap["mlp"][s], valid[s], **kw)
             for s in (slice(0, 5), slice(5, 17), slice(17, None))]  # fmt: skip
    summed = add_pde_fit_statistics(*parts)
    assert set(summed) == set(STAT_KEYS)
    for k in STAT_KEYS:
        torch.testing.assert_close(summed[k], whole[k], rtol=1e-12, atol=1e-9)
    a, b = solve_pde_fit(summed), solve_pde_fit(whole)
    torch.testing.assert_close(a.diffusion, b.diffusion, rtol=1e-9, atol=1e-12)
    assert a.alpha == pytest.approx(b.alpha, rel=1e-9) and a.r2 == pytest.approx(b.r2, abs=1e-12)


@pytest.mark.parametrize("norm", ["none", "pre"])
def test_residual_transformer_gives_one_over_dt(norm: str) -> None:
    """u_{l+1} = u_l + A_l + F_l exactly, so with Δt = 1/L: α = c = 1/Δt = L, D = 0, R² = 1."""
    torch.manual_seed(0)
    L = 4
    model = TransformerClassifier(num_classes=3, d_model=16, n_layers=L, n_heads=2, d_ff=24, image_size=8,
                                  residual=True, norm=norm, dropout=0.0).eval()  # fmt: skip
    layers = capture_layers(model, torch.rand(32, 8, 8, generator=torch.Generator().manual_seed(4)))
    for cap in layers:
        res = fit_pde_layer(cap["u_in"], cap["u_out"], cap["attn"], cap["mlp"], dt=1.0 / L)
        assert res.alpha == pytest.approx(L, rel=1e-3)
        assert res.ffn_coef == pytest.approx(L, rel=1e-3)
        assert float(res.diffusion.abs().max()) < 1e-3
        assert res.r2 > 0.99999
        assert res.r2_attention < res.r2  # attention alone does not explain the MLP's part


def test_post_ln_transformer_is_not_an_euler_sum() -> None:
    """Post-LN renormalises after each sum: the update is no longer A + F and the fit says so (R² < 1)."""
    torch.manual_seed(0)
    model = TransformerClassifier(num_classes=3, d_model=16, n_layers=2, n_heads=2, d_ff=24, image_size=8,
                                  residual=True, norm="post", dropout=0.0).eval()  # fmt: skip
    cap = capture_layers(model, torch.rand(32, 8, 8, generator=torch.Generator().manual_seed(4)))[0]
    res = fit_pde_layer(cap["u_in"], cap["u_out"], cap["attn"], cap["mlp"], dt=0.5)
    assert res.r2 < 0.99


def _dense_reference(u, y, a, f, valid, kind):
    """The same fit by a dense numpy least squares on the explicit design matrix."""
    lap = laplacian_1d(u, 1.0, "dirichlet", ~valid)
    m = valid.numpy()
    L_, A_, F_, Y_ = (t.numpy()[m] for t in (lap, a, f, y))  # [n, d]
    n, d = Y_.shape
    cols = []
    if kind == "diagonal":
        for j in range(d):
            c = np.zeros((n, d))
            c[:, j] = L_[:, j]
            cols.append(c.ravel())
    elif kind == "scalar":
        cols.append(L_.ravel())
    cols += [A_.ravel(), F_.ravel()]
    X = np.stack(cols, 1)
    beta = np.linalg.lstsq(X, Y_.ravel(), rcond=None)[0]
    sse = ((Y_.ravel() - X @ beta) ** 2).sum()
    sst = ((Y_ - Y_.mean(0)) ** 2).sum()
    return beta, 1 - sse / sst, math.sqrt(sse / (n * d))


@pytest.mark.parametrize("kind", ["diagonal", "scalar", "none"])
def test_closed_form_matches_dense_least_squares_on_noisy_data(kind: str) -> None:
    g = torch.Generator().manual_seed(5)
    B, T, d = 6, 9, 5
    u, a, f, noise = (torch.randn(B, T, d, generator=g, dtype=torch.float64) for _ in range(4))
    valid = torch.arange(T)[None, :] < torch.tensor([9, 4, 7, 9, 2, 5])[:, None]
    lap = laplacian_1d(u, 1.0, "dirichlet", ~valid)
    y = torch.linspace(0.1, 1.0, d, dtype=torch.float64) * lap + 0.8 * a - 0.3 * f + 0.7 * noise
    res = fit_pde_layer(u, u + 0.2 * y, a, f, valid, dt=0.2, diffusion=kind)
    beta, r2, rms = _dense_reference(u, y, a, f, valid, kind)
    nd = {"diagonal": d, "scalar": 1, "none": 0}[kind]
    expect_D = torch.as_tensor(beta[:nd]).expand(d) if nd else torch.zeros(d, dtype=torch.float64)
    torch.testing.assert_close(res.diffusion, expect_D, rtol=1e-8, atol=1e-10)
    assert (res.alpha, res.ffn_coef) == pytest.approx((beta[nd], beta[nd + 1]), rel=1e-8)
    assert res.r2 == pytest.approx(r2, abs=1e-10)
    assert res.residual_rms == pytest.approx(rms, rel=1e-8)
    assert 0.0 < res.r2 < 1.0
    # sub-models refitted alone
    m = valid.numpy()
    Y_, A_ = y.numpy()[m], a.numpy()[m]
    alpha_alone = (A_ * Y_).sum() / (A_ * A_).sum()
    sst = ((Y_ - Y_.mean(0)) ** 2).sum()
    assert res.r2_attention == pytest.approx(1 - ((Y_ - alpha_alone * A_) ** 2).sum() / sst, abs=1e-10)
    if kind == "none":
        assert math.isnan(res.r2_diffusion)
    else:
        L_ = lap.numpy()[m]
        D_alone = (L_ * Y_).sum(0) / (L_ * L_).sum(0) if kind == "diagonal" else (L_ * Y_).sum() / (L_ * L_).sum()
        assert res.r2_diffusion == pytest.approx(1 - ((Y_ - D_alone * L_) ** 2).sum() / sst, abs=1e-10)


def test_planted_diffusion_only_update() -> None:
    g = torch.Generator().manual_seed(6)
    u, a = (torch.randn(8, 10, 4, generator=g, dtype=torch.float64) for _ in range(2))
    D = torch.tensor([0.2, 0.5, 0.1, 0.9], dtype=torch.float64)
    res = fit_pde_layer(u, u + 0.05 * D * laplacian_1d(u), a, None, dt=0.05)
    torch.testing.assert_close(res.diffusion, D)
    assert res.r2_diffusion == pytest.approx(1.0, abs=1e-12) and res.r2 == pytest.approx(1.0, abs=1e-12)
    assert res.alpha == pytest.approx(0.0, abs=1e-10) and res.ffn_coef is None  # no F given: left out, not 0
    assert res.r2_attention < 0.05


@pytest.mark.parametrize("kind", ["diagonal", "scalar", "none"])
def test_a_term_not_observed_is_left_out_not_fitted_as_zero(kind: str) -> None:
    """Without F the fit is the least-squares fit of the other terms alone (dense lstsq), and c is None, not 0."""
    g = torch.Generator().manual_seed(9)
    u, a, f = (torch.randn(5, 7, 3, generator=g, dtype=torch.float64) for _ in range(3))
    y_next = u + 0.25 * (0.3 * laplacian_1d(u) + 2.0 * a + f)
    res = fit_pde_layer(u, y_next, a, None, dt=0.25, diffusion=kind)
    assert res.ffn_coef is None and res.alpha is not None
    # the same fit by dense least squares over the columns [∇²u (per feature / scalar / none), A]
    Y_ = ((y_next - u) / 0.25).numpy().reshape(-1, 3)
    L_, A_ = laplacian_1d(u).numpy().reshape(-1, 3), a.numpy().reshape(-1, 3)
    if kind == "diagonal":
        # one row per (position, feature j): columns D_0..D_2 (∇²u_j in column j only) and α (A_j)
        X = np.concatenate([L_[:, :, None] * np.eye(3)[None], A_[:, :, None]], 2).reshape(-1, 4)
    elif kind == "scalar":
        X = np.stack([L_.ravel(), A_.ravel()], 1)
    else:
        X = A_.reshape(-1, 1)
    beta = np.linalg.lstsq(X, Y_.ravel(), rcond=None)[0]
    assert res.alpha == pytest.approx(beta[-1], rel=1e-9)
    sst = ((Y_ - Y_.mean(0)) ** 2).sum()
    assert res.r2 == pytest.approx(1 - ((Y_.ravel() - X @ beta) ** 2).sum() / sst, abs=1e-9)
    # neither term observed: only diffusion is fitted; with no attention, no eq. (21) number either
    res = fit_pde_layer(u, y_next, None, None, dt=0.25, diffusion=kind, w_o_norm=1.0)
    assert res.alpha is None and res.ffn_coef is None and res.eq21 is None and math.isnan(res.r2_attention)


def test_a_term_observed_in_only_some_batches_is_left_out() -> None:
    g = torch.Generator().manual_seed(10)
    u, a, f = (torch.randn(4, 6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    y_next = u + 0.5 * (a + f)
    s1 = pde_fit_statistics(u[:2], y_next[:2], a[:2], f[:2], dt=0.5)
    s2 = pde_fit_statistics(u[2:], y_next[2:], a[2:], None, dt=0.5)
    res = solve_pde_fit(add_pde_fit_statistics(s1, s2), "none")
    assert res.ffn_coef is None
    assert res.alpha == pytest.approx(float((a * (y_next - u) / 0.5).sum() / (a * a).sum()), rel=1e-12)


def test_degenerate_columns_get_zero_coefficients() -> None:
    g = torch.Generator().manual_seed(7)
    u = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    u[..., 1] = 2.5  # a constant feature: its Neumann Laplacian is 0, so D_1 is not identifiable
    f = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    zeros = torch.zeros_like(u)
    res = fit_pde_layer(u, u + 0.1 * (0.4 * laplacian_1d(u, boundary="neumann") + f), zeros, f, dt=0.1,
                        boundary="neumann")  # fmt: skip
    assert torch.isfinite(res.diffusion).all() and math.isfinite(res.alpha)
    assert float(res.diffusion[1]) == 0.0 and res.alpha == 0.0
    assert res.diffusion[[0, 2]].tolist() == pytest.approx([0.4, 0.4]) and res.ffn_coef == pytest.approx(1.0)
    # collinear A = F: the minimum-norm split of the common coefficient
    res = fit_pde_layer(u, u + 0.1 * 2.0 * f, f, f, dt=0.1, diffusion="none")
    assert (res.alpha, res.ffn_coef) == pytest.approx((1.0, 1.0)) and res.r2 == pytest.approx(1.0)


def test_argument_checks() -> None:
    u = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="must both be"):
        pde_fit_statistics(u, torch.zeros(2, 3, 5), None, None, dt=1.0)
    with pytest.raises(ValueError, match="attn has shape"):
        pde_fit_statistics(u, u, torch.zeros(2, 3), None, dt=1.0)
    with pytest.raises(ValueError, match="valid has shape"):
        pde_fit_statistics(u, u, None, None, torch.ones(2, 4, dtype=torch.bool), dt=1.0)
    with pytest.raises(ValueError, match="dt=0"):
        pde_fit_statistics(u, u, None, None, dt=0)
    with pytest.raises(ValueError, match="'robin' is not one of"):
        pde_fit_statistics(u, u, None, None, dt=1.0, boundary="robin")
    stats = pde_fit_statistics(u, u, None, None, dt=1.0)
    with pytest.raises(ValueError, match="'full' is not one of"):
        solve_pde_fit(stats, "full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lack keys"):
        solve_pde_fit({"n": stats["n"]})
    with pytest.raises(ValueError, match="no valid positions"):
        solve_pde_fit(pde_fit_statistics(u, u, None, None, torch.zeros(2, 3, dtype=torch.bool), dt=1.0))
    with pytest.raises(ValueError, match="at least one"):
        add_pde_fit_statistics()


def test_doctests() -> None:
    result = doctest.testmod(pde_fit, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
