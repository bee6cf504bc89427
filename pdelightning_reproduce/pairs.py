"""Model-vs-reference units (``pair_<name>/seed<k>``): same-layer correlations and attention against nulls.

A pair compares the model of seed ``s`` with the reference of seed ``(s + offset) mod n``
(:data:`~pdelightning_reproduce.settings.PAIRS`), both at their final checkpoints, on the probe set. Each model is
run once over the probe set with its attention probabilities captured (the explicit softmax path); the pooled
representations of that pass give Table 3's correlations and CKA, its patterns the attention comparison. The nulls
reuse passes already made: the reference "on another sample" is the reference's patterns permuted by a seeded
derangement of the probe set, and the re-initialised reference is one more pass of the reference's step-0 weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pdelightning.analysis import attention as att
from pdelightning.analysis.cka import linear_cka
from pdelightning.analysis.representation import layer_correlation
from pdelightning_reproduce.probe import BATCH, ProbeData, Reductions, forward_capture, probe_data
from pdelightning_reproduce.recorder import load_model
from pdelightning_reproduce.rules import CKA_UNBIASED, PROBE_SEED
from pdelightning_reproduce.settings import PairSpec
from pdelightning_reproduce.summary import SUMMARY_NAME, Row, rows_from, write_rows

STAGES: tuple[str, ...] = ("final",)
"""Checkpoints compared (the report's pair quantities are all read at the final checkpoints)."""


def capture_with_patterns(model: nn.Module, pdata: ProbeData, device: str) -> tuple[Reductions, list[Tensor]]:
    """One pass over the probe set: pooled representations per layer and every layer's attention ``[N, H, T, T]``."""

    def keep(_start: int, _xb: Tensor, _outs: dict[str, Tensor], pats: list[Tensor]) -> list[Tensor]:
        return [p.detach().float().cpu() for p in pats]

    attn = all(hasattr(b, "attn") for b in model.blocks)  # (repro-models) the paper's PDE variants have no attention
    cap = forward_capture(model, pdata.x, device, pdata.pad_id, erank=False, batch_fn=keep, patterns=attn)
    layers = [torch.cat([batch[i] for batch in cap.extra]) for i in range(len(model.blocks))] if attn else []
    cap.extra = []
    return cap, layers


def mixing_patterns(model: nn.Module, n: int, n_tokens: int, n_heads: int) -> tuple[list[Tensor], float]:
    """The attention counterpart of a diffusion-only PDE (§3.2's model): each step's mixing matrix as a distribution.

    A step ``u_{l+1} = M_l u_l`` (:meth:`~pdelightning.models.pde_variants.DiffusionStep.mixing_matrix`, one
    ``[T, T]`` per feature) is averaged over features and each row normalised to sum 1 (a Dirichlet boundary lets
    mass leave at the ends). It is the same for every input; it is a distribution only where every entry is
    ``>= 0``, which eq. (21) with ``α = 0`` (``2 D Δt / Δx² <= 1``) guarantees.

    Returns:
        per layer ``[n, n_heads, T, T]`` (a broadcast view; every head the same), or ``[]`` for a model without
        ``mixing_matrix`` steps; and the smallest entry of the averaged matrices before normalisation (``nan``
        without them).
    """
    if not model.blocks or not all(hasattr(b, "mixing_matrix") for b in model.blocks):
        return [], float("nan")
    mats = [b.mixing_matrix(n_tokens).mean(0) for b in model.blocks]
    low = min(float(m.min()) for m in mats)
    rows = [m / m.sum(-1, keepdim=True) for m in mats]
    return [r.expand(n, n_heads, n_tokens, n_tokens) for r in rows], low


def _valid(x: Tensor, pad_id: int) -> Tensor:
    """``[N, T]`` valid query/key positions: all for images, non-padding for token ids."""
    if x.dtype.is_floating_point:
        return torch.ones(x.shape[0], x.shape[1], dtype=torch.bool)
    return x != pad_id


def attention_values(
    pm: list[Tensor], pr: list[Tensor], pi: list[Tensor] | None, valid: Tensor, seed: int = PROBE_SEED
) -> dict[str, Any]:
    """Per layer: head-matched cosine / KL / JS of the model's attention ``pm`` against the reference's ``pr``, and
    against the nulls (uniform over the valid keys; the reference on another probe sample, a seeded derangement;
    the re-initialised reference ``pi``), plus both attention entropies (nats).

    Args:
        pm: the model's attention per layer, ``[N, H, T, T]``.
        pr: the reference's, same samples.
        pi: the re-initialised reference's, or ``None``.
        valid: ``[N, T]`` valid positions.
        seed: seed of the derangement.

    Returns:
        ``{metric: {layer: value}}`` with metrics ``cosine``, ``kl``, ``js``, ``null_<null>_<metric>`` and
        ``entropy_model``, ``entropy_reference``.
    """
    n = valid.shape[0]
    perm = att.derangement(n, seed)
    comps = ["ref", "uniform", "shuffled"] + (["random_init"] if pi is not None else [])
    rows = valid.sum(1)
    v: dict[str, Any] = {}
    for layer in range(len(pm)):
        sums: dict[str, dict[str, list[Tensor]]] = {c: {} for c in comps}
        ent_m, ent_r = torch.zeros(()), torch.zeros(())
        for start in range(0, n, BATCH):
            sl = slice(start, start + BATCH)
            p, vb = pm[layer][sl], valid[sl]
            others = {
                "ref": pr[layer][sl],
                "uniform": att.uniform_attention(vb).expand(-1, p.shape[1], -1, -1),
                "shuffled": pr[layer][perm[sl]],
            }
            if pi is not None:
                others["random_init"] = pi[layer][sl]
            for c, q in others.items():
                for k, t in att.pairwise_head_sums(p, q, vb).items():
                    sums[c].setdefault(k, []).append(t)
            w = vb.float()[:, None, :]
            ent_m = ent_m + (att.attention_entropy(p) * w).sum() / p.shape[1]
            ent_r = ent_r + (att.attention_entropy(pr[layer][sl]) * w).sum() / p.shape[1]
        for c in comps:
            res = att.summarize_pairs({k: torch.cat(t) for k, t in sums[c].items()}, rows)
            prefix = "" if c == "ref" else f"null_{c}_"
            for m in att.METRICS:
                v.setdefault(f"{prefix}{m}", {})[f"blocks.{layer}"] = res[m]
        total = float(rows.sum())
        v.setdefault("entropy_model", {})[f"blocks.{layer}"] = float(ent_m) / total
        v.setdefault("entropy_reference", {})[f"blocks.{layer}"] = float(ent_r) / total
    return v


def correlation_values(cm: Reductions, cr: Reductions) -> dict[str, dict[str, float]]:
    """Same-layer Pearson and Spearman correlation (flattened ``[N, d]``) and linear CKA of two captures."""
    from pdelightning_reproduce.analyze import _safe

    v: dict[str, dict[str, float]] = {"pearson_vs_reference": {}, "spearman_vs_reference": {}, "cka_vs_reference": {}}
    for name in cm.layers:
        if name not in cr.pooled:
            continue
        a, b = cm.pooled[name], cr.pooled[name]
        v["pearson_vs_reference"][name] = _safe(layer_correlation, a, b, "pearson", "flattened")
        v["spearman_vs_reference"][name] = _safe(layer_correlation, a, b, "spearman", "flattened")
        v["cka_vs_reference"][name] = _safe(linear_cka, a, b, CKA_UNBIASED)
    return v


def analyze_pair(pspec: PairSpec, out: Path, device: str = "cpu") -> int:
    """Analyse one model-vs-reference unit; writes ``pair_<name>/seed<k>/summary.csv``, returns the row count."""
    from pdelightning_reproduce.analyze import checkpoints

    model_spec, ref_spec = pspec.members()
    udir = Path(out) / pspec.id
    udir.mkdir(parents=True, exist_ok=True)
    (udir / "pair.json").write_text(
        json.dumps({"pair": pspec.pair, "seed": pspec.seed, "reference_seed": pspec.reference_seed})
    )
    mk, rk = checkpoints(model_spec.path(out)), checkpoints(ref_spec.path(out))
    if not mk or not rk:
        return write_rows(udir / SUMMARY_NAME, [])
    pdata = probe_data(json.loads((model_spec.path(out) / "run.json").read_text()))
    valid = _valid(pdata.x, pdata.pad_id)
    ref_init = next((p for _, st, p in rk if st == "init"), None)
    rows: list[Row] = []
    for stage in STAGES:
        mp = next((p for _, st, p in mk if st == stage), None)
        rp = next((p for _, st, p in rk if st == stage), None)
        if mp is None or rp is None:
            continue
        model, payload = load_model(mp, device)
        cm, pm = capture_with_patterns(model, pdata, device)
        cr, pr = capture_with_patterns(load_model(rp, device)[0], pdata, device)
        pi = capture_with_patterns(load_model(ref_init, device)[0], pdata, device)[1] if ref_init else None
        v: dict[str, Any] = correlation_values(cm, cr)
        if not pm and pr:  # the paper's diffusion-only PDE (§3.2): its mixing matrices, where they are distributions
            n, heads, _, tokens = pr[0].shape
            mix, low = mixing_patterns(model, n, tokens, heads)
            if mix:
                v["mixing_min"] = low
            pm = mix if low >= 0 else []
        if pm and pr:  # (repro-models) no attention comparison for a model without attention
            v.update(attention_values(pm, pr, pi, valid))
        rows += rows_from(f"pair_{pspec.pair}", "", pspec.seed, int(payload["step"]), stage, v)
    return write_rows(udir / SUMMARY_NAME, rows)


def disjoint_units(units: Iterable[tuple[int, int]]) -> list[int]:
    """The model seeds of pair units ``(model seed, reference seed)`` that share no model, greedily in order.

    A ceiling pair such as Transformer seed s vs seed s+1 uses every model twice (as model and as reference), so
    its units are not independent and an interval over them is too narrow; keeping only disjoint units restores
    independence (at the cost of units: 5 seeds give 2).

    Example::

        >>> disjoint_units([(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)])
        [0, 2]
    """
    used: set[int] = set()
    keep = []
    for model, reference in units:
        if model in used or reference in used:
            continue
        used.update((model, reference))
        keep.append(model)
    return keep
