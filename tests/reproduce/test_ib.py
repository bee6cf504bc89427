"""The reproduction's I(T;Y) bounds (issue 18, item 2): keys, values and one forward pass of a real model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from pdelightning.analysis.ib_bound import crossfit_bound, head_bound
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning_reproduce import ib
from pdelightning_reproduce.summary import rows_from


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small problems: one torch and one BLAS thread (on a busy machine more threads only wait on each other)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def _planted(n: int = 300, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """blocks.0 carries the label (3 well-separated classes), blocks.1 is noise; the head is right 90 % of the time."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    informative = 3.0 * torch.eye(3, dtype=torch.float64)[y] + torch.randn(n, 3, generator=g, dtype=torch.float64)
    pooled = {
        "embedding": torch.randn(n, 3, generator=g, dtype=torch.float64),
        "blocks.0": informative,
        "blocks.1": torch.randn(n, 8, generator=g, dtype=torch.float64),
    }
    flip = torch.rand(n, generator=g) < 0.1
    logits = 4.0 * torch.eye(3)[torch.where(flip, (y + 1) % 3, y)]
    return pooled, logits, y


def test_keys_and_values_match_the_library_with_the_registered_settings() -> None:
    pooled, logits, y = _planted()
    v = ib.ib_values_from(pooled, logits, y, n_classes=3)
    assert set(v) == set(ib.ITY_LAYER_KEYS) | set(ib.ITY_SCALAR_KEYS) and set(ib.DEFINITIONS) == set(v)
    for key in ib.ITY_LAYER_KEYS:
        assert list(v[key]) == ["blocks.0", "blocks.1"]  # the embedding is skipped, like I_TY
    ref = crossfit_bound(pooled["blocks.0"], y, folds=5, inner_folds=4, probe="lda", alpha=0.05, seed=0, n_classes=3)
    assert v["I_TY_lower"]["blocks.0"] == ref.estimate and v["I_TY_lower_lcb"]["blocks.0"] == ref.lower
    assert ib.bound_status(v["I_TY_lower_lcb"]["blocks.0"], v["I_TY_lower_ucb"]["blocks.0"]) == "informative"
    noise = v["I_TY_lower_lcb"]["blocks.1"], v["I_TY_lower_ucb"]["blocks.1"]
    assert ib.bound_status(*noise) == "inconclusive"
    head = head_bound(logits, y, folds=5)
    assert v["I_TY_head"] == head.estimate and v["I_TY_head_lcb"] == head.lower
    # by hand: the head gives its pick e^4 / (e^4 + 2) = 0.9647 and each other class 1 / (e^4 + 2), floored at 1e-4
    right = (y == logits.argmax(1)).double()
    q_pick, q_other = [(q + 1e-4) / (1 + 3e-4) for q in (math.e**4 / (math.e**4 + 2), 1 / (math.e**4 + 2))]
    ce = -float((right * math.log2(q_pick) + (1 - right) * math.log2(q_other)).mean())
    assert v["I_TY_head"] == pytest.approx(head.h_y - ce, abs=1e-9)
    # the head is over-confident (it is right 90 %, not 96.5 %): tempering helps, up to I(logits;Y), which with
    # uniform Y and a pick right 0.9 / wrong 0.05 + 0.05 is log2 3 - (0.9 log2(1/0.9) + 0.1 log2 20) = 1.016 bits
    assert v["I_TY_head"] < v["I_TY_head_calibrated"] and v["I_TY_head_calibrated_lcb"] < 1.016
    rows = rows_from("newsgroups_pde", "", 0, 100, "final", v)
    assert {r.quantity for r in rows} == set(ib.DEFINITIONS)
    assert all(r.layer in ("", "blocks.0", "blocks.1") for r in rows)


def test_non_finite_representations_give_nan_not_an_error() -> None:
    pooled, logits, y = _planted(60)
    pooled["blocks.1"] = pooled["blocks.1"].clone()
    pooled["blocks.1"][0, 0] = math.inf
    v = ib.ib_values_from(pooled, logits, y, 3, layers=["blocks.1"])
    assert math.isnan(v["I_TY_lower"]["blocks.1"]) and math.isnan(v["I_TY_lower_lcb"]["blocks.1"])
    assert math.isfinite(v["I_TY_head"])


@pytest.mark.parametrize("cls", [TransformerClassifier, PDEClassifier])
def test_ib_values_runs_one_forward_pass_of_our_models(cls: type) -> None:
    torch.manual_seed(0)
    kw = {"d_ff": 8} if cls is PDEClassifier else {}
    model = cls(num_classes=3, d_model=16, n_layers=2, n_heads=2, image_size=8, **kw).eval()
    y = torch.arange(60) % 3
    x = torch.rand(60, 8, 8) + y[:, None, None] * 0.5
    pdata = SimpleNamespace(x=x, y=y, pad_id=0, num_classes=3)
    v = ib.ib_values(model, pdata)
    assert list(v["I_TY_lower"]) == ["blocks.0", "blocks.1"]
    with torch.no_grad():
        logits = model(x)
    assert v["I_TY_head"] == pytest.approx(head_bound(logits, y).estimate, abs=1e-5)
    assert all(math.isfinite(x) for x in v["I_TY_lower_lcb"].values())
