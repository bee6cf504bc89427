"""The §3.2 comparison of the paper's diffusion-only PDE: its steps' mixing matrices as attention distributions
(:func:`pdelightning_reproduce.pairs.mixing_patterns`), scored by the same head-matched measures as attention.

Known answers: the mixing matrix of one explicit Euler step of du/dt = D ∇²u with a Dirichlet boundary, by hand; a
reference whose attention *is* that matrix scores cosine 1 and KL 0; uniform attention scores the cosine of the
stencil row with the uniform row, computed by hand.
"""

from __future__ import annotations

import math

import torch

from pdelightning.models import DiffusionPDEClassifier, TransformerClassifier
from pdelightning_reproduce.pairs import attention_values, mixing_patterns

T = 6


def _diffusion(d: float = 0.2, dt: float = 0.5) -> DiffusionPDEClassifier:
    return DiffusionPDEClassifier(
        num_classes=3,
        d_model=4,
        n_layers=2,
        image_size=T,
        dt=dt,
        diffusion="scalar",
        diffusion_init=d,
        learn_diffusion=False,
        boundary="dirichlet",
    )


def _by_hand(c: float) -> torch.Tensor:
    """``I + c (shift_left - 2 I + shift_right)`` with zero ghost cells, rows normalised to sum 1."""
    m = torch.zeros(T, T)
    for i in range(T):
        m[i, i] = 1 - 2 * c
        if i > 0:
            m[i, i - 1] = c
        if i < T - 1:
            m[i, i + 1] = c
    return m / m.sum(-1, keepdim=True)


def test_the_mixing_matrix_is_the_stencil_by_hand_as_a_distribution() -> None:
    pats, low = mixing_patterns(_diffusion(0.2, 0.5), n=3, n_tokens=T, n_heads=2)
    assert len(pats) == 2 and pats[0].shape == (3, 2, T, T)
    torch.testing.assert_close(pats[0][1, 1], _by_hand(0.1))
    torch.testing.assert_close(pats[1][0, 0].sum(-1), torch.ones(T))
    assert math.isclose(low, 0.0, abs_tol=1e-7)  # the entries two or more positions away


def test_an_unstable_step_is_not_a_distribution() -> None:
    # 2 D Δt / Δx² = 1.6 > 1: eq. (21) with α = 0 fails and the diagonal entry 1 - 2c is negative
    _, low = mixing_patterns(_diffusion(1.6, 0.5), n=1, n_tokens=T, n_heads=1)
    assert math.isclose(low, 1 - 1.6, rel_tol=1e-6)


def test_a_model_with_attention_has_no_mixing_patterns() -> None:
    model = TransformerClassifier(num_classes=3, d_model=8, n_layers=1, n_heads=2, d_ff=8, image_size=T)
    pats, low = mixing_patterns(model, 1, T, 2)
    assert pats == [] and math.isnan(low)


def test_the_attention_measures_score_the_stencil_against_a_reference() -> None:
    pats, _ = mixing_patterns(_diffusion(0.2, 0.5), n=4, n_tokens=T, n_heads=2)
    same = [p.clone() for p in pats]
    valid = torch.ones(4, T, dtype=torch.bool)
    v = attention_values(pats, same, None, valid)
    assert abs(v["cosine"]["blocks.0"] - 1.0) < 1e-6 and abs(v["kl"]["blocks.1"]) < 1e-6
    row = _by_hand(0.1)
    uniform = torch.full((T,), 1.0 / T)
    cos = torch.nn.functional.cosine_similarity(row, uniform.expand(T, T), dim=-1).mean()
    assert abs(v["null_uniform_cosine"]["blocks.0"] - float(cos)) < 1e-5
