r"""Attention rollout and attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Both read the layers' attention as a layered graph: node ``(l, i)`` is token ``i`` after layer ``l`` (layer 0
the input), and layer ``l`` connects ``(l-1, k)`` to ``(l, i)`` with weight ``Ã_l[i, k]``, where

    Ã_l = normalise_rows((1 - w) A_l + w I),   A_l = head fusion (mean, max or min) of the layer's heads,

the residual connection entering as the identity with weight ``w`` (0.5 as in the paper: ``0.5 A + 0.5 I``).
With padding, padded keys get zero weight, rows are renormalised over the valid keys, and padded rows are zero.

* **Rollout**: ``R_1 = Ã_1``, ``R_l = Ã_l R_{l-1}``; row ``i`` of ``R_l`` is how much output position ``i``
  after ``l`` layers draws on each input token (rows sum to 1). Cost ``O(L B T³)`` (one batched matmul per layer).
* **Row entropy** of ``R_l`` in nats, mean over valid rows: ``log T`` for uniform mixing, 0 for none. This is the
  token-mixing view of the paper's "information flow" along depth; a PDE model's local diffusion mixes slowly.
* **Flow**: the maximum flow from input node ``(0, j)`` to output node ``(L, i)`` in the graph with capacities
  ``Ã_l``: unlike rollout it is bounded by the narrowest layer on the way. Solved exactly per pair by
  ``scipy.sparse.csgraph.maximum_flow`` (Dinic), on integer capacities ``round(Ã · scale)``: with ``scale = 10⁶``
  each capacity is off by at most ``5·10⁻⁷``, and a flow value by at most
  ``(edges in a minimum cut)/(2·scale) <= L T²/(2·scale)``. Cost: ``T_out · T`` max-flow problems per sample on
  ``(L+1) T`` nodes and ``L T²`` edges (``O(V² E)`` each for Dinic): 0.4-0.7 s per sample at ``T = 28, L = 10``
  on one core of a fast CPU (measured once), hence the ``max_tokens`` and ``max_samples`` guards. To get the
  flow into an intermediate layer, pass the attentions up to that layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow
from torch import Tensor

from pdelightning._checks import check_choice

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS = ("mean", "max", "min")
Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")
_INT32_MAX = 2**31 - 1


def fuse_heads(attention: Tensor, how: HeadFusion = "mean") -> Tensor:
    """Fuse the heads of ``[B, H, T, T]`` attention into ``[B, T, T]`` (a ``[B, T, T]`` input is returned as is).

    Raises:
        ValueError: on an unknown ``how`` or a tensor that is neither 3-D nor 4-D.
    """
    check_choice("head_fusion", how, HEAD_FUSIONS)
    if attention.dim() == 3:
        return attention
    if attention.dim() != 4:
        raise ValueError(f"attention must be [B, H, T, T] or [B, T, T], got shape {tuple(attention.shape)}")
    if how == "mean":
        return attention.mean(1)
    return attention.amax(1) if how == "max" else attention.amin(1)


def residual_attention(
    attention: Tensor, valid: Tensor | None = None, residual_weight: float = 0.5, head_fusion: HeadFusion = "mean"
) -> Tensor:
    """``Ã = normalise_rows((1 - w) A + w I)`` on the valid tokens, the per-layer matrix of rollout and flow.

    Args:
        attention: ``[B, H, T, T]`` (heads fused by ``head_fusion``) or ``[B, T, T]``, rows = queries.
        valid: ``[B, T]`` boolean, ``True`` at real tokens; ``None`` when all are valid.
        residual_weight: ``w`` in ``[0, 1]``, the weight of the residual identity.
        head_fusion: ``"mean"`` (default), ``"max"`` or ``"min"`` over heads.

    Returns:
        ``[B, T, T]`` float64, valid rows summing to 1 over valid keys, padded rows and columns zero.

    Raises:
        ValueError: on a ``residual_weight`` outside ``[0, 1]``, bad shapes or an unknown ``head_fusion``.
    """
    if not 0.0 <= residual_weight <= 1.0:
        raise ValueError(f"residual_weight={residual_weight} must lie in [0, 1]")
    a = fuse_heads(attention.detach(), head_fusion).double()
    B, T, T2 = a.shape
    if T != T2:
        raise ValueError(f"attention must be square over tokens, got shape {tuple(attention.shape)}")
    eye = torch.eye(T, dtype=a.dtype, device=a.device)
    a = (1.0 - residual_weight) * a + residual_weight * eye
    if valid is not None:
        if valid.shape != (B, T):
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected [B, T] = {(B, T)}")
        keep = valid.to(device=a.device, dtype=a.dtype)
        a = a * keep[:, :, None] * keep[:, None, :]
    rows = a.sum(-1, keepdim=True)
    return torch.where(rows > 0, a / rows.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))


def attention_rollout(
    attentions: Sequence[Tensor],
    valid: Tensor | None = None,
    *,
    residual_weight: float = 0.5,
    head_fusion: HeadFusion = "mean",
) -> Tensor:
    """Attention rollout after every layer: ``R_1 = Ã_1``, ``R_l = Ã_l R_{l-1}``.

    Args:
        attentions: per layer in depth order, ``[B, H, T, T]`` or ``[B, T, T]`` probabilities (rows = queries).
        valid: ``[B, T]`` boolean, ``True`` at real tokens; ``None`` when all are valid.
        residual_weight: weight ``w`` of the residual identity.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.

    Returns:
        ``[L, B, T, T]`` float64; ``[l]`` is the rollout through the first ``l + 1`` layers (rows = output
        positions, columns = input tokens).

    Raises:
        ValueError: when ``attentions`` is empty or the layers disagree in shape, and as
        :func:`residual_attention`.

    Example::

        >>> A = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # each token attends only to the other
        >>> attention_rollout([A, A])[1, 0]
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]], dtype=torch.float64)
    """
    if not attentions:
        raise ValueError("attention_rollout needs the attention of at least one layer")
    out: list[Tensor] = []
    for layer, att in enumerate(attentions):
        a = residual_attention(att, valid, residual_weight, head_fusion)
        if out and a.shape != out[-1].shape:
            raise ValueError(f"layer {layer} has attention of shape {tuple(a.shape)}, layer 0 {tuple(out[0].shape)}")
        out.append(a if not out else a @ out[-1])
    return torch.stack(out)


def row_entropy(matrix: Tensor, valid: Tensor | None = None, reduction: Reduction = "mean") -> Tensor:
    """Entropy in nats of each row of row-stochastic ``[..., B, T, T]`` matrices (``0 log 0 = 0``).

    Args:
        matrix: e.g. the ``[L, B, T, T]`` output of :func:`attention_rollout`.
        valid: ``[B, T]`` boolean; padded rows are left out.
        reduction: ``"mean"`` over valid rows and samples (``[...]``), ``"sum"`` (add up over batches and ranks,
            divide by ``valid.sum()``), or ``"none"`` (``[..., B, T]``, zero at padded rows).

    Raises:
        ValueError: on an unknown ``reduction`` or a ``valid`` of the wrong shape.

    Example::

        >>> round(row_entropy(torch.full((2, 4, 4), 0.25)).item(), 6), round(torch.tensor(4.0).log().item(), 6)
        (1.386294, 1.386294)
    """
    check_choice("reduction", reduction, REDUCTIONS)
    p = matrix.double()
    h = -torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p)).sum(-1)
    if valid is None:
        keep = torch.ones(p.shape[-3:-1], dtype=p.dtype, device=p.device)
    else:
        if valid.shape != p.shape[-3:-1]:
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected [B, T] = {tuple(p.shape[-3:-1])}")
        keep = valid.to(device=p.device, dtype=p.dtype)
    h = h * keep
    if reduction == "none":
        return h
    total = h.sum((-2, -1))
    return total if reduction == "sum" else total / keep.sum().clamp_min(1.0)


def _flow_graph(layers: list[np.ndarray], scale: int) -> csr_matrix:
    """CSR capacities of the layered graph; node ``l * n + t`` is token ``t`` after layer ``l``."""
    n = layers[0].shape[0]
    rows, cols, caps = [], [], []
    for depth, a in enumerate(layers, start=1):
        out_idx, in_idx = np.nonzero(a > 0)  # a[i, k]: (depth - 1, k) -> (depth, i)
        rows.append((depth - 1) * n + in_idx)
        cols.append(depth * n + out_idx)
        caps.append(np.rint(a[out_idx, in_idx] * scale).astype(np.int64))
    cap = np.concatenate(caps)
    keep = cap > 0
    size = (len(layers) + 1) * n
    r, c = np.concatenate(rows)[keep], np.concatenate(cols)[keep]
    return csr_matrix((cap[keep].astype(np.int32), (r, c)), shape=(size, size))


def attention_flow(
    attentions: Sequence[Tensor],
    valid: Tensor | None = None,
    *,
    residual_weight: float = 0.5,
    head_fusion: HeadFusion = "mean",
    outputs: Sequence[int] | None = None,
    scale: int = 1_000_000,
    max_tokens: int = 32,
    max_samples: int = 8,
) -> Tensor:
    """Attention flow: the maximum flow from each input token to each output position through all layers.

    Args:
        attentions: per layer in depth order, ``[B, H, T, T]`` or ``[B, T, T]`` (rows = queries).
        valid: ``[B, T]`` boolean, ``True`` at real tokens; ``None`` when all are valid.
        residual_weight: weight ``w`` of the residual identity.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
        outputs: output positions (after the last layer) to compute the flow into; all by default.
        scale: capacities are rounded to multiples of ``1/scale`` (see the module docstring for the error).
        max_tokens: refuse sequences longer than this (the cost grows like ``T⁴`` and more).
        max_samples: compute only the first ``max_samples`` samples of the batch.

    Returns:
        ``[min(B, max_samples), len(outputs), T]`` float64: ``[b, o, j]`` is the flow from input token ``j`` into
        output position ``outputs[o]`` (zero where either is padded). Each value is at most 1, the capacity into
        an output node; each pair is its own max-flow problem, so a row is not a distribution (normalise it for
        a picture).

    Raises:
        ValueError: on ``T > max_tokens``, ``scale`` too small or too large for int32 capacities, an output
        position out of range, and as :func:`residual_attention`.

    Example::

        >>> A = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
        >>> attention_flow([A], residual_weight=0.0)[0]
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]], dtype=torch.float64)
    """
    if not attentions:
        raise ValueError("attention_flow needs the attention of at least one layer")
    T = attentions[0].shape[-1]
    if T > max_tokens:
        raise ValueError(
            f"T={T} tokens exceeds max_tokens={max_tokens}: attention flow solves T² max-flow problems per sample "
            f"on {len(attentions) * T * T} edges; raise max_tokens to accept the cost"
        )
    if not 1 <= scale <= _INT32_MAX // max(T, 1):
        raise ValueError(f"scale={scale} must lie in [1, {_INT32_MAX // max(T, 1)}] (int32 capacities for T={T})")
    if max_samples < 1:
        raise ValueError(f"max_samples={max_samples} must be >= 1")
    outs = list(range(T)) if outputs is None else [int(o) for o in outputs]
    bad = [o for o in outs if not 0 <= o < T]
    if bad:
        raise ValueError(f"outputs {bad} are not positions in [0, {T})")
    mats = [residual_attention(a, valid, residual_weight, head_fusion) for a in attentions]
    B = min(mats[0].shape[0], max_samples)
    L = len(mats)
    flow = torch.zeros(B, len(outs), T, dtype=torch.float64)
    for b in range(B):
        keep = np.ones(T, dtype=bool) if valid is None else valid[b].cpu().numpy().astype(bool)
        graph = _flow_graph([m[b].cpu().numpy() for m in mats], scale)
        for o_i, o in enumerate(outs):
            if not keep[o]:
                continue
            for j in np.nonzero(keep)[0]:
                res = maximum_flow(graph, int(j), L * T + o, method="dinic")
                flow[b, o_i, j] = res.flow_value / scale
    return flow
