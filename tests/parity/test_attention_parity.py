"""Attention metrics and head matching against scipy and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cosine as scipy_cosine_distance
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from pdelightning.analysis.attention import (
    attention_cosine,
    attention_entropy,
    attention_js,
    attention_kl,
    match_heads,
    pairwise_head_sums,
)


@pytest.fixture
def rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(20, 7, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2 * torch.randn(20, 7, generator=g, dtype=torch.float64), -1)
    p[0, :3] = 0.0  # exact zeros: 0 ln 0 = 0
    p[0] /= p[0].sum()
    return p, q


def test_entropy_kl_js_cosine_match_scipy(rows) -> None:
    p, q = rows
    pn, qn = p.numpy(), q.numpy()
    torch.testing.assert_close(attention_entropy(p), torch.from_numpy(entropy(pn, axis=-1)))
    torch.testing.assert_close(attention_kl(p, q), torch.from_numpy(entropy(pn, qn, axis=-1)))  # KL(p || q), nats
    js = np.array([jensenshannon(a, b) ** 2 for a, b in zip(pn, qn, strict=True)])  # scipy: the JS *distance*
    torch.testing.assert_close(attention_js(p, q), torch.from_numpy(js))
    cos = np.array([1 - scipy_cosine_distance(a, b) for a, b in zip(pn, qn, strict=True)])
    torch.testing.assert_close(attention_cosine(p, q), torch.from_numpy(cos))


def test_known_answers() -> None:
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    assert float(attention_entropy(uniform)) == pytest.approx(math.log(4))  # ln T
    one_hot = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    assert float(attention_kl(one_hot, uniform)) == pytest.approx(math.log(4))  # ln(1 / 0.25)
    assert float(attention_js(one_hot, torch.tensor([0, 1.0, 0, 0]).double())) == pytest.approx(math.log(2))
    assert float(attention_cosine(one_hot, uniform)) == pytest.approx(0.5)  # 0.25 / (1 * 0.5)


def test_pairwise_head_sums_equal_per_row_loops() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64), -1)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    sums = pairwise_head_sums(p, q, valid)
    for b, i, j in itertools.product(range(2), range(3), range(2)):
        rows = [r for r in range(5) if valid[b, r]]
        kl = sum(entropy(p[b, i, r].numpy(), q[b, j, r].numpy()) for r in rows)
        js = sum(jensenshannon(p[b, i, r].numpy(), q[b, j, r].numpy()) ** 2 for r in rows)
        assert float(sums["kl"][b, i, j]) == pytest.approx(kl, rel=1e-9)
        assert float(sums["js"][b, i, j]) == pytest.approx(js, rel=1e-9)
    # the entropies passed in (as AttentionSimilarity does, once per layer) give the same sums, bit for bit
    given = pairwise_head_sums(p, q, valid, p_log_p=-attention_entropy(p), q_log_q=-attention_entropy(q))
    assert all(torch.equal(given[k], sums[k]) for k in sums)


def test_head_matching_against_brute_force_permutations() -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        score = torch.rand(5, 5, generator=g, dtype=torch.float64)
        best = max(itertools.permutations(range(5)), key=lambda perm: sum(float(score[i, perm[i]]) for i in range(5)))
        rows, cols = match_heads(score)
        assert rows.tolist() == list(range(5)) and tuple(cols.tolist()) == best
        worst = min(itertools.permutations(range(5)), key=lambda perm: sum(float(score[i, perm[i]]) for i in range(5)))
        assert tuple(match_heads(score, maximize=False)[1].tolist()) == worst


def test_rectangular_matching_against_scipy() -> None:
    score = torch.rand(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows, cols = match_heads(score)
    r, c = linear_sum_assignment(score.numpy(), maximize=True)
    assert rows.tolist() == r.tolist() and cols.tolist() == c.tolist()
    brute = max(itertools.permutations(range(6), 3), key=lambda cs: sum(float(score[i, cs[i]]) for i in range(3)))
    assert tuple(cols.tolist()) == brute
