"""Skill scores with a floor on the room the null leaves, and the raw margin (issue 12, defect 4)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from pdelightning.analysis import attention
from pdelightning.analysis.attention import (
    SKILL_MIN_ROOM,
    attention_cosine,
    attention_kl,
    skill_margin,
    skill_score,
    uniform_attention,
)


def test_issue_reproduction_skill_explodes_against_a_near_uniform_reference() -> None:
    """The default reference (the model at initialisation) attends almost uniformly: the uniform null scores cosine
    0.989 against it. A model that merely attends more sharply scores cosine 0.757; its skill was -21.6 (KL -27)."""
    g = torch.Generator().manual_seed(0)
    n, h, t = 256, 4, 28  # probe set, heads, MNIST rows as tokens
    reference = torch.softmax(0.15 * torch.randn(n, h, t, t, generator=g), -1)  # near uniform
    model = torch.softmax(0.8 * torch.randn(n, h, t, t, generator=g), -1)  # sharper, unrelated
    u = uniform_attention(torch.ones(n, t, dtype=torch.bool))
    cos, cos_null = float(attention_cosine(model, reference).mean()), float(attention_cosine(u, reference).mean())
    kl, kl_null = float(attention_kl(model, reference).mean()), float(attention_kl(u, reference).mean())
    assert cos_null == pytest.approx(0.989, abs=1e-3) and cos == pytest.approx(0.757, abs=1e-3)
    # before: no floor (min_room=0, the old behaviour) -> the ratio explodes
    before = skill_score(cos, cos_null)
    assert before == pytest.approx((cos - cos_null) / (1 - cos_null)) and before < -20
    assert skill_score(kl, kl_null, higher_is_better=False) < -25
    # after: the null leaves 0.011 < 0.05 of room -> no skill; the margin is reported instead
    assert math.isnan(skill_score(cos, cos_null, min_room=SKILL_MIN_ROOM))
    assert math.isnan(skill_score(kl, kl_null, higher_is_better=False, min_room=SKILL_MIN_ROOM))
    assert skill_margin(cos, cos_null) == pytest.approx(cos - cos_null) == pytest.approx(-0.232, abs=1e-3)
    assert skill_margin(kl, kl_null, higher_is_better=False) == pytest.approx(kl_null - kl)


def test_floor_keeps_skills_where_the_null_leaves_room() -> None:
    assert SKILL_MIN_ROOM == 0.05
    assert skill_score(0.9, 0.8, min_room=SKILL_MIN_ROOM) == pytest.approx(0.5)  # room 0.2
    assert skill_score(0.96, 0.94, min_room=SKILL_MIN_ROOM) == pytest.approx(1 / 3)  # room 0.06
    assert math.isnan(skill_score(0.97, 0.96, min_room=SKILL_MIN_ROOM))  # room 0.04
    assert skill_score(0.05, 0.1, higher_is_better=False, min_room=SKILL_MIN_ROOM) == pytest.approx(0.5)
    assert math.isnan(skill_score(0.01, 0.04, higher_is_better=False, min_room=SKILL_MIN_ROOM))
    # the sensitivity to an error in either value is at most 1 / min_room = 20
    for null in (0.5, 0.9, 0.95 - 1e-9):
        delta = skill_score(0.9 + 1e-3, null, min_room=SKILL_MIN_ROOM) - skill_score(0.9, null, min_room=SKILL_MIN_ROOM)
        assert abs(delta) <= 20 * 1e-3 + 1e-9


def test_margin_and_skill_agree_in_sign_and_handle_nan() -> None:
    for value, null in [(0.9, 0.8), (0.7, 0.8), (0.8, 0.8)]:
        m, s = skill_margin(value, null), skill_score(value, null)
        assert math.copysign(1, m) == math.copysign(1, s) or m == s == 0
    assert math.isnan(skill_margin(float("nan"), 0.5)) and math.isnan(skill_score(0.5, float("nan")))


def test_doctests() -> None:
    assert doctest.testmod(attention, raise_on_error=False).failed == 0
