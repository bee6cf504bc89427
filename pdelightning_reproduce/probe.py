"""The fixed samples every analysis number is computed on, and one forward pass that reduces what it captures.

* :func:`probe_data`: the probe set (``PROBE_N`` samples of the TEST split, the same for every run of a data set),
  the fitting set of the I(T;Y) probe classifier (``FIT_N`` samples of the TRAINING split) and the gradient batch
  (``GRAD_N`` of those), rebuilt from a run's data config; cached per process.
* :func:`forward_capture`: runs a model over samples in batches under the library's capture
  (:class:`pdelightning.probing.capture.Capture`, on the layers, embedding and attention its adapter finds,
  :func:`pdelightning.adapters.resolve`) and keeps per-sample reductions only (:class:`Reductions`: pooled
  features, effective ranks, sums of squares, logits), so memory stays ``O(N d)`` per layer whatever the sequence
  length. :func:`layer_outputs` gives one batch's token-level outputs; :class:`Forwards` is the capture itself
  (the PDE lens, :func:`pdelightning_reproduce.lens.block_io`, asks it for each layer's input and sublayers).

The model keeps its own (fused) attention path unless the attention probabilities are asked for; then the adapter's
probe mode switches it to the explicit path for those forwards.
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

from pdelightning.adapters import resolve
from pdelightning.analysis.rank import effective_rank
from pdelightning.analysis.representation import padding_mask_from_inputs, pool_tokens
from pdelightning.models import LayerTarget
from pdelightning.probing.capture import Capture, Captured, EmbeddingEdit, Request
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


def data_spec(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The data module class name and init args of a run, from its config and ``--data.init_args.*`` overrides.

    The config is the package's (:data:`~pdelightning_reproduce.settings.CONFIG_DIR`) of the recorded file name, so
    records written from any folder (``configs/paper/<name>`` before the move) resolve the same way.
    """
    path = CONFIG_DIR / Path(meta["config"]).name
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
        test_x[t(probe)],
        test_y[t(probe)],
        t(probe),
        train_x[t(fit)],
        train_y[t(fit)],
        train_x[t(grad)],
        train_y[t(grad)],
        test_x,
        test_y,
        int(dm.num_classes),
        int(getattr(dm, "pad_id", 0)),
    )


def probe_data(meta: dict[str, Any]) -> ProbeData:
    """The analysis samples of the run described by ``meta`` (its ``run.json``); cached per process."""
    name, args = data_spec(meta)
    args["data_dir"] = meta.get("data_dir", args.get("data_dir"))
    return _load(name, json.dumps(args, sort_keys=True, default=str), meta["data"])


EMBEDDING = "embedding"
"""The name of the input embedding ``u_0`` among a capture's layers (the others are the adapter's layer names)."""

EmbedFn = Callable[[int, Tensor, Tensor | None], Tensor]
"""``(start, u0, valid) -> u0'``: replaces the embedding output of the batch starting at sample ``start``."""


class Forwards:
    """Forwards of one model under the library's capture (:class:`~pdelightning.probing.capture.Capture`).

    The layers, the embedding and the attention modules are those the model's adapter finds
    (:func:`pdelightning.adapters.resolve`). The adapter's probe mode is entered only when the attention
    probabilities are requested (it switches our attention to its explicit path); otherwise only PyTorch's fused
    fast paths are switched off and the model computes exactly what it computes on its own (the explicit path
    moves the reductions by ~1e-6, and the published numbers were computed on the fused one).

    Args:
        model: the model (in eval mode).
        request: what to capture.
        edit: rewrite ``u_0`` during the forwards (:class:`~pdelightning.probing.capture.EmbeddingEdit`): each call
            may pass a function of ``u_0``.

    Example::

        with Forwards(model, Request(hidden=True)) as run:
            logits, got = run(xb)  # got.hidden: {layer name: [B, T, d]}
    """

    def __init__(self, model: nn.Module, request: Request, edit: bool = False) -> None:
        need = ["layers"]
        if request.embedding or edit:
            need.append("embedding")
        if request.attention:
            need.append("attention")
        self.model, self.request, self._edit = model, request, edit
        self.adapter, self.targets = resolve(model, need=need)
        self._editor: EmbeddingEdit | None = None

    @property
    def layers(self) -> list[LayerTarget]:
        """The model's layers in depth order."""
        return self.targets.layers

    def __enter__(self) -> Forwards:
        if self._edit:  # hooked before every capture, so the capture records the edited u_0
            self._editor = EmbeddingEdit(self.targets).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._editor is not None:
            self._editor.__exit__(*exc)
            self._editor = None

    def __call__(self, xb: Tensor, edit: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Captured]:
        """The model's output on ``xb`` and what the forward captured (``edit``: ``u_0 -> u_0'`` for this call).

        Each call is one capture (entered, popped, left), as the library's probe session does.
        """
        if self._editor is not None:
            self._editor.fn = edit
        adapter = self.adapter if self.request.attention else None
        with Capture(adapter, self.targets, self.request) as cap:
            out = self.model(xb)
            return out, cap.pop()


def model_layers(model: nn.Module) -> list[LayerTarget]:
    """The layers of ``model`` in depth order, as its adapter finds them."""
    return resolve(model, need=("layers",))[1].layers


def _edit_for(embed_fn: EmbedFn | None, start: int, valid: Tensor | None) -> Callable[[Tensor], Tensor] | None:
    if embed_fn is None:
        return None
    return lambda u0: embed_fn(start, u0, valid)


def _outputs(got: Captured, layers: list[LayerTarget]) -> dict[str, Tensor]:
    """``{"embedding": u_0, layer name: output}`` of one captured forward, in depth order."""
    assert got.embedding is not None
    return {EMBEDDING: got.embedding, **{t.name: got.hidden[t.name] for t in layers}}


@dataclass
class Reductions:
    """Per-sample reductions of one forward pass over a sample set.

    Attributes:
        layers: layer names in depth order (``embedding`` first).
        pooled: ``{layer: [N, d]}`` mean over valid tokens.
        erank: ``{layer: [N]}`` effective rank of each sample's centred token matrix.
        sq, count, nonfinite: ``{layer: float}`` sum of squares, number of values, non-finite values.
        logits: ``[N, C]``.
        extra: what ``batch_fn`` returned, per batch.
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


@torch.no_grad()
def forward_capture(
    model: nn.Module,
    x: Tensor,
    device: str | torch.device = "cpu",
    pad_id: int = 0,
    erank: bool | Collection[str] = True,
    batch_fn: Callable[[int, Tensor, dict[str, Tensor], list[Tensor]], Any] | None = None,
    patterns: bool = False,
    embed_fn: EmbedFn | None = None,
    batch_size: int = BATCH,
) -> Reductions:
    """Run ``model`` over ``x`` in batches and keep per-sample reductions of the embedding and every layer's output.

    Args:
        model: the classifier (in eval mode).
        x: inputs ``[N, ...]`` (CPU).
        device: where to run.
        pad_id: padding id of token inputs.
        erank: compute effective ranks (one batched SVD per layer and batch): ``True`` for every layer, ``False``
            for none, or the names of the layers to compute them at.
        batch_fn: called per batch with ``(start, x_batch, token outputs {layer: [B, T, d]}, patterns)``; its
            return values are collected in ``Reductions.extra`` (for quantities that need token-level outputs).
        patterns: capture every layer's attention probabilities (``[B, H, T, T]``, in depth order) for ``batch_fn``;
            takes the explicit attention path.
        embed_fn: ``(start, u0, valid) -> u0'`` replaces the embedding output (e.g. adds noise).
        batch_size: samples per forward.
    """
    request = Request(hidden=True, embedding=True, attention=patterns)
    with Forwards(model, request, edit=embed_fn is not None) as run:
        names = [EMBEDDING, *(t.name for t in run.layers)]
        rank_at = set(names) if erank is True else set() if erank is False else set(erank)
        pooled: dict[str, list[Tensor]] = {n: [] for n in names}
        ranks: dict[str, list[Tensor]] = {n: [] for n in names}
        sq, cnt, bad = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        logits, extra = [], []
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            mask = padding_mask_from_inputs(xb, pad_id)
            z, got = run(xb, _edit_for(embed_fn, start, None if mask is None else ~mask))
            logits.append(z.float().cpu())
            outs = _outputs(got, run.layers)
            for n in names:
                h = outs[n].float()
                pooled[n].append(pool_tokens(h, mask).cpu())
                finite = torch.isfinite(h)
                bad[n] += float((~finite).sum())
                sq[n] += float(torch.where(finite, h, torch.zeros(())).pow(2).sum())
                cnt[n] += float(h.numel())
                if n in rank_at:
                    ranks[n].append(effective_rank(h.cpu(), None if mask is None else mask.cpu()))
            if batch_fn is not None:
                extra.append(batch_fn(start, xb, outs, [got.attention[t.name] for t in run.layers] if patterns else []))
    return Reductions(
        names,
        {n: torch.cat(v) for n, v in pooled.items()},
        {n: torch.cat(v) for n, v in ranks.items() if v},
        sq,
        cnt,
        bad,
        torch.cat(logits),
        extra,
    )


@torch.no_grad()
def layer_outputs(
    model: nn.Module, xb: Tensor, pad_id: int = 0, embed_fn: EmbedFn | None = None, start: int = 0
) -> dict[str, Tensor]:
    """Token-level outputs ``{layer: [B, T, d]}`` of the embedding and every layer for one batch (``embed_fn`` as in
    :func:`forward_capture`, called with ``start``).
    """
    mask = padding_mask_from_inputs(xb, pad_id)
    with Forwards(model, Request(hidden=True, embedding=True), edit=embed_fn is not None) as run:
        _, got = run(xb, _edit_for(embed_fn, start, None if mask is None else ~mask))
    return _outputs(got, run.layers)
