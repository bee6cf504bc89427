"""Pooling, correlations and the Tables 2/3 comparison of InformationFlow (moved here from tests/callbacks/)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from scipy import stats

from pdelightning.analysis import representation
from pdelightning.analysis.cka import cka_matrix, linear_cka
from pdelightning.analysis.representation import (
    compare_representations,
    consecutive_correlations,
    depth_pairs,
    layer_correlation,
    padding_mask_from_inputs,
    pool_tokens,
    sample_labels,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_padding_mask_and_masked_mean_pooling():
    x = torch.tensor([[4, 2, 7, 0, 0], [1, 0, 0, 0, 0]])
    mask = padding_mask_from_inputs(x)
    assert mask.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert padding_mask_from_inputs(x, pad_id=7)[0].tolist() == [False, False, True, False, False]
    assert padding_mask_from_inputs(torch.rand(2, 5)) is None
    h = torch.randn(2, 5, 3)
    pooled = pool_tokens(h, mask)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], h[1, 0])
    flat = pool_tokens(h, mask, "flatten")
    assert flat.shape == (2, 15)
    torch.testing.assert_close(flat[0, :9], h[0, :3].flatten())
    assert flat[0, 9:].abs().sum() == 0
    torch.testing.assert_close(pool_tokens(h, None), h.mean(1))
    torch.testing.assert_close(
        pool_tokens(h, torch.zeros(2, 4, dtype=torch.bool)), h.mean(1)
    )  # shape mismatch: ignored
    with pytest.raises(ValueError, match="pooling='max' is not one of"):
        pool_tokens(h, None, "max")  # type: ignore[arg-type]


def test_correlations_known_answers():
    g = _gen(6)
    a = torch.randn(10, 6, generator=g)
    assert float(layer_correlation(a, a)) == pytest.approx(1.0)
    assert [float(c) for c in consecutive_correlations([a, a, a])] == pytest.approx([1.0, 1.0])
    assert consecutive_correlations([a, torch.randn(10, 4)]) == [None]
    # against scipy, flattened
    b = a + 0.5 * torch.randn(10, 6, generator=g)
    assert float(layer_correlation(a, b)) == pytest.approx(stats.pearsonr(a.flatten(), b.flatten())[0], abs=1e-6)
    assert float(layer_correlation(a, b, "spearman")) == pytest.approx(
        stats.spearmanr(a.flatten(), b.flatten())[0], abs=1e-6
    )
    # per sample: mean over rows of the correlation across features
    per_row = np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(10)])
    assert float(layer_correlation(a, b, mode="per_sample")) == pytest.approx(per_row, abs=1e-6)
    # a monotone non-linear map: Spearman is 1, Pearson is not
    e = torch.exp(3 * a)
    assert float(layer_correlation(a, e, "spearman")) == pytest.approx(1.0, abs=1e-6)
    assert float(layer_correlation(a, e, "pearson")) < 0.9
    with pytest.raises(ValueError, match="same shape"):
        layer_correlation(a, a[:, :3])
    with pytest.raises(ValueError, match="mode='rows' is not one of"):
        layer_correlation(a, a, mode="rows")  # type: ignore[arg-type]


def test_depth_pairs() -> None:
    assert depth_pairs(["embedding", "a", "b"], ["embedding", "x", "y", "z"]) == [(0, 0), (1, 1), (2, 2)]
    assert depth_pairs(["a", "b", "c"], ["embedding", "x", "y"]) == [(0, 1), (1, 2)]  # blocks pair by block index
    assert depth_pairs(["embedding"], ["x"]) == []


def test_compare_representations_against_the_pairwise_functions() -> None:
    g = _gen(9)
    e, b0 = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    b1 = torch.randn(12, 6, generator=g)  # another width: no correlation with b0
    r0, r1 = torch.randn(12, 4, generator=g), torch.randn(12, 6, generator=g)
    names, ref_names = ["embedding", "b0", "b1"], ["r0", "r1"]
    c = compare_representations([e, b0, b1], names, [r0, r1], ref_names, "flattened", unbiased=True)
    got = {(q, layer): float(v) for q, layer, v in c.values}
    assert c.mismatched == ["b1"]
    assert got.pop(("consecutive_corr", "b0")) == pytest.approx(stats.pearsonr(e.flatten(), b0.flatten())[0], abs=1e-6)
    assert got.pop(("cka_consecutive", "b0")) == pytest.approx(float(linear_cka(e, b0)), abs=1e-6)
    assert got.pop(("cka_consecutive", "b1")) == pytest.approx(float(linear_cka(b0, b1)), abs=1e-6)
    # no embedding in the reference: b0 pairs with r0, b1 with r1
    assert got.pop(("pearson_vs_reference", "b0")) == pytest.approx(float(layer_correlation(b0, r0)), abs=1e-9)
    assert got.pop(("spearman_vs_reference", "b0")) == pytest.approx(
        stats.spearmanr(b0.flatten(), r0.flatten())[0], abs=1e-6
    )
    assert got.pop(("pearson_vs_reference", "b1")) == pytest.approx(float(layer_correlation(b1, r1)), abs=1e-9)
    assert got.pop(("spearman_vs_reference", "b1")) == pytest.approx(float(layer_correlation(b1, r1, "spearman")))
    assert got.pop(("cka_vs_reference", "b0")) == pytest.approx(float(linear_cka(b0, r0)), abs=1e-6)
    assert got.pop(("cka_vs_reference", "b1")) == pytest.approx(float(linear_cka(b1, r1)), abs=1e-6)
    assert not got  # nothing else
    torch.testing.assert_close(c.matrix, cka_matrix([e, b0, b1]))
    torch.testing.assert_close(c.cross, cka_matrix([e, b0, b1], [r0, r1]))
    few = compare_representations([e[:3], b0[:3]], ["embedding", "b0"])  # 3 samples: no unbiased CKA
    assert few.matrix is None and [q for q, _, _ in few.values] == ["consecutive_corr"]
    biased = compare_representations([e[:3], b0[:3]], ["embedding", "b0"], unbiased=False)
    assert biased.matrix is not None and [q for q, _, _ in biased.values] == ["consecutive_corr", "cka_consecutive"]


def test_doctests() -> None:
    assert doctest.testmod(representation, raise_on_error=False).failed == 0


def test_sample_labels_takes_one_class_per_sample_and_names_any_other_shape() -> None:
    assert sample_labels(torch.tensor([3, 1, 2]), 3).tolist() == [3, 1, 2]
    assert sample_labels(torch.tensor([True, False]), 2).tolist() == [1, 0]
    assert sample_labels(torch.tensor([[1.0], [0.0], [1.0]]), 3).tolist() == [1, 0, 1]  # BCE targets [B, 1]
    with pytest.raises(RuntimeError, match="needs labels"):
        sample_labels(None, 3)
    with pytest.raises(ValueError, match=r"shape \[3\] \(not integer class labels\)"):
        sample_labels(torch.tensor([0.2, 1.0, 0.0]), 3)  # regression targets
    with pytest.raises(ValueError, match=r"shape \[3, 4\] \(one-hot or soft labels\)"):
        sample_labels(torch.rand(3, 4), 3)
    with pytest.raises(ValueError, match=r"shape \[3, 1, 1\] \(token-level labels"):
        sample_labels(torch.zeros(3, 1, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"shape \[6\] \(not one per sample\)"):
        sample_labels(torch.arange(6), 3)
    with pytest.raises(ValueError, match=r"^MyProbe needs one class label per sample \(\[2\] or \[2, 1\]"):
        sample_labels(torch.zeros(2, 7, dtype=torch.long), 2, who="MyProbe")
