"""Known-answer tests for the measured Jacobian stability (pdelightning.analysis.jacobian)."""

from __future__ import annotations

import doctest
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from pdelightning.analysis import jacobian
from pdelightning.analysis.jacobian import compose, jacobian_spectral_norm, lyapunov_exponent
from pdelightning.models import TransformerBlock

B, T, D = 3, 5, 8
CONVERGE = {"n_iter": 1000, "tol": 1e-8}  # σ then agrees to ~1e-7, far below the 1e-4 checked


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors and many small products: one intra-op thread is faster, far faster on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def dense_norms(f, u: Tensor, valid: Tensor | None, minus_identity: bool = False) -> Tensor:
    """Per-sample ||P (J - [I]) P||_2 from the dense Jacobian of torch.autograd.functional.jacobian."""
    Bn, Tn, d = u.shape
    J = torch.autograd.functional.jacobian(f, u)  # [B, T, d, B, T, d]
    out = []
    for b in range(Bn):
        Jb = J[b, :, :, b].reshape(Tn * d, Tn * d)
        if minus_identity:
            Jb = Jb - torch.eye(Tn * d, dtype=Jb.dtype)
        keep = torch.ones(Tn, dtype=torch.bool) if valid is None else valid[b]
        idx = keep.repeat_interleave(d)
        out.append(torch.linalg.matrix_norm(Jb[idx][:, idx], 2) if idx.any() else Jb.new_zeros(()))
    return torch.stack(out)


def padding() -> Tensor:
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 3:] = False
    valid[2, 4:] = False
    return valid


def test_linear_residual_map_per_token() -> None:
    """u + Δt·A u on every token: J = I + Δt A per token, so ||J|| = ||I + Δt A||_2 and ||J - I|| = Δt ||A||_2."""
    g = torch.Generator().manual_seed(0)
    A, dt = torch.randn(D, D, generator=g, dtype=torch.float64), 0.1
    u = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    expect = torch.linalg.matrix_norm(torch.eye(D, dtype=torch.float64) + dt * A, 2)
    for method in ("auto", "jvp", "double_vjp"):
        res = jacobian_spectral_norm(lambda x: x + dt * x @ A.T, u, method=method, **CONVERGE)
        torch.testing.assert_close(res.sigma, expect.expand(B), rtol=1e-6, atol=0)
        assert res.converged.all() and res.method == ("double_vjp" if method == "auto" else method)
    res = jacobian_spectral_norm(lambda x: x + dt * x @ A.T, u, minus_identity=True, **CONVERGE)
    torch.testing.assert_close(res.sigma, dt * torch.linalg.matrix_norm(A, 2).expand(B), rtol=1e-6, atol=0)


def test_linear_map_mixing_tokens_with_padding() -> None:
    """u + Δt M u Aᵀ mixes tokens: J = I + Δt (M ⊗ A); padded positions are neither perturbed nor measured."""
    g = torch.Generator().manual_seed(1)
    A, M = torch.randn(D, D, generator=g, dtype=torch.float64), torch.randn(T, T, generator=g, dtype=torch.float64)
    u, dt, valid = torch.randn(B, T, D, generator=g, dtype=torch.float64), 0.2, padding()

    def f(x: Tensor) -> Tensor:
        return x + dt * torch.einsum("st,btj,ij->bsi", M, x, A)

    for minus_identity in (False, True):
        res = jacobian_spectral_norm(f, u, valid, minus_identity=minus_identity, **CONVERGE)
        torch.testing.assert_close(res.sigma, dense_norms(f, u, valid, minus_identity), rtol=1e-4, atol=0)
    # closed form for the full sample: ||I + Δt kron(M, A)||_2
    kron = torch.eye(T * D, dtype=torch.float64) + dt * torch.kron(M, A)
    res = jacobian_spectral_norm(f, u, **CONVERGE)
    torch.testing.assert_close(res.sigma[0], torch.linalg.matrix_norm(kron, 2), rtol=1e-6, atol=0)
    masked = jacobian_spectral_norm(f, u, valid, n_iter=3, tol=0.0)
    assert (masked.vector[~valid] == 0).all() and masked.iterations == 3


@pytest.mark.parametrize("norm", ["pre", "none"])
@pytest.mark.parametrize("method", ["auto", "jvp"])
def test_our_transformer_block_against_dense_jacobian(norm: str, method: str) -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(D, 2, 16, 0.0, True, norm).double().eval()
    u, valid = torch.randn(B, T, D, dtype=torch.float64), padding()

    def f(x: Tensor) -> Tensor:
        return blk(x, ~valid)

    for minus_identity in (False, True):
        res = jacobian_spectral_norm(f, u, valid, minus_identity=minus_identity, method=method, **CONVERGE)
        torch.testing.assert_close(res.sigma, dense_norms(f, u, valid, minus_identity), rtol=1e-4, atol=0)
        assert res.method == ("double_vjp" if method == "auto" else "jvp")


def test_stock_encoder_layer_against_dense_jacobian() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True).double().eval()
    u, valid = torch.randn(B, T, D, dtype=torch.float64), padding()

    def f(x: Tensor) -> Tensor:
        return enc(x, src_key_padding_mask=~valid)

    expect = dense_norms(f, u, valid)
    with torch.no_grad():
        res = jacobian_spectral_norm(f, u, valid, **CONVERGE)
    torch.testing.assert_close(res.sigma, expect, rtol=1e-4, atol=0)
    # frozen weights under no_grad: the input of "jvp" does not require grad, so PyTorch takes its native fast
    # path, which has no forward-mode derivative; "double_vjp" (the default) differentiates the input and avoids it
    enc.requires_grad_(False)
    with torch.no_grad():
        res = jacobian_spectral_norm(f, u, valid, **CONVERGE)
    assert res.method == "double_vjp"
    torch.testing.assert_close(res.sigma, expect, rtol=1e-4, atol=0)
    with pytest.raises(NotImplementedError), torch.no_grad():
        jacobian_spectral_norm(f, u, valid, method="jvp", n_iter=2)


class OnceCube(torch.autograd.Function):
    """x³ with a backward that cannot be differentiated again, and a forward-mode derivative."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


def test_auto_falls_back_to_jvp_without_double_backward() -> None:
    """u + Δt u³ elementwise: J is diagonal, ||J||_2 = max |1 + 3 Δt u²| over the sample's entries."""
    u = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def f(x: Tensor) -> Tensor:
        return x + 0.1 * OnceCube.apply(x)

    res = jacobian_spectral_norm(f, u, **CONVERGE)
    assert res.method == "jvp"
    torch.testing.assert_close(res.sigma, (1 + 0.3 * u**2).flatten(1).amax(1), rtol=1e-6, atol=0)
    # the double backward silently drops the cube's term (J v = v); the adjoint check catches it
    with pytest.raises(RuntimeError, match="not adjoint"):
        jacobian_spectral_norm(f, u, method="double_vjp", n_iter=2)


class StraightThrough(torch.autograd.Function):
    """x³ forward (and forward-mode derivative) with an identity backward: no consistent Jacobian exists."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g

    @staticmethod
    def jvp(ctx, t: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


def test_straight_through_backward() -> None:
    """ "jvp" mixes the forward derivative (3x²) and the backward (identity): the adjoint check refuses it.
    "double_vjp" uses only the backward and measures the Jacobian it defines, here 2 I."""
    u = torch.randn(B, T, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def f(x: Tensor) -> Tensor:
        return x + StraightThrough.apply(x)

    with pytest.raises(RuntimeError, match="not adjoint"):
        jacobian_spectral_norm(f, u, method="jvp", n_iter=2)
    res = jacobian_spectral_norm(f, u, n_iter=3)
    assert res.method == "double_vjp"
    torch.testing.assert_close(res.sigma, torch.full((B,), 2.0, dtype=torch.float64))


def test_lyapunov_exponent_of_a_composition() -> None:
    torch.manual_seed(1)
    blocks = [TransformerBlock(D, 2, 16, 0.0, True, "pre").double().eval() for _ in range(3)]
    u, valid = torch.randn(B, T, D, dtype=torch.float64), padding()
    layers = [lambda x, b=b: b(x, ~valid) for b in blocks]
    res = lyapunov_exponent(layers, u, valid, **CONVERGE)
    expect = dense_norms(compose(layers), u, valid).log() / 3
    torch.testing.assert_close(res.exponent, expect, rtol=1e-4, atol=1e-6)
    assert res.n_layers == 3
    # sub-multiplicativity: the exponent is at most the mean log per-layer norm along the trajectory
    per_layer, x = [], u
    for f in layers:
        per_layer.append(jacobian_spectral_norm(f, x, valid, **CONVERGE).sigma.log())
        x = f(x).detach()
    assert (res.exponent <= torch.stack(per_layer).mean(0) + 1e-9).all()


def test_warm_start_converges_at_once_and_zero_jacobian_is_finite() -> None:
    torch.manual_seed(2)
    blk = TransformerBlock(D, 2, 16, 0.0, True, "pre").eval()
    u = torch.randn(B, T, D)
    cold = jacobian_spectral_norm(lambda x: blk(x), u, n_iter=500, tol=1e-5)
    warm = jacobian_spectral_norm(lambda x: blk(x), u, n_iter=500, tol=1e-5, v0=cold.vector)
    assert cold.iterations > 2 and warm.iterations <= 2
    torch.testing.assert_close(warm.sigma, cold.sigma, rtol=1e-4, atol=0)
    # a sample with no valid token, and a map with zero Jacobian
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0] = False
    res = jacobian_spectral_norm(lambda x: blk(x), u, valid, n_iter=5)
    assert float(res.sigma[0]) == 0.0 and torch.isfinite(res.sigma).all() and (res.sigma[1:] > 0).all()
    lyap = lyapunov_exponent([lambda x: 0.0 * x], u, n_iter=3)
    assert (lyap.exponent == -math.inf).all()


def test_argument_checks() -> None:
    u = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"u must be \[B, T, d\]"):
        jacobian_spectral_norm(lambda x: x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="valid has shape"):
        jacobian_spectral_norm(lambda x: x, u, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_iter=0"):
        jacobian_spectral_norm(lambda x: x, u, n_iter=0)
    with pytest.raises(ValueError, match="tol=-1"):
        jacobian_spectral_norm(lambda x: x, u, tol=-1)
    with pytest.raises(ValueError, match="'forward' is not one of"):
        jacobian_spectral_norm(lambda x: x, u, method="forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input's shape"):
        jacobian_spectral_norm(lambda x: x.sum(-1), u)
    with pytest.raises(ValueError, match="at least one layer"):
        lyapunov_exponent([], u)


def test_doctests() -> None:
    result = doctest.testmod(jacobian, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
