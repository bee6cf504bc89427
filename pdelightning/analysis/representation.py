"""Pooled layer representations and their correlations (paper §3.1, Tables 2 and 3).

:func:`padding_mask_from_inputs` and :func:`pool_tokens` turn a layer output ``[B, T, d]`` into one vector
per sample; :func:`layer_correlation` and :func:`consecutive_correlations` compare such ``[n, d]`` matrices, and
:func:`compare_representations` gives every comparison of Tables 2 and 3 (with linear CKA) at once.
:class:`~pdelightning.callbacks.InformationFlow` is the Lightning adapter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from pdelightning._checks import check_choice
from pdelightning.analysis.cka import cka_matrix

CorrelationMode = Literal["flattened", "per_sample"]


CorrelationMethod = Literal["pearson", "spearman"]


CORRELATION_MODES = ("flattened", "per_sample")


def layer_correlation(
    a: Tensor, b: Tensor, method: CorrelationMethod = "pearson", mode: CorrelationMode = "flattened"
) -> Tensor:
    """Correlation between two pooled representations ``a``, ``b`` ``[n, d]`` of the same samples.

    ``mode="flattened"`` (default; our reading of Tables 2 and 3): one coefficient between the two
    ``n*d``-vectors ``vec(a)`` and ``vec(b)``, i.e. over all samples and features jointly (so it also rewards
    agreeing per-feature offsets). ``mode="per_sample"``: the coefficient across the ``d`` features of each
    sample, averaged over the ``n`` samples (the "average correlation of feature representations" of
    Figure 2 may mean this). ``method`` picks Pearson's ``r`` or Spearman's ``ρ`` (Pearson on ranks, ties
    averaged), both from :mod:`torchmetrics.functional`. NaN when one side is constant.

    Raises:
        ValueError: when the shapes differ or ``method``/``mode`` is unknown.

    Example::

        >>> a = torch.arange(12.0).reshape(4, 3)
        >>> float(layer_correlation(a, 2 * a + 1))
        1.0
        >>> round(float(layer_correlation(a, a.exp(), "spearman")), 6)
        1.0
    """
    if a.shape != b.shape:
        raise ValueError(
            f"correlation needs representations of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method={method!r} is not one of ('pearson', 'spearman')")
    check_choice("mode", mode, CORRELATION_MODES)
    fn = pearson_corrcoef if method == "pearson" else spearman_corrcoef
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if mode == "flattened":
        return fn(a.flatten(), b.flatten())
    # torchmetrics correlates each column over the rows: transpose so that each sample is one column.
    return fn(a.flatten(1).T.contiguous(), b.flatten(1).T.contiguous()).mean()


def consecutive_correlations(reps: Sequence[Tensor], mode: CorrelationMode = "flattened") -> list[Tensor | None]:
    """Pearson correlation between layer ``l`` and ``l+1`` for each consecutive pair (paper Table 2).

    Returns one value per pair, ``len(reps) - 1`` in all; ``None`` where the two widths differ.

    Example::

        >>> x = torch.randn(8, 4)
        >>> [round(float(c), 6) for c in consecutive_correlations([x, x, 3 * x - 1])]
        [1.0, 1.0]
    """
    return [
        layer_correlation(a, b, "pearson", mode) if a.shape == b.shape else None for a, b in itertools.pairwise(reps)
    ]


def padding_mask_from_inputs(x: Any, pad_id: int = 0) -> Tensor | None:
    """The token padding mask ``[B, T]`` (``True`` at padding) of a probe batch, as our models derive it.

    Integer inputs are token ids: ``x == pad_id`` is padding. Float inputs (images) and anything else have
    no padding: ``None``.

    Example::

        >>> padding_mask_from_inputs(torch.tensor([[5, 3, 0, 0]]))
        tensor([[False, False,  True,  True]])
        >>> padding_mask_from_inputs(torch.zeros(1, 4, 4)) is None
        True
    """
    if isinstance(x, Tensor) and x.dim() == 2 and not x.dtype.is_floating_point and not x.dtype.is_complex:
        return x == pad_id
    return None


def pool_tokens(h: Tensor, padding_mask: Tensor | None = None, pooling: str = "mean") -> Tensor:
    """One vector per sample from a layer output ``h`` ``[B, T, d]``.

    ``"mean"``: masked mean over the valid tokens, ``Σ_t keep_t h_t / Σ_t keep_t`` -> ``[B, d]`` (the
    model's own pooling; a sample with no valid token gives zeros). ``"flatten"``: all tokens and features,
    ``[B, T*d]``, with padded positions zeroed (for images, where ``T`` is fixed, this keeps the spatial layout).
    An already pooled ``[B, d]`` output is returned as is.

    Args:
        h: ``[B, T, d]`` (batch first) or ``[B, d]``.
        padding_mask: ``[B, T]``, ``True`` at padding, or ``None``; ignored when its shape does not match.
        pooling: ``"mean"`` or ``"flatten"``.

    Raises:
        ValueError: for an unknown ``pooling`` or an output that is not 2-D or 3-D.

    Example::

        >>> h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
        >>> pool_tokens(h, torch.tensor([[False, False, True]]))
        tensor([[2., 3.]])
        >>> pool_tokens(h, torch.tensor([[False, False, True]]), "flatten")
        tensor([[1., 2., 3., 4., 0., 0.]])
    """
    if pooling not in ("mean", "flatten"):
        raise ValueError(f"pooling={pooling!r} is not one of ('mean', 'flatten')")
    if h.dim() == 2:
        return h
    if h.dim() != 3:
        raise ValueError(f"expected a layer output [B, T, d] (or pooled [B, d]), got shape {tuple(h.shape)}")
    keep = None
    if padding_mask is not None and padding_mask.shape == h.shape[:2]:
        keep = (~padding_mask.bool()).unsqueeze(-1).to(h.dtype)
    if pooling == "flatten":
        return (h if keep is None else h * keep).flatten(1)
    if keep is None:
        return h.mean(1)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def depth_pairs(names: Sequence[str], ref_names: Sequence[str], embedding: str = "embedding") -> list[tuple[int, int]]:
    """Pair the layers of two models by depth: the embeddings when both have one, then block ``i`` with block ``i``.

    Example::

        >>> depth_pairs(["embedding", "b0", "b1", "b2"], ["embedding", "r0", "r1"])
        [(0, 0), (1, 1), (2, 2)]
        >>> depth_pairs(["embedding", "b0"], ["r0", "r1"])
        [(1, 0)]
    """
    both = names[:1] == [embedding] and ref_names[:1] == [embedding]
    pairs = [(0, 0)] if both else []
    off, ref_off = int(names[:1] == [embedding]), int(ref_names[:1] == [embedding])
    n_blocks = min(len(names) - off, len(ref_names) - ref_off)
    return pairs + [(off + i, ref_off + i) for i in range(n_blocks)]


@dataclass
class Comparison:
    """Result of :func:`compare_representations`.

    ``values``: ``(quantity, layer, value)`` in order: ``consecutive_corr`` and ``cka_consecutive`` under the later
    layer of each consecutive pair, then ``pearson_vs_reference``, ``spearman_vs_reference`` and
    ``cka_vs_reference`` under this model's layer of each depth pair. ``mismatched``: later layers whose width
    differs from the layer before (no correlation). ``matrix``/``cross``: the layer x layer and layer x reference
    CKA matrices (``None`` with too few samples, or no reference).
    """

    values: list[tuple[str, str, Tensor]] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    matrix: Tensor | None = None
    cross: Tensor | None = None


def compare_representations(
    reps: Sequence[Tensor],
    names: Sequence[str],
    ref_reps: Sequence[Tensor] = (),
    ref_names: Sequence[str] = (),
    mode: CorrelationMode = "flattened",
    unbiased: bool = True,
) -> Comparison:
    """Tables 2 and 3 of the paper for pooled representations ``[n, d_l]`` of the same ``n`` samples.

    Table 2: Pearson's ``r`` between consecutive layers (:func:`consecutive_correlations`) and their linear CKA.
    Table 3: Pearson's ``r`` and Spearman's ``ρ`` (:func:`layer_correlation`; same-shape pairs only) and linear CKA
    between the depth pairs (:func:`depth_pairs`) of this model and a reference. CKA needs 4 samples (unbiased HSIC)
    or 2 (biased); with fewer it is left out.

    Example::

        >>> x = torch.randn(8, 3)
        >>> c = compare_representations([x, 2 * x], ["embedding", "b0"])
        >>> [(q, layer, round(float(v), 4)) for q, layer, v in c.values]
        [('consecutive_corr', 'b0', 1.0), ('cka_consecutive', 'b0', 1.0)]
    """
    out = Comparison()
    n = reps[0].shape[0] if reps else 0
    cka_ok = n >= (4 if unbiased else 2)
    for later, c in zip(names[1:], consecutive_correlations(reps, mode), strict=True):
        if c is not None:
            out.values.append(("consecutive_corr", later, c))
        else:
            out.mismatched.append(later)
    out.matrix = cka_matrix(list(reps), unbiased=unbiased) if cka_ok else None
    if out.matrix is not None:
        out.values += [("cka_consecutive", names[i], out.matrix[i - 1, i]) for i in range(1, len(names))]
    if ref_names:
        out.cross = cka_matrix(list(reps), list(ref_reps), unbiased=unbiased) if cka_ok else None
        for i, j in depth_pairs(names, ref_names):
            a, b = reps[i], ref_reps[j]
            if a.shape == b.shape:
                out.values.append(("pearson_vs_reference", names[i], layer_correlation(a, b, "pearson", mode)))
                out.values.append(("spearman_vs_reference", names[i], layer_correlation(a, b, "spearman", mode)))
            if out.cross is not None:
                out.values.append(("cka_vs_reference", names[i], out.cross[i, j]))
    return out


def sample_labels(labels: Tensor | None, n: int, who: str = "LayerMutualInformation") -> Tensor:
    """The ``[n]`` class labels of ``n`` samples: ``labels`` of shape ``[n]`` or ``[n, 1]`` with whole-number values
    (integers, or floats such as a binary classifier's ``0.``/``1.`` targets), as integers.

    ``I(T;Y)`` here is between a layer's pooled representation of each sample and one label per sample, so labels of any
    other shape (token-level labels ``[n, T]`` of token classification or language modelling, one-hot or soft labels
    ``[n, C]``) are refused with the shape found rather than read as ``n`` labels of something else; ``who`` names
    the caller in the message.

    Raises:
        RuntimeError: when there are no labels (``None``).
        ValueError: when they are not one whole-number class per sample.

        >>> sample_labels(torch.tensor([[2], [0]]), 2).tolist()
        [2, 0]
        >>> sample_labels(torch.zeros(2, 5, dtype=torch.long), 2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: LayerMutualInformation needs one class label per sample ... shape [2, 5] (token-level labels, ...
    """
    if labels is None:
        raise RuntimeError(
            f"{who} needs labels: the validation batches must be (x, y) pairs (or dicts with a 'labels'/'label'/'y' "
            "entry)"
        )
    one_per_sample = tuple(labels.shape) in ((n,), (n, 1))
    whole = not labels.is_floating_point() or bool(torch.all(labels == labels.round()))  # e.g. BCE's 0./1. targets
    if one_per_sample and whole:
        return labels.long().reshape(n)
    shape = list(labels.shape)
    if labels.is_floating_point() and (one_per_sample or labels.dim() == 2):
        kind = "not integer class labels" if one_per_sample else "one-hot or soft labels"
    elif labels.dim() >= 2:
        kind = "token-level labels, as in token classification or language modelling"
    else:
        kind = "not one per sample"
    raise ValueError(
        f"{who} needs one class label per sample ([{n}] or [{n}, 1] for these {n} samples), but the "
        f"probe batch's labels have shape {shape} ({kind}); I(T;Y) of pooled sample representations is defined for "
        "sequence- or image-level classification only"
    )
