"""The fixed samples every analysis number is computed on, and one forward pass that captures what it needs.

* :func:`probe_data`: the probe set (``PROBE_N`` samples of the TEST split, the same for every run of a data set),
  the fitting set of the I(T;Y) probe classifier (``FIT_N`` samples of the TRAINING split) and the gradient batch
  (``GRAD_N`` of those), rebuilt from a run's data config; cached per process.
* :func:`forward_capture`: runs a model over samples in batches with forward hooks on its TransformerLens-style
  hook points (``hook_embed``, ``blocks.{i}.hook_resid_post``, and ``blocks.{i}.attn.hook_pattern`` when a
  ``pattern_fn`` is given) and keeps per-sample reductions only (pooled features, effective ranks, sums of
  squares, logits), so memory stays ``O(N d)`` per layer whatever the sequence length.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from pdelightning.analysis.rank import effective_rank
from pdelightning.analysis.representation import padding_mask_from_inputs, pool_tokens
from pdelightning_reproduce.rules import FIT_N, FIT_SEED, GRAD_N, PROBE_N, PROBE_SEED
from pdelightning_reproduce.settings import CONFIG_DIR

BATCH = 250


@dataclass
class ProbeData:
    """Probe, fitting and gradient samples of one data set (CPU tensors)."""

    x: Tensor
    y: Tensor
    index: Tensor  # positions of the probe samples in the test split
    x_fit: Tensor
    y_fit: Tensor
    x_grad: Tensor
    y_grad: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    pad_id: int = 0


def data_spec(meta: dict[str, Any], root: Path | None = None) -> tuple[str, dict[str, Any]]:
    """The data module class name and init args of a run, from its config and ``--data.init_args.*`` overrides."""
    path = (Path(root) / meta["config"]) if root is not None else CONFIG_DIR / Path(meta["config"]).name
    cfg = yaml.safe_load(path.read_text())["data"]
    args = dict(cfg.get("init_args", {}))
    for o in meta.get("overrides", []):
        if o.startswith("--data.init_args."):
            key, _, value = o[len("--data.init_args.") :].partition("=")
            args[key] = yaml.safe_load(value)
    return cfg["class_path"].rsplit(".", 1)[-1], args


def _draw(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)[: min(k, n)]


@functools.lru_cache(maxsize=4)
def _load(class_name: str, frozen_args: str, data_kind: str) -> ProbeData:
    import pdelightning.data as data_modules

    dm = getattr(data_modules, class_name)(**json.loads(frozen_args))
    dm.prepare_data()
    dm.setup("fit")
    test_x, test_y = dm.test_dataset.tensors
    train_x, train_y = dm.train_dataset.tensors
    probe = np.sort(_draw(len(test_y), PROBE_N[data_kind], PROBE_SEED))
    perm = _draw(len(train_y), FIT_N[data_kind], FIT_SEED)
    fit, grad = np.sort(perm), np.sort(perm[: GRAD_N[data_kind]])
    t = torch.as_tensor
    return ProbeData(
        test_x[t(probe)], test_y[t(probe)], t(probe), train_x[t(fit)], train_y[t(fit)], train_x[t(grad)],
        train_y[t(grad)], test_x, test_y, int(dm.num_classes), int(getattr(dm, "pad_id", 0)),
    )  # fmt: skip


def probe_data(meta: dict[str, Any]) -> ProbeData:
    """The analysis samples of the run described by ``meta`` (its ``run.json``); cached per process."""
    name, args = data_spec(meta)
    args["data_dir"] = meta.get("data_dir", args.get("data_dir"))
    return _load(name, json.dumps(args, sort_keys=True, default=str), meta["data"])


@dataclass
class Capture:
    """Per-sample reductions of one forward pass over a sample set.

    Attributes:
        layers: layer names in depth order (``embedding`` first).
        pooled: ``{layer: [N, d]}`` mean over valid tokens.
        erank: ``{layer: [N]}`` effective rank of each sample's centred token matrix.
        sq, count, nonfinite: ``{layer: float}`` sum of squares, number of values, non-finite values.
        logits: ``[N, C]``.
        extra: what ``pattern_fn`` / ``token_fn`` returned, per batch.
    """

    layers: list[str]
    pooled: dict[str, Tensor]
    erank: dict[str, Tensor]
    sq: dict[str, float]
    count: dict[str, float]
    nonfinite: dict[str, float]
    logits: Tensor
    extra: list[Any] = field(default_factory=list)

    def rms(self, layer: str) -> float:
        """Root-mean-square of a layer's values over the sample set."""
        return float(np.sqrt(self.sq[layer] / max(self.count[layer], 1.0)))


def hook_points(model: nn.Module) -> dict[str, nn.Module]:
    """``{"embedding": hook_embed, "blocks.i": blocks[i].hook_resid_post}`` of one of our models."""
    points = {"embedding": model.hook_embed}
    for i, block in enumerate(model.blocks):
        points[f"blocks.{i}"] = block.hook_resid_post
    return points


@torch.no_grad()
def forward_capture(
    model: nn.Module,
    x: Tensor,
    device: str | torch.device = "cpu",
    pad_id: int = 0,
    erank: bool | Collection[str] = True,
    batch_fn: Callable[[int, Tensor, dict[str, Tensor], list[Tensor]], Any] | None = None,
    patterns: bool = False,
    embed_fn: Callable[[int, Tensor, Tensor | None], Tensor] | None = None,
    batch_size: int = BATCH,
) -> Capture:
    """Run ``model`` over ``x`` in batches and keep per-sample reductions of every hook point.

    Args:
        model: one of our classifiers (in eval mode).
        x: inputs ``[N, ...]`` (CPU).
        device: where to run.
        pad_id: padding id of token inputs.
        erank: compute effective ranks (one batched SVD per layer and batch): ``True`` for every layer, ``False``
            for none, or the names of the layers to compute them at.
        batch_fn: called per batch with ``(start, x_batch, token outputs {layer: [B, T, d]}, patterns)``; its
            return values are collected in ``Capture.extra`` (for quantities that need token-level outputs).
        patterns: capture ``blocks.{i}.attn.hook_pattern`` (``[B, H, T, T]``) for ``batch_fn``; takes the explicit
            attention path.
        embed_fn: ``(start, u0, valid) -> u0'`` replaces the embedding output (e.g. adds noise).
        batch_size: samples per forward.
    """
    points = hook_points(model)
    names = list(points)
    rank_at = set(names) if erank is True else set() if erank is False else set(erank)
    store: dict[str, Tensor] = {}
    pats: dict[int, Tensor] = {}
    handles = []
    start = 0
    valid_now: list[Tensor | None] = [None]

    def keep(name: str) -> Callable[..., Any]:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor | None:
            if name == "embedding" and embed_fn is not None:
                out = embed_fn(start, out, valid_now[0])
            store[name] = out
            return out if name == "embedding" and embed_fn is not None else None

        return hook

    for name, module in points.items():
        handles.append(module.register_forward_hook(keep(name)))
    if patterns:
        for i, block in enumerate(model.blocks):
            handles.append(block.attn.hook_pattern.register_forward_hook(
                lambda _m, _i, out, i=i: pats.__setitem__(i, out)))  # fmt: skip
    pooled: dict[str, list[Tensor]] = {n: [] for n in names}
    ranks: dict[str, list[Tensor]] = {n: [] for n in names}
    sq = dict.fromkeys(names, 0.0)
    cnt = dict.fromkeys(names, 0.0)
    bad = dict.fromkeys(names, 0.0)
    logits, extra = [], []
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            mask = padding_mask_from_inputs(xb, pad_id)
            valid_now[0] = None if mask is None else ~mask
            store.clear()
            pats.clear()
            logits.append(model(xb).float().cpu())
            for n in names:
                h = store[n].float()
                pooled[n].append(pool_tokens(h, mask).cpu())
                finite = torch.isfinite(h)
                bad[n] += float((~finite).sum())
                sq[n] += float(torch.where(finite, h, torch.zeros(())).pow(2).sum())
                cnt[n] += float(h.numel())
                if n in rank_at:
                    ranks[n].append(effective_rank(h.cpu(), None if mask is None else mask.cpu()))
            if batch_fn is not None:
                extra.append(batch_fn(start, xb, dict(store), [pats[i] for i in sorted(pats)]))
    finally:
        for h in handles:
            h.remove()
    return Capture(
        names, {n: torch.cat(v) for n, v in pooled.items()},
        {n: torch.cat(v) for n, v in ranks.items() if v}, sq, cnt, bad, torch.cat(logits), extra,
    )  # fmt: skip


@torch.no_grad()
def layer_outputs(
    model: nn.Module,
    xb: Tensor,
    pad_id: int = 0,
    embed_fn: Callable[[int, Tensor, Tensor | None], Tensor] | None = None,
    start: int = 0,
) -> dict[str, Tensor]:
    """Token-level outputs ``{layer: [B, T, d]}`` of every hook point for one batch (``embed_fn`` as in
    :func:`forward_capture`, called with ``start``).
    """
    mask = padding_mask_from_inputs(xb, pad_id)
    valid = None if mask is None else ~mask
    got: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., Any]:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> Tensor | None:
            if name == "embedding" and embed_fn is not None:
                out = embed_fn(start, out, valid)
                got[name] = out
                return out
            got[name] = out
            return None

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in hook_points(model).items()]
    try:
        model(xb)
    finally:
        for h in handles:
            h.remove()
    return got
