"""Gradient norms against Lightning's own grad_norm utility."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities import grad_norm
from torch import nn

from pdelightning.analysis.gradients import grouped_norms, segment_norms, tensor_norms, update_ratio


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    m(torch.randn(11, 5)).square().sum().backward()
    return m


@pytest.mark.parametrize("ord", [1, 2])
def test_tensor_and_total_norms_match_lightning(model: nn.Module, ord: int) -> None:
    ref = grad_norm(model, ord)
    names = [n for n, _ in model.named_parameters()]
    grads = [p.grad for p in model.parameters()]
    norms = tensor_norms(grads, ord)
    for name, value in zip(names, norms, strict=True):
        assert float(value) == pytest.approx(float(ref[f"grad_{float(ord)}_norm/{name}"]), rel=1e-6)
    total = grouped_norms(grads, torch.zeros(len(grads), dtype=torch.long), 1, ord)
    assert float(total[0]) == pytest.approx(float(ref[f"grad_{float(ord)}_norm_total"]), rel=1e-6)


def test_groups_are_norms_of_the_concatenation(model: nn.Module) -> None:
    grads = [p.grad for p in model.parameters()]  # 0.weight, 0.bias, 2.weight, 2.bias
    groups = torch.tensor([0, 0, 1, 1])
    per_layer = grouped_norms(grads, groups, 2)
    for k, (a, b) in enumerate([(0, 1), (2, 3)]):
        assert float(per_layer[k]) == pytest.approx(float(torch.cat([grads[a].flatten(), grads[b].flatten()]).norm()))
    assert segment_norms(torch.tensor([3.0, 4.0]), torch.tensor([0, 0]), 1).tolist() == [5.0]  # sqrt(9 + 16)


def test_update_ratio_by_hand() -> None:
    before, after = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])], [torch.tensor([3.0, 4.0]), torch.tensor([1.5])]
    # group 0: no change; group 1: |1.5 - 1| / |1| = 0.5
    assert update_ratio(before, after, torch.tensor([0, 1]), 2).tolist() == [0.0, 0.5]
