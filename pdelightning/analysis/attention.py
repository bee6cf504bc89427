"""Attention-map comparison: per-row similarities, divergences, head matching and skill scores (paper §3.2).

Attention rows are probability vectors over the keys (the last axis). These functions compare two models'
attention maps per query row (:func:`attention_cosine`, :func:`attention_kl`, :func:`attention_js`,
:func:`attention_entropy`), reduce over valid rows (:func:`masked_row_mean`, :func:`pairwise_head_sums`),
pair heads by the Hungarian method (:func:`match_heads`, :func:`summarize_pairs`), build null baselines
(:func:`uniform_attention`, :func:`derangement`) and score agreement against a null (:func:`skill_score`,
:func:`skill_margin`).
:class:`~pdelightning.callbacks.AttentionSimilarity` is the Lightning adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MATCH_BY = ("cosine", "js")


METRICS = ("cosine", "kl", "js")


def attention_cosine(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of each attention row (last axis): ``<p, q> / (|p| |q|)``, in [0, 1] for probabilities.

    Example::

        >>> attention_cosine(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        tensor([1.0000, 0.7071])
    """
    return (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1)).clamp_min(eps)


def attention_kl(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """``KL(p || q) = sum_k p_k ln(p_k / max(q_k, eps))`` per row, in nats; ``0 ln 0 = 0``.

    ``p`` is the model's attention, ``q`` the reference's (the direction used throughout this module). The
    guard ``eps`` bounds the penalty for a key the reference ignores (``q_k = 0``) at ``p_k ln(p_k / eps)``.

    Example::

        >>> round(float(attention_kl(torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75]))), 4)  # ½ln2 + ½ln⅔
        0.1438
    """
    return (torch.xlogy(p, p) - p * q.clamp_min(eps).log()).sum(-1)


def attention_js(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence per row in nats: ``½ KL(p||m) + ½ KL(q||m)``, ``m = (p + q) / 2``; in [0, ln 2].

    Symmetric and finite without any guard (``m_k >= p_k / 2``). Divide by ``ln 2`` for bits.

    Example::

        >>> round(float(attention_js(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))), 6) == round(math.log(2), 6)
        True
    """
    m = 0.5 * (p + q)
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return js.clamp_min(0.0)


def attention_entropy(p: Tensor) -> Tensor:
    """Shannon entropy of each attention row, ``-sum_k p_k ln p_k`` in nats (``ln T`` for uniform rows).

    Example::

        >>> round(float(attention_entropy(torch.full((4,), 0.25))), 4) == round(math.log(4), 4)
        True
    """
    return -torch.xlogy(p, p).sum(-1)


def masked_row_mean(values: Tensor, row_mask: Tensor | None) -> Tensor:
    """Mean of per-row values ``[B, ..., T]`` over the rows where ``row_mask`` ``[B, T]`` is ``True``.

    Rows of padded queries are excluded; every valid row of the batch weighs the same. This is the
    "per query row, then averaged" reduction, never a metric of flattened tensors.

    Example::

        >>> masked_row_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]]))
        tensor(2.)
    """
    if row_mask is None:
        return values.mean()
    mask = row_mask.reshape(row_mask.shape[0], *([1] * (values.dim() - 2)), row_mask.shape[-1]).expand_as(values)
    return values[mask].mean()


def uniform_attention(valid: Tensor) -> Tensor:
    """Uniform attention over the valid keys: ``[B, 1, T, T]`` with rows ``valid / #valid`` (``valid``: ``[B, T]``).

    Example::

        >>> uniform_attention(torch.tensor([[True, True, False]]))[0, 0, 0]
        tensor([0.5000, 0.5000, 0.0000])
    """
    v = valid.float()
    row = v / v.sum(-1, keepdim=True).clamp_min(1.0)
    return row[:, None, None, :].expand(-1, 1, valid.shape[-1], -1)


def uniform_over_support(r: Tensor) -> Tensor:
    """Uniform attention ``[B, 1, Q, K]`` over the keys the reference may attend (any head puts mass there).

    For a padded batch that is the valid keys; for a causal model, the valid keys up to the query.

    Example::

        >>> r = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])
        >>> uniform_over_support(r)[0, 0, 1].tolist()
        [0.5, 0.5, 0.0]
    """
    support = (r > 0).any(1, keepdim=True).float()
    return support / support.sum(-1, keepdim=True).clamp_min(1.0)


class Rows(NamedTuple):
    """An attention tensor with the per-row quantities every comparison of it reuses (made by :func:`rows_of`).

    Attributes:
        probs: the probabilities ``[B, H, T, K]``.
        norm: ``|x|`` of each row ``[B, H, T]``.
        x_log_x: ``Σ_k x ln x`` of each row ``[B, H, T]`` (``-`` :func:`attention_entropy`).
        keys: for a reference (``q`` of :func:`head_pair_sums`), the probabilities beside ``ln max(x, eps)``, keys
            first for one matrix product: ``[B, T, K, 2H]``; ``None`` for a model side.
    """

    probs: Tensor
    norm: Tensor
    x_log_x: Tensor
    keys: Tensor | None = None

    def take(self, index: Tensor) -> Rows:
        """The same rows for the samples ``index`` (e.g. each sample's shuffled-null partner)."""
        return Rows(*(x[index] if x is not None else None for x in self))


def rows_of(x: Tensor, eps: float | None = None, x_log_x: Tensor | None = None) -> Rows:
    """:class:`Rows` of the attention ``x`` ``[B, H, T, K]``; with ``eps`` also the reference side's ``keys``.

    Args:
        x: attention probabilities.
        eps: the KL guard of :func:`attention_kl` (``None``: ``x`` is only ever the model side ``p``).
        x_log_x: ``Σ_k x ln x`` when the caller has it already.
    """
    x_log_x = torch.xlogy(x, x).sum(-1) if x_log_x is None else x_log_x
    keys = None if eps is None else torch.cat([x, x.clamp_min(eps).log()], 1).permute(0, 2, 3, 1).contiguous()
    return Rows(x, x.norm(dim=-1), x_log_x, keys)


def head_pair_sums(p: Rows, q: Rows, row_mask: Tensor) -> dict[str, Tensor]:
    """Per-sample sums over valid query rows of cosine, KL(p||q) and JS for every pair of heads.

    The same per-row quantities as :func:`attention_cosine`, :func:`attention_kl` (with the guard ``eps`` that made
    ``q``'s :class:`Rows`) and :func:`attention_js`, computed for all head pairs at once: the dot products and
    ``Σ p ln q`` as one matrix product against ``q.keys``, the norms and ``Σ x ln x`` per head (made once per tensor,
    however many comparisons use it), and JS as ``½ Σ p ln p + ½ Σ q ln q − Σ m ln m`` with ``m = (p + q)/2`` (the
    only term that needs the pair, one head of ``p`` at a time).

    Args:
        p: the model side, :func:`rows_of` of ``[B, Hp, T, K]``.
        q: the reference side, :func:`rows_of` of ``[B, Hq, T, K]`` with ``eps``.
        row_mask: ``[B, T]``, ``True`` for the query rows to count.

    Returns:
        ``{"cosine", "kl", "js": [B, Hp, Hq]}``; divide by ``row_mask.sum()`` (over the samples you pool)
        for the mean over rows. Memory is ``O(B Hp Hq T + B Hq T K)``.
    """
    assert q.keys is not None, "the reference side needs rows_of(q, eps)"
    hq = q.probs.shape[1]
    w = row_mask.to(p.probs.dtype)[:, None, None, :]  # (B, 1, 1, T)
    both = (p.probs.transpose(1, 2) @ q.keys).permute(0, 2, 3, 1)  # (B, Hp, 2 Hq, T): <p, q> and <p, ln q>
    cosine = both[:, :, :hq] / (p.norm[:, :, None] * q.norm[:, None]).clamp_min(1e-12)
    kl = p.x_log_x[:, :, None] - both[:, :, hq:]
    m_log_m = torch.stack(
        [
            m.xlogy_(m).sum(-1)
            for m in (torch.add(p.probs[:, h : h + 1], q.probs).mul_(0.5) for h in range(p.probs.shape[1]))
        ],
        dim=1,
    )  # (B, Hp, Hq, T)
    js = (0.5 * p.x_log_x[:, :, None] + 0.5 * q.x_log_x[:, None] - m_log_m).clamp_min(0.0)
    return {"cosine": (cosine * w).sum(-1), "kl": (kl * w).sum(-1), "js": (js * w).sum(-1)}


def pairwise_head_sums(
    p: Tensor,
    q: Tensor,
    row_mask: Tensor,
    eps: float = 1e-8,
    *,
    p_log_p: Tensor | None = None,
    q_log_q: Tensor | None = None,
) -> dict[str, Tensor]:
    """:func:`head_pair_sums` of two attention tensors ``[B, Hp, T, K]`` and ``[B, Hq, T, K]``.

    Args:
        p: attention probabilities of the model.
        q: attention probabilities of the reference.
        row_mask: ``[B, T]``, ``True`` for the query rows to count.
        eps: the KL guard of :func:`attention_kl`.
        p_log_p: ``Σ_k p log p`` per row, ``[B, Hp, T]`` (``-attention_entropy(p)``), when the caller has it already;
            computed when ``None``.
        q_log_q: likewise for ``q``, ``[B, Hq, T]``.

    Returns:
        ``{"cosine", "kl", "js": [B, Hp, Hq]}`` per-sample sums over the valid rows.
    """
    return head_pair_sums(rows_of(p, x_log_x=p_log_p), rows_of(q, eps, x_log_x=q_log_q), row_mask)


def match_heads(score: Tensor, maximize: bool = True) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one pairing of model heads (rows) with reference heads (columns), the Hungarian method.

    Head order is arbitrary (any permutation of heads is the same model), so heads are paired to maximise the
    summed similarity (or minimise the summed divergence) with ``scipy.optimize.linear_sum_assignment``.
    With ``Hp != Hq`` heads, ``min(Hp, Hq)`` pairs are formed.

    Returns:
        ``(rows, cols)`` index tensors; ``score[rows, cols]`` are the matched pairs.

    Example::

        >>> match_heads(torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
        (tensor([0, 1]), tensor([1, 0]))
    """
    rows, cols = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=maximize)
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


SKILL_MIN_ROOM = 0.05
"""The least room a null must leave for :func:`skill_score` to be reported (cosine units, or nats for KL/JS)."""


def skill_score(value: float, null: float, higher_is_better: bool = True, min_room: float = 0.0) -> float:
    """Improvement over a null baseline as a fraction of the way to perfect agreement.

    ``(s - s_null) / (1 - s_null)`` for a similarity (perfect = 1), ``(d_null - d) / d_null`` for a divergence
    (perfect = 0). 1: perfect; 0: no better than the null; negative: worse. ``nan`` when the null leaves less
    than ``min_room`` (``1 - s_null`` or ``d_null``) between itself and perfect agreement, or either value is
    ``nan``.

    **The floor.** The denominator is the room the null leaves, and the skill's sensitivity to either input is
    ``1 / room``. When the reference attends almost uniformly (the default reference, the model at
    initialisation) the uniform null scores cosine ≈ 0.989 and KL ≈ 0.011 nats: the room is ~0.011, a cosine
    difference of 0.01 already moves the skill by ~0.9, and a model that merely attends more sharply than
    its near-uniform reference (cosine 0.76) reads as a skill of -21 (KL skill -27), numbers that describe how
    close the null is to perfect, not the model (``tests/analysis/test_attention.py`` reproduces this). With
    ``min_room=`` :data:`SKILL_MIN_ROOM` ``= 0.05`` the sensitivity is at most 20 (an error of 0.005 in either
    value moves the skill by at most 0.1) and below that room the skill is ``nan``: too little lies between
    the null and perfect agreement for a fraction of it to mean anything. ``min_room=0`` (the default, kept
    for backward compatibility) only excludes a perfect null.

    **Which to read.** The skill when it is finite: a scale-free fraction, comparable across layers, metrics
    and training time. :func:`skill_margin` always: the raw distance by which the model beats the null, in the
    metric's own units (cosine, nats), defined whatever the null scores; it is the number to read while the
    skill is ``nan`` (near-uniform reference, early training), and its sign says the same as the skill's.

    Args:
        value: the model's score against the reference.
        null: the null baseline's score against the same reference.
        higher_is_better: ``True`` for a similarity in ``[0, 1]`` (cosine), ``False`` for a divergence (KL, JS).
        min_room: the least room (``1 - null`` or ``null``) for which a skill is returned.

    Example::

        >>> round(skill_score(0.99, 0.98), 6), round(skill_score(0.01, 0.04, higher_is_better=False), 6)
        (0.5, 0.75)
        >>> skill_score(0.99, 0.98, min_room=SKILL_MIN_ROOM)  # the null leaves only 0.02
        nan
    """
    room = (1.0 - null) if higher_is_better else null
    if not (math.isfinite(value) and math.isfinite(null)) or room <= max(min_room, 1e-12):
        return float("nan")
    return ((value - null) if higher_is_better else (null - value)) / room


def skill_margin(value: float, null: float, higher_is_better: bool = True) -> float:
    """How far the model beats the null, in the metric's own units: ``s - s_null``, or ``d_null - d``.

    Positive: better than the null; ``0``: no better; negative: worse. Unlike :func:`skill_score` it needs no
    room between the null and perfect agreement, so it is defined (and small errors stay small) when the null
    is near perfect; read it beside the skill, and instead of it where the skill is ``nan``.

    Example::

        >>> round(skill_margin(0.76, 0.988), 3), round(skill_margin(0.01, 0.04, higher_is_better=False), 3)
        (-0.228, 0.03)
    """
    if not (math.isfinite(value) and math.isfinite(null)):
        return float("nan")
    return (value - null) if higher_is_better else (null - value)


def summarize_pairs(sums: Mapping[str, Tensor], rows: Tensor, match_by: str = "cosine") -> dict[str, Any]:
    """Pool per-sample pair sums over the probe set, match heads and return matched means.

    Args:
        sums: ``{"cosine", "kl", "js": [N, Hp, Hq]}`` per-sample sums over valid rows (:func:`pairwise_head_sums`).
        rows: ``[N]`` number of valid rows of each sample.
        match_by: ``"cosine"`` (maximise) or ``"js"`` (minimise) for the head matching.

    Returns:
        ``{"cosine", "kl", "js": float}`` over matched head pairs, ``"cosine_unmatched"`` (head ``i`` with head
        ``i``), ``"matching": (rows, cols)`` and the pooled ``[Hp, Hq]`` matrices under ``"matrix"``.
    """
    n = rows.sum().clamp_min(1).to(torch.float64)
    mean = {m: sums[m].sum(0).double() / n for m in METRICS}
    r, c = match_heads(mean[match_by], maximize=match_by == "cosine")
    k = min(mean["cosine"].shape)
    return {
        **{m: float(mean[m][r, c].mean()) for m in METRICS},
        "cosine_unmatched": float(torch.diagonal(mean["cosine"])[:k].mean()),
        "matching": (r, c),
        "matrix": mean,
    }


def derangement(n: int, seed: int) -> Tensor:
    """A seeded permutation of ``range(n)`` with no fixed point (one random cycle); ``n >= 2``.

    Example::

        >>> bool((derangement(5, 0) != torch.arange(5)).all())
        True
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner
