"""Known-answer tests for attention rollout and attention flow (pdelightning.analysis.rollout)."""

from __future__ import annotations

import doctest
import itertools
import math

import networkx as nx
import pytest
import torch
from torch import Tensor

from pdelightning.analysis import rollout
from pdelightning.analysis.rollout import (
    attention_flow,
    attention_rollout,
    fuse_heads,
    residual_attention,
    row_entropy,
)

# The hand-computed case: 2 layers, 3 tokens, rows = queries.
A1 = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
A2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
# Ã = 0.5 A + 0.5 I (rows already sum to 1)
A1_RES = [[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.0, 1.0]]
A2_RES = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.25, 0.25, 0.5]]
# R_2 = Ã_2 Ã_1, by hand: row 1 = 0.5·Ã_1[1] + 0.5·Ã_1[2]; row 2 = 0.25·Ã_1[0] + 0.25·Ã_1[1] + 0.5·Ã_1[2]
ROLLOUT_2 = [[0.5, 0.5, 0.0], [0.125, 0.25, 0.625], [0.1875, 0.25, 0.5625]]
# With two layers every path j -> k -> i has its own middle node, so flow(j -> i) = Σ_k min(Ã_1[k, j], Ã_2[i, k]):
# e.g. flow(2 -> 1) = min(0, 0) + min(0.25, 0.5) + min(1, 0.5) = 0.75
FLOW_2 = [[0.5, 0.5, 0.0], [0.25, 0.5, 0.75], [0.5, 0.5, 0.75]]


def as_batch(*mats: Tensor | list) -> list[Tensor]:
    return [torch.as_tensor(m, dtype=torch.float64)[None] for m in mats]


def random_attention(B: int, H: int, T: int, seed: int, valid: Tensor | None = None) -> Tensor:
    scores = torch.randn(B, H, T, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    return scores.softmax(-1)


def test_identity_attention_gives_identity_rollout() -> None:
    eye = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    for w in (0.0, 0.5, 0.9):
        roll = attention_rollout([eye] * 4, residual_weight=w)
        torch.testing.assert_close(roll, torch.eye(5, dtype=torch.float64).expand(4, 2, 5, 5))
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    roll = attention_rollout([eye] * 3, valid)
    expect = torch.eye(5, dtype=torch.float64).expand(3, 2, 5, 5) * (valid[:, :, None] & valid[:, None, :])
    torch.testing.assert_close(roll, expect)
    assert torch.count_nonzero(row_entropy(roll, valid)) == 0


def test_hand_computed_two_layers_three_tokens() -> None:
    # two heads whose mean is A1: mean fusion must give the hand case
    head_a, head_b = A1.clone(), A1.clone()
    head_a[1], head_b[1] = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    heads1 = torch.stack([head_a, head_b])[None].double()
    assert torch.allclose(fuse_heads(heads1), A1.double()[None])
    roll = attention_rollout([heads1, A2[None, None]])
    torch.testing.assert_close(roll[0, 0], torch.tensor(A1_RES, dtype=torch.float64))
    torch.testing.assert_close(roll[1, 0], torch.tensor(ROLLOUT_2, dtype=torch.float64))
    torch.testing.assert_close(residual_attention(A2[None]), torch.tensor(A2_RES, dtype=torch.float64)[None])
    flow = attention_flow(as_batch(A1, A2))
    torch.testing.assert_close(flow[0], torch.tensor(FLOW_2, dtype=torch.float64), atol=2e-6, rtol=0)

    # entropy of the rollout rows, by hand: row 0 has two halves (log 2), etc.
    def h(p: list) -> float:
        return -sum(x * math.log(x) for x in p if x > 0)

    expect = [sum(h(r) for r in A1_RES) / 3, sum(h(r) for r in ROLLOUT_2) / 3]
    assert row_entropy(roll).tolist() == pytest.approx(expect, rel=1e-12)


def test_padding_zeroes_keys_and_renormalises_rows() -> None:
    raw = torch.tensor([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False]])
    a = residual_attention(raw, valid)
    # row 0: 0.5·[0.2, 0.3, 0] + 0.5·[1, 0, 0] = [0.6, 0.15, 0], / 0.75; row 1: [0.05, 0.55, 0], / 0.6; row 2 padded
    expect = torch.tensor([[[0.8, 0.2, 0.0], [0.05 / 0.6, 0.55 / 0.6, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(a, expect)


def test_head_fusion_max_and_min() -> None:
    heads = torch.tensor([[[[0.9, 0.1], [0.4, 0.6]], [[0.3, 0.7], [0.2, 0.8]]]], dtype=torch.float64)
    a = residual_attention(heads, head_fusion="max", residual_weight=0.5)
    # max = [[0.9, 0.7], [0.4, 0.8]]; + I halves: [[0.95, 0.35], [0.2, 0.9]] / row sums
    torch.testing.assert_close(
        a[0], torch.tensor([[0.95 / 1.3, 0.35 / 1.3], [0.2 / 1.1, 0.9 / 1.1]], dtype=torch.float64)
    )
    a = residual_attention(heads, head_fusion="min", residual_weight=0.0)
    torch.testing.assert_close(
        a[0], torch.tensor([[0.3 / 0.4, 0.1 / 0.4], [0.2 / 0.8, 0.6 / 0.8]], dtype=torch.float64)
    )


def test_rollout_is_the_product_of_the_residual_matrices() -> None:
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    atts = [random_attention(3, 4, 6, seed=s, valid=valid) for s in range(4)]
    roll = attention_rollout(atts, valid, residual_weight=0.3)
    mats = [residual_attention(a, valid, 0.3) for a in atts]
    for b in range(3):
        for depth in range(4):
            expect = torch.linalg.multi_dot([mats[i][b] for i in range(depth, -1, -1)]) if depth else mats[0][b]
            torch.testing.assert_close(roll[depth, b], expect)
    sums = roll.sum(-1)
    torch.testing.assert_close(sums, valid.double().expand_as(sums))
    # uniform mixing has entropy log(n_valid): here the mean over valid rows of log 6, log 4, log 2
    uniform = valid.double()[:, None, :].expand(3, 6, 6) / valid.sum(1, keepdim=True)[:, :, None]
    ent = row_entropy(uniform, valid)
    assert float(ent) == pytest.approx((6 * math.log(6) + 4 * math.log(4) + 2 * math.log(2)) / 12)
    assert float(row_entropy(uniform, valid, "sum")) == pytest.approx(float(ent) * 12)
    assert row_entropy(uniform, valid, "none").shape == (3, 6)
    assert row_entropy(roll, valid).shape == (4,)


def brute_force_max_flow(layers: list[Tensor], src: int, dst: int) -> float:
    """Minimum s-t cut by enumerating every node subset (max-flow min-cut theorem); node = l * T + t."""
    T = layers[0].shape[0]
    n = (len(layers) + 1) * T
    edges = [
        ((d - 1) * T + k, d * T + i, float(a[i, k]))
        for d, a in enumerate(layers, 1)
        for i in range(T)
        for k in range(T)
        if a[i, k] > 0
    ]
    others = [v for v in range(n) if v not in (src, dst)]
    best = math.inf
    for bits in itertools.product((False, True), repeat=len(others)):
        side = {src} | {v for v, b in zip(others, bits, strict=True) if b}
        best = min(best, sum(c for u, v, c in edges if u in side and v not in side))
    return best


def test_flow_matches_brute_force_min_cut_and_networkx() -> None:
    atts = [random_attention(1, 2, 3, seed=s) for s in (10, 11)]
    flow = attention_flow(atts, scale=10**6)
    mats = [residual_attention(a)[0] for a in atts]
    bound = 2 * 3 * 3 / (2 * 10**6)  # L T² / (2 scale)
    for i, j in itertools.product(range(3), range(3)):
        assert float(flow[0, i, j]) == pytest.approx(brute_force_max_flow(mats, j, 2 * 3 + i), abs=bound)
    # a deeper, padded case against networkx's float max flow
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    atts = [random_attention(2, 3, 5, seed=s, valid=valid) for s in range(20, 23)]
    flow = attention_flow(atts, valid, outputs=[0, 2, 4])
    mats = [residual_attention(a, valid) for a in atts]
    for b in range(2):
        g = nx.DiGraph()
        for depth, m in enumerate(mats, 1):
            for i, k in itertools.product(range(5), range(5)):
                if m[b, i, k] > 0:
                    g.add_edge((depth - 1, k), (depth, i), capacity=float(m[b, i, k]))
        for o_i, o in enumerate([0, 2, 4]):
            for j in range(5):
                ok = bool(valid[b, o] and valid[b, j])
                expect = nx.maximum_flow_value(g, (0, j), (3, o)) if ok else 0.0
                assert float(flow[b, o_i, j]) == pytest.approx(expect, abs=3 * 25 / 2e6)


def test_flow_of_one_layer_is_the_residual_attention() -> None:
    att = random_attention(2, 2, 4, seed=3)
    torch.testing.assert_close(attention_flow([att]), residual_attention(att), atol=1e-6, rtol=0)


def test_flow_guards() -> None:
    atts = [random_attention(5, 1, 4, seed=4)] * 2
    assert attention_flow(atts, max_samples=2).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="exceeds max_tokens=3"):
        attention_flow(atts, max_tokens=3)
    with pytest.raises(ValueError, match="scale=0 must lie in"):
        attention_flow(atts, scale=0)
    with pytest.raises(ValueError, match=r"outputs \[4\] are not positions"):
        attention_flow(atts, outputs=[0, 4])
    with pytest.raises(ValueError, match="max_samples=0"):
        attention_flow(atts, max_samples=0)
    with pytest.raises(ValueError, match="at least one layer"):
        attention_flow([])


def test_argument_checks() -> None:
    att = random_attention(2, 2, 3, seed=5)
    with pytest.raises(ValueError, match="'median' is not one of"):
        fuse_heads(att, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be \[B, H, T, T\]"):
        fuse_heads(att[0, 0])
    with pytest.raises(ValueError, match=r"residual_weight=1\.5"):
        residual_attention(att, residual_weight=1.5)
    with pytest.raises(ValueError, match="valid has shape"):
        residual_attention(att, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])
    with pytest.raises(ValueError, match="layer 1 has attention of shape"):
        attention_rollout([att, random_attention(2, 2, 4, seed=6)])
    with pytest.raises(ValueError, match="'max' is not one of"):
        row_entropy(att[:, 0], reduction="max")  # type: ignore[arg-type]


def test_doctests() -> None:
    result = doctest.testmod(rollout, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
