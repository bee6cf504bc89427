"""The per-layer comparison of AttentionSimilarity: every sum against the one-pair functions, stacking layers changes
no value, and the summary scores against the strongest null."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pdelightning.analysis.attention import (
    attention_cosine,
    attention_entropy,
    attention_js,
    attention_kl,
    uniform_over_support,
)
from pdelightning.analysis.attention_layers import compare_layer, compare_layers, summarize_layer


def softmax(shape: tuple[int, ...], scale: float, g: torch.Generator) -> Tensor:
    return torch.softmax(scale * torch.randn(*shape, generator=g), dim=-1)


def _per_row(p: Tensor, q: Tensor, valid: Tensor, eps: float) -> dict[str, Tensor]:
    """The all-pairs sums the slow way: each head pair through the one-pair functions, rows masked and summed."""
    w = valid.double()[:, None, :]
    out = {m: torch.zeros(p.shape[0], p.shape[1], q.shape[1], dtype=torch.float64) for m in ("cosine", "kl", "js")}
    for h in range(p.shape[1]):
        for g in range(q.shape[1]):
            a, b = p[:, h].double(), q[:, g].double()
            out["cosine"][:, h, g] = (attention_cosine(a, b) * w[:, 0]).sum(-1)
            out["kl"][:, h, g] = (attention_kl(a, b, eps) * w[:, 0]).sum(-1)
            out["js"][:, h, g] = (attention_js(a, b) * w[:, 0]).sum(-1)
    return out


def test_compare_layer_equals_the_one_pair_functions() -> None:
    """Every sum compare_layer makes (main, uniform, null model, shuffled partner) against a per-pair loop."""
    g = torch.Generator().manual_seed(2)
    p, r, null = softmax((6, 3, 5, 5), 2.0, g), softmax((6, 2, 5, 5), 2.0, g), softmax((6, 3, 5, 5), 1.0, g)
    r[..., 4] = 0.0  # a key the reference never attends: the KL guard and the uniform null's support matter
    r = r / r.sum(-1, keepdim=True)
    valid = torch.ones(6, 5, dtype=torch.bool)
    valid[1, 3:] = False
    partner = torch.tensor([1, 0, 3, 2, -1, -1])
    out = compare_layer(p, r, valid, 1e-8, null=null, partner=partner)
    j = partner.clamp_min(0)
    both = valid & valid[j] & (partner >= 0)[:, None]
    expected = {"main": _per_row(p, r, valid, 1e-8), "random_init": _per_row(null, r, valid, 1e-8)}
    expected["shuffled"] = _per_row(p, r[j], both, 1e-8)
    expected["uniform"] = {m: v[:, 0] for m, v in _per_row(uniform_over_support(r), r, valid, 1e-8).items()}
    for comp, sums in expected.items():
        for m, v in sums.items():
            assert torch.allclose(out[f"{comp}/{m}"].double(), v, atol=1e-5), (comp, m)
    assert out["rows"].tolist() == [5, 3, 5, 5, 5, 5] and out["rows_shuffled"].tolist() == [3, 3, 5, 5, 0, 0]
    h = (attention_entropy(p.double()) * valid.double()[:, None]).sum((-1, -2)) / 3
    assert torch.allclose(out["entropy"].double(), h, atol=1e-5)
    plain = {"rows", "rows_shuffled", "entropy", "entropy_reference", "main/cosine", "main/kl", "main/js"}
    assert set(compare_layer(p, r, valid, 1e-8, uniform=False)) == plain


def test_summarize_layer_scores_against_the_strongest_null() -> None:
    """A model equal to the reference: cosine 1, KL 0; skills against the best null, margins its distance."""
    g = torch.Generator().manual_seed(0)
    r = softmax((8, 2, 6, 6), 3.0, g)
    valid = torch.ones(8, 6, dtype=torch.bool)
    partner = torch.arange(8) ^ 1
    res = summarize_layer(compare_layer(r, r, valid, 1e-8, partner=partner), "cosine", uniform=True, min_room=0.0)
    assert res["cosine"] == pytest.approx(1.0, abs=1e-6) and res["kl"] == pytest.approx(0.0, abs=1e-5)
    strongest = max(res["cosine_null_uniform"], res["cosine_null_shuffled"])
    assert res["cosine_margin"] == pytest.approx(1.0 - strongest, abs=1e-6)
    assert res["cosine_skill"] == pytest.approx(1.0, abs=1e-5) and res["js_skill"] == pytest.approx(1.0, abs=1e-4)
    assert res["rows"] == 48 and "cosine_null_random_init" not in res


@pytest.mark.parametrize("max_elements", [1, 1 << 24])
def test_stacked_layers_give_each_layer_s_numbers(max_elements: int) -> None:
    """Three pairs (two of one shape, one of another), stacked in one call or one at a time: the same sums."""
    g = torch.Generator().manual_seed(5)
    shapes = [(6, 2, 5, 5), (6, 2, 5, 5), (6, 3, 4, 4)]
    p = [softmax(s, 2.0, g) for s in shapes]
    r = [softmax((6, 2, s[2], s[3]), 2.0, g) for s in shapes]
    null = [softmax(s, 1.0, g) for s in shapes]
    valid = [torch.rand(6, s[2], generator=g) > 0.3 for s in shapes]
    partner = torch.tensor([1, 0, 3, 2, -1, -1])
    got = compare_layers(p, r, valid, 1e-8, null=null, partner=partner, max_elements=max_elements)
    for i in range(3):
        expected = compare_layer(p[i], r[i], valid[i], 1e-8, null=null[i], partner=partner)
        assert got[i].keys() == expected.keys()
        for key, v in expected.items():
            assert torch.allclose(got[i][key], v, atol=1e-6), (i, key)
