"""The gradient norms GradientFlow logs, against torch.linalg by hand (moved here from tests/callbacks/)."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from pdelightning.analysis import gradients
from pdelightning.analysis.gradients import (
    gradient_norms,
    group_parameters,
    grouped_norms,
    param_group_members,
    update_ratio,
)


def test_grouped_norms_match_vector_norm() -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(s, generator=g) for s in [(3, 4), (5,), (2, 2, 2), (7,), (1,)]]
    groups = torch.tensor([0, 2, 0, 2, 1])
    l2 = grouped_norms(tensors, groups, 4)
    l1 = grouped_norms(tensors, groups, 4, ord=1)
    for k in range(3):
        members = torch.cat([t.flatten() for t, gi in zip(tensors, groups.tolist(), strict=True) if gi == k])
        assert l2[k] == pytest.approx(float(torch.linalg.vector_norm(members)), rel=1e-6)
        assert l1[k] == pytest.approx(float(members.abs().sum()), rel=1e-6)
    assert l2[3] == 0 and l1[3] == 0  # empty group
    with pytest.raises(ValueError, match="ord=3"):
        grouped_norms(tensors, groups, 4, ord=3)


def test_update_ratio() -> None:
    before = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    after = [torch.tensor([3.0, 4.5]), torch.tensor([2.0])]
    assert update_ratio(before, after, torch.tensor([0, 1]), 2).tolist() == pytest.approx([0.1, 1.0])


def test_gradient_norms_per_layer_and_per_param_group() -> None:
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g) for s in [(4, 3), (3,), (2, 5), (5,)]]
    layer = torch.tensor([0, 0, 1, 1])
    members, member_groups = torch.tensor([3, 0, 2]), torch.tensor([0, 0, 1])  # grads[1] is in no param group
    l2, l1, pg = gradient_norms(grads, layer, 2, members, member_groups, 2)
    for k in range(2):
        flat = torch.cat([t.flatten() for t, i in zip(grads, layer.tolist(), strict=True) if i == k])
        assert float(l2[k]) == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-6)
        assert float(l1[k]) == pytest.approx(float(flat.abs().sum()), rel=1e-6)
    assert float(pg[0]) == pytest.approx(float(torch.cat([grads[3], grads[0].flatten()]).norm()), rel=1e-6)
    assert float(pg[1]) == pytest.approx(float(grads[2].norm()), rel=1e-6)


def test_param_group_members_skips_groups_without_gradients() -> None:
    a, b, c, d = (nn.Parameter(torch.zeros(i + 1)) for i in range(4))
    groups = [{"params": [d]}, {"params": [c, a]}, {"params": [b]}]
    names, members, index = param_group_members(groups, [a, b, c])  # d has no gradient
    assert names == [1, 2]
    assert members.tolist() == [2, 0, 1] and index.tolist() == [0, 0, 1]


def test_group_parameters_of_a_sequential() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    groups = group_parameters(net, [("2", net[2]), ("4", net[4])], None)
    assert groups.names == ["2", "4", "embedding", "other"]  # net.0 before the first layer, net.3 in between
    owner = [groups.names[i] for i in groups.index]
    assert owner == ["embedding", "embedding", "2", "2", "other", "other", "4", "4"]


def test_doctests() -> None:
    assert doctest.testmod(gradients, raise_on_error=False).failed == 0
