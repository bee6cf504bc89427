"""Attention similarity of every compared layer at once: the per-sample sums and the per-layer summary (paper §3.2).

:class:`~pdelightning.callbacks.AttentionSimilarity` compares the model's attention with a reference's layer by
layer, against three nulls (section 3.2.3's "cosine similarity 0.9870, KL 0.0144", with the nulls that say what such
numbers are worth). :func:`compare_layer` makes every per-sample sum of one layer pair (the reference's row
quantities once, for all four comparisons), :func:`compare_layers` the same for all layer pairs with the pairs of
one shape stacked into one call, and :func:`summarize_layer` turns a layer's gathered sums into its matched means,
nulls, skills and margins. The per-row metrics, the head matching and the skill score are in
:mod:`pdelightning.analysis.attention`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from pdelightning.analysis.attention import (
    METRICS,
    SKILL_MIN_ROOM,
    head_pair_sums,
    rows_of,
    skill_score,
    summarize_pairs,
    uniform_over_support,
)


def compare_layer(
    p: Tensor,
    r: Tensor,
    valid: Tensor,
    eps: float,
    *,
    null: Tensor | None = None,
    partner: Tensor | None = None,
    uniform: bool = True,
) -> dict[str, Tensor]:
    """Everything :class:`~pdelightning.callbacks.AttentionSimilarity` sums per probe sample for one layer pair.

    The model's attention ``p`` against the reference's ``r`` (``main``), the uniform null
    (:func:`uniform_over_support`) against ``r`` (``uniform``, one head), a null model's attention against ``r``
    (``random_init``, when ``null`` is given) and ``p`` against the reference on each sample's partner
    (``shuffled``, when ``partner`` is given: rows valid in both; ``-1``: no partner), each as the per-sample
    :func:`head_pair_sums`, plus the rows counted and the entropies. The reference's row quantities are made once.

    Args:
        p: the model's attention ``[B, Hp, T, K]`` (float).
        r: the reference's attention ``[B, Hq, T, K]``.
        valid: ``[B, T]`` the query rows to count.
        eps: the KL guard.
        null: the null model's attention ``[B, Hn, T, K]``.
        partner: ``[B]`` the row of each sample's shuffled-null partner in this batch, ``-1`` for none.
        uniform: compare the uniform null.

    Returns:
        ``{"rows": [B], "rows_shuffled": [B], "entropy": [B], "entropy_reference": [B],
        "<comparison>/<metric>": [B, Hp, Hq]}`` (``uniform/<metric>``: ``[B, Hq]``); the entropies are summed over
        the valid rows and averaged over heads.
    """
    pr, rr = rows_of(p), rows_of(r, eps)
    w = valid.float()[:, None, :]
    out = {
        "rows": valid.sum(-1),
        "entropy": -(pr.x_log_x * w).sum((-1, -2)) / p.shape[1],
        "entropy_reference": -(rr.x_log_x * w).sum((-1, -2)) / r.shape[1],
    }
    out |= {f"main/{m}": v for m, v in head_pair_sums(pr, rr, valid).items()}
    if uniform:
        sums = head_pair_sums(rows_of(uniform_over_support(r)), rr, valid)
        out |= {f"uniform/{m}": v[:, 0] for m, v in sums.items()}
    if null is not None:
        out |= {f"random_init/{m}": v for m, v in head_pair_sums(rows_of(null), rr, valid).items()}
    if partner is None:
        out["rows_shuffled"] = torch.zeros_like(out["rows"])
        return out
    j = partner.clamp_min(0)
    both = valid & valid[j] & (partner >= 0)[:, None]
    out["rows_shuffled"] = both.sum(-1)
    out |= {f"shuffled/{m}": v for m, v in head_pair_sums(pr, rr.take(j), both).items()}
    return out


def compare_layers(
    p: Sequence[Tensor],
    r: Sequence[Tensor],
    valid: Sequence[Tensor],
    eps: float,
    *,
    null: Sequence[Tensor] | None = None,
    partner: Tensor | None = None,
    uniform: bool = True,
    max_elements: int = 1 << 20,
) -> list[dict[str, Tensor]]:
    """:func:`compare_layer` of several layer pairs on the same samples, the same numbers in fewer operations.

    Layer pairs of one shape are stacked along the batch axis (at most ``max_elements`` attention probabilities of
    the stacked tensors at once) and compared in one call: every quantity is per sample, so stacking changes no
    value, only how many operations run. Small layers gain (quickstart: 4 layers of ``[64, 4, 8, 8]`` in one call);
    large ones are compared one at a time (stacking them only moves the working set out of the cache: 10 MNIST
    layers of ``[64, 4, 28, 28]`` stacked took 1.2x as long on one CPU thread).

    Args:
        p: the model's attention of each layer pair, ``[B, Hp, T, K]`` (float).
        r: the reference's attention of each pair.
        valid: ``[B, T]`` the query rows to count, of each pair.
        eps: the KL guard.
        null: the null model's attention of each pair.
        partner: ``[B]`` each sample's shuffled-null partner row, ``-1`` for none.
        uniform: compare the uniform null.
        max_elements: the most elements of ``p``, ``r`` and ``null`` stacked into one call.

    Returns:
        :func:`compare_layer`'s dictionary for each pair, in order.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(len(p)):
        groups.setdefault((p[i].shape, r[i].shape, None if null is None else null[i].shape), []).append(i)
    out: dict[int, dict[str, Tensor]] = {}
    b = valid[0].shape[0] if len(valid) else 0
    for members in groups.values():
        i = members[0]
        size = p[i].numel() + 3 * r[i].numel() + (0 if null is None else null[i].numel())  # r: with its log too
        step = max(1, max_elements // size)
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            k = len(chunk)
            stacked_partner = None
            if partner is not None:  # sample s of layer l sits at row l * B + s
                shift = torch.arange(k, device=partner.device).repeat_interleave(b) * b
                stacked_partner = torch.where(partner.repeat(k) >= 0, partner.repeat(k) + shift, -1)
            sums = compare_layer(
                torch.cat([p[j] for j in chunk]),
                torch.cat([r[j] for j in chunk]),
                torch.cat([valid[j] for j in chunk]),
                eps,
                null=None if null is None else torch.cat([null[j] for j in chunk]),
                partner=stacked_partner,
                uniform=uniform,
            )
            for n, j in enumerate(chunk):
                out[j] = {key: v[n * b : (n + 1) * b] for key, v in sums.items()}
    return [out[i] for i in range(len(p))]


def summarize_layer(
    sums: Mapping[str, Tensor], match_by: str = "cosine", uniform: bool = True, min_room: float = SKILL_MIN_ROOM
) -> dict[str, Any]:
    """One layer's results over the whole probe set from the gathered per-sample sums of :func:`compare_layer`.

    The matched means of each comparison (:func:`summarize_pairs`), the nulls present (``uniform`` when asked,
    ``shuffled`` and ``random_init`` when their sums are there), the skill (:func:`skill_score`) and raw margin
    against the strongest null (highest cosine, lowest KL/JS) and the mean entropies per valid row.

    Args:
        sums: ``{"rows", "rows_shuffled", "entropy", "entropy_reference", "<comparison>/<metric>"}`` summed per
            sample (:func:`compare_layer`'s keys), gathered over the probe set.
        match_by: the head-matching criterion, ``"cosine"`` or ``"js"``.
        uniform: include the uniform null.
        min_room: the least room a null must leave for a skill (:data:`SKILL_MIN_ROOM`).

    Returns:
        ``{metric, "cosine_unmatched", "<metric>_null_<null>", "<metric>_skill", "<metric>_margin", "entropy",
        "entropy_reference": float, "rows": int, "matching", "matrix"}``.
    """
    rows = sums["rows"]
    n = rows.sum().clamp_min(1).double()
    main = summarize_pairs({m: sums[f"main/{m}"] for m in METRICS}, rows, match_by)
    res: dict[str, Any] = {k: main[k] for k in (*METRICS, "cosine_unmatched", "matching", "matrix")}
    nulls: dict[str, dict[str, float]] = {}
    if uniform:
        nulls["uniform"] = {m: float(sums[f"uniform/{m}"].sum(0).double().mean() / n) for m in METRICS}
    for null, null_rows in (("shuffled", sums["rows_shuffled"]), ("random_init", rows)):
        if f"{null}/cosine" in sums:
            s = summarize_pairs({m: sums[f"{null}/{m}"] for m in METRICS}, null_rows, match_by)
            nulls[null] = {m: s[m] for m in METRICS}
    for null, vals in nulls.items():
        res.update({f"{m}_null_{null}": v for m, v in vals.items()})
    if nulls:
        strongest_cos = max(v["cosine"] for v in nulls.values())
        res["cosine_skill"] = skill_score(res["cosine"], strongest_cos, min_room=min_room)
        res["cosine_margin"] = res["cosine"] - strongest_cos
        for m in ("kl", "js"):
            strongest = min(v[m] for v in nulls.values())
            res[f"{m}_skill"] = skill_score(res[m], strongest, higher_is_better=False, min_room=min_room)
            res[f"{m}_margin"] = strongest - res[m]
    res["rows"] = int(rows.sum())  # valid query rows pooled (an int: not logged)
    res["entropy"] = float(sums["entropy"].sum().double() / n)
    res["entropy_reference"] = float(sums["entropy_reference"].sum().double() / n)
    return res
