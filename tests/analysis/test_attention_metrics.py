"""Attention comparison math against known answers: per-row metrics, padding, head matching, nulls, skill (moved
here from tests/callbacks/test_attention_similarity.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pdelightning.analysis.attention import (
    attention_cosine,
    attention_entropy,
    attention_js,
    attention_kl,
    derangement,
    masked_row_mean,
    match_heads,
    pairwise_head_sums,
    skill_score,
    summarize_pairs,
    uniform_attention,
)


def softmax(shape: tuple[int, ...], scale: float, g: torch.Generator) -> Tensor:
    return torch.softmax(scale * torch.randn(*shape, generator=g), dim=-1)


def test_identical_distributions_agree_perfectly() -> None:
    p = softmax((3, 2, 5, 5), 2.0, torch.Generator().manual_seed(0))
    assert torch.allclose(attention_cosine(p, p), torch.ones(3, 2, 5))
    assert torch.allclose(attention_kl(p, p), torch.zeros(3, 2, 5), atol=1e-6)
    assert torch.allclose(attention_js(p, p), torch.zeros(3, 2, 5), atol=1e-6)


def test_disjoint_one_hot_rows_are_orthogonal_with_maximal_js() -> None:
    p = torch.eye(4)  # row i attends only to key i
    q = torch.eye(4).roll(1, dims=-1)  # row i attends only to key i + 1
    assert torch.allclose(attention_cosine(p, q), torch.zeros(4))
    assert torch.allclose(attention_js(p, q), torch.full((4,), math.log(2)))
    # the KL guard: a key the reference ignores costs ln(1 / eps) nats
    assert torch.allclose(attention_kl(p, q, eps=1e-8), torch.full((4,), math.log(1e8)), rtol=1e-5)


def test_kl_against_a_hand_computed_value_and_its_direction() -> None:
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(p || q) = 0.14384...
    assert float(attention_kl(p, q)) == pytest.approx(expected, abs=1e-6)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(attention_kl(q, p)) == pytest.approx(reverse, abs=1e-6) and reverse != pytest.approx(expected)


def test_entropy_of_uniform_rows_is_log_t_and_uniform_respects_padding() -> None:
    u = uniform_attention(torch.tensor([[True, True, True, False]]))  # [1, 1, 4, 4]
    assert torch.allclose(u[0, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]).expand(4, 4))
    assert torch.allclose(attention_entropy(u), torch.full((1, 1, 4), math.log(3)))


def test_per_row_average_differs_from_flattened_cosine() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    per_row = attention_cosine(p, q)
    assert torch.allclose(per_row, torch.tensor([1.0, 0.5]))
    flat = float((p * q).sum() / (p.norm() * q.norm()))  # weighs rows by their norm: 1.25 / sqrt(1.25 * 2)
    assert flat == pytest.approx(1.25 / math.sqrt(2.5))
    assert float(masked_row_mean(per_row[None], None)) == pytest.approx(0.75)
    assert abs(flat - 0.75) > 0.03


def test_padded_query_rows_are_excluded() -> None:
    p = torch.softmax(torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)), -1)
    q = p.clone()
    q[..., 2:, :] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the padded query rows disagree completely
    valid = torch.tensor([[True, True, False, False]])
    sums = pairwise_head_sums(p, q, valid)
    assert float(sums["cosine"].sum()) == pytest.approx(2.0, abs=1e-6)  # two valid rows, each cosine 1
    assert float(sums["js"].sum()) == pytest.approx(0.0, abs=1e-6)
    assert float(masked_row_mean(attention_cosine(p, q), valid)) == pytest.approx(1.0, abs=1e-6)
    assert float(masked_row_mean(attention_cosine(p, q), None)) < 0.9  # without the mask they would count


def test_hungarian_matching_recovers_a_head_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    p = softmax((6, 4, 7, 7), 3.0, g)
    perm = torch.tensor([2, 0, 3, 1])
    r = p[:, perm]  # reference head j is model head perm[j]
    valid = torch.ones(6, 7, dtype=torch.bool)
    sums = pairwise_head_sums(p, r, valid)
    res = summarize_pairs(sums, valid.sum(-1), "cosine")
    rows, cols = res["matching"]
    assert torch.equal(perm[cols], rows)
    assert res["cosine"] == pytest.approx(1.0, abs=1e-6) and res["kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["cosine_unmatched"] < 0.9
    assert torch.equal(summarize_pairs(sums, valid.sum(-1), "js")["matching"][1], cols)
    # more reference heads than model heads: min(H, H_ref) pairs
    rows, cols = match_heads(torch.tensor([[0.1, 0.2, 0.9]]))
    assert rows.tolist() == [0] and cols.tolist() == [2]


def test_unrelated_near_uniform_attention_looks_similar_but_has_no_skill() -> None:
    """The reason for the nulls: two *independent* near-uniform attentions score like the paper's result."""
    g = torch.Generator().manual_seed(0)
    shape = (8, 4, 28, 28)  # MNIST rows: 28 tokens
    reference = softmax(shape, 0.1, g)
    model = softmax(shape, 0.1, g)  # unrelated to the reference
    other = softmax(shape, 0.1, g)  # another unrelated attention: a shuffled-style null
    cos = float(attention_cosine(model, reference).mean())
    kl = float(attention_kl(model, reference).mean())
    assert cos > 0.98 and kl < 0.02  # the raw numbers look like "agreement"
    u = uniform_attention(torch.ones(8, 28, dtype=torch.bool))
    cos_uniform = float(attention_cosine(u, reference).mean())
    assert cos_uniform > cos  # plain uniform attention agrees even better
    assert skill_score(cos, cos_uniform) < 0.05  # no skill over the uniform null (about -1 here)
    kl_uniform = float(attention_kl(u, reference).mean())
    assert skill_score(kl, kl_uniform, higher_is_better=False) < 0.05
    cos_other = float(attention_cosine(other, reference).mean())
    assert abs(skill_score(cos, cos_other)) < 0.05  # no better than any other unrelated attention
    related = torch.softmax(reference.log() + 0.05 * torch.randn(*shape, generator=g), -1)
    assert skill_score(float(attention_cosine(related, reference).mean()), cos_uniform) > 0.5  # real agreement


def test_skill_score_and_derangement() -> None:
    assert skill_score(1.0, 0.5) == 1.0 and skill_score(0.5, 0.5) == 0.0 and skill_score(0.0, 0.5) == -1.0
    assert skill_score(0.0, 0.2, higher_is_better=False) == 1.0
    assert math.isnan(skill_score(0.9, 1.0)) and math.isnan(skill_score(0.1, 0.0, higher_is_better=False))
    for n in (2, 3, 17):
        d = derangement(n, seed=3)
        assert sorted(d.tolist()) == list(range(n)) and bool((d != torch.arange(n)).all())
    assert torch.equal(derangement(9, 1), derangement(9, 1))
