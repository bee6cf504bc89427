"""Attention similarity to a reference model, with null baselines (paper section 3.2, experiment 2).

The paper reports that the PDE model's attention matches the Transformer's ("cosine similarity 0.9870,
KL 0.0144, > 0.98 at every layer", section 3.2.3). This module measures that comparison between the model
under training and any *reference* model on the same probe inputs, and adds what a bare similarity lacks:
null baselines and skill scores.

**Why the nulls matter.** Attention rows are probability vectors over the keys; when both models attend
almost uniformly (typical early in training, and for short image-row sequences), two *unrelated*
attention maps already score cosine ≈ 0.99 and KL ≈ 0.01. A similarity of 0.987 is therefore only
evidence of shared structure if it clearly beats what an unrelated attention scores against the same
reference. The skill score ``(s - s_null) / (1 - s_null)`` (``(d_null - d) / d_null`` for divergences)
says which fraction of the distance from the null to perfect agreement the model covers; it is ~0 for the
near-uniform case above (at or below 0: uniform attention itself agrees better) although the raw cosine is
> 0.98.

The math lives in plain functions (rows are the last axis, probabilities over keys):
:func:`attention_cosine`, :func:`attention_kl`, :func:`attention_js`, :func:`attention_entropy`,
:func:`masked_row_mean`, :func:`uniform_attention`, :func:`pairwise_head_sums`, :func:`match_heads`,
:func:`skill_score`. :class:`AttentionSimilarity` is a thin adapter that runs the probes, gathers
per-sample sums across ranks and logs.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from pdelightning.analysis.attention import (  # noqa: F401 (moved there; the old import path keeps working)
    MATCH_BY,
    METRICS,
    attention_cosine,
    attention_entropy,
    attention_js,
    attention_kl,
    derangement,
    masked_row_mean,
    match_heads,
    pairwise_head_sums,
    skill_score,
    summarize_pairs,
    uniform_attention,
)
from pdelightning.callbacks._capture import Capture
from pdelightning.callbacks._probe import GatherStore, ProbeCallback, ProbeSet, validation_loader
from pdelightning.callbacks._reference import import_object, load_reference_checkpoint
from pdelightning.callbacks._targets import module_copy, resolve_targets, unwrap
from pdelightning.models.protocol import AnalysisTargets

NULLS = ("uniform", "shuffled", "random_init")
"""The null baselines: uniform attention, the reference on another probe sample, a re-initialised model copy."""
LINKED_ARGS = ("num_classes", "input_kind", "image_size", "vocab_size", "max_len")
"""The model arguments our CLI links from the data module; copied into a ``reference_config`` that lacks them."""


# ---- helpers ------------------------------------------------------------------------------------------------
def reinitialised_copy(module: nn.Module, seed: int) -> nn.Module:
    """A frozen deep copy of ``module`` with fresh parameters: ``reset_parameters()`` on every submodule, seeded.

    ``nn.MultiheadAttention`` resets through its ``_reset_parameters``. Parameters owned by modules with no
    reset method (e.g. the PDE step's ``alpha`` and diffusion) keep the values they had when copied. The draw
    is on the CPU under a forked RNG with ``seed``, so it is identical on every rank and device and leaves the
    global RNG untouched.
    """
    clone = module_copy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            if callable(reset):
                reset()
    return _freeze(clone)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _linked_values(pl_module: nn.Module) -> dict[str, Any]:
    """The data-linked model arguments of the model under training: from its CLI hparams, else its attributes."""
    hp = getattr(pl_module, "hparams", None) or {}
    inner = hp.get("model") if isinstance(hp, Mapping) else None
    if isinstance(inner, Mapping) and isinstance(inner.get("init_args"), Mapping):
        return {k: inner["init_args"][k] for k in LINKED_ARGS if k in inner["init_args"]}
    from pdelightning.models.base import SequenceClassifier

    for m in pl_module.modules():
        if isinstance(m, SequenceClassifier):
            e = m.embed
            tokens = e.input_kind == "tokens"
            return {
                "num_classes": m.num_classes,
                "input_kind": e.input_kind,
                "image_size": 0 if tokens else e.image_size,
                "vocab_size": e.proj.num_embeddings if tokens else 0,
                "max_len": e.n_tokens if tokens else 0,
            }
    return {}


def _init_params(class_path: str) -> set[str] | None:
    """Names of the ``__init__`` parameters of ``class_path`` (a short name is looked up in our models)."""
    try:
        cls = (
            import_object(class_path, "class_path")
            if "." in class_path
            else getattr(importlib.import_module("pdelightning.models"), class_path)
        )
        return set(inspect.signature(cls).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def build_from_config(path: str, linked: Mapping[str, Any], cls: type | None = None) -> nn.Module:
    """Instantiate the ``model:`` section of a YAML config in our CLI format.

    ``model:`` holds the :class:`~pdelightning.task.ClassificationTask` arguments (``model: {class_path,
    init_args}``, ``num_classes``, ...), or the ``init_args`` of ``cls``, or is itself ``{class_path, init_args}``.
    Arguments our CLI links from the data module (:data:`LINKED_ARGS`) are filled from ``linked`` where the
    file does not give them; the file's ``data:`` section is not read.
    """
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    section = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(section, Mapping):
        raise ValueError(f"reference_config={path!r} has no `model:` section (keys: {sorted(config)})")
    section = copy.deepcopy(dict(section))
    from lightning.pytorch.cli import instantiate_module

    if "class_path" in section:
        cls = import_object(section["class_path"], "class_path") if "." in section["class_path"] else cls
        if cls is None:
            raise ValueError(f"reference_config={path!r}: give `model.class_path` as a dotted path")
        section = dict(section.get("init_args") or {})
    if cls is None:
        from pdelightning.task import ClassificationTask

        cls = ClassificationTask
    inner = section.get("model")
    if isinstance(inner, Mapping) and "class_path" in inner:
        inner = section["model"] = dict(inner)
        accepted = _init_params(inner["class_path"])
        fill = {k: v for k, v in linked.items() if accepted is None or k in accepted}
        inner["init_args"] = {**fill, **dict(inner.get("init_args") or {})}
        if "num_classes" in linked:
            section.setdefault("num_classes", linked["num_classes"])
    return instantiate_module(cls, section)


def _valid_tokens(x: Any, length: int, pad_id: int | None, device: torch.device) -> Tensor:
    """``[B, T]`` mask of non-padding positions: ``x != pad_id`` for ``[B, T]`` integer ids, else all ``True``."""
    if (
        isinstance(x, Tensor)
        and pad_id is not None
        and x.dim() == 2
        and not x.is_floating_point()
        and x.shape[1] == length
    ):
        return (x != pad_id).to(device)
    batch = x.shape[0] if isinstance(x, Tensor) else len(x)
    return torch.ones(batch, length, dtype=torch.bool, device=device)


def _pad_pattern(p: Tensor, length: int) -> Tensor:
    t = p.shape[-1]
    return p if t == length else torch.nn.functional.pad(p, (0, length - t, 0, length - t))


def _pad_mask(m: Tensor, length: int) -> Tensor:
    t = m.shape[-1]
    return m if t == length else torch.nn.functional.pad(m, (0, length - t), value=False)


def _stack_inputs(xs: list[Tensor], pad_id: int | None) -> Tensor:
    """Concatenate single-sample batches; integer sequences of different lengths are right-padded with ``pad_id``."""
    if all(x.shape == xs[0].shape for x in xs):
        return torch.cat(xs)
    if pad_id is None or any(x.dim() != 2 or x.is_floating_point() for x in xs):
        raise ValueError(f"cannot batch probe inputs of shapes {[tuple(x.shape) for x in xs]}")
    t = max(x.shape[1] for x in xs)
    return torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1]), value=pad_id) for x in xs])


# ---- the callback --------------------------------------------------------------------------------------------
class AttentionSimilarity(ProbeCallback):
    r"""Compare the attention of the model under training with a reference model's (paper section 3.2).

    On a fixed probe set both models run on the same inputs; their attention probabilities (softmax of
    eq. (10), ``[B, H, T, T]``) are compared layer by layer:

    * **Layers**: model layer ``i`` with reference layer ``i`` for ``i < min(L, L_ref)`` (extra layers of the
      deeper model are not compared), or as given by ``layer_map``. Keys carry the model's layer names.
    * **Heads**: head order is arbitrary, so heads are paired per layer by the Hungarian method
      (:func:`match_heads`) on the probe-set mean of the per-row cosine (``match_by="cosine"``) or JS
      divergence; with different head counts ``min(H, H_ref)`` pairs are formed. The matching is made after
      the gather, on the whole probe set, identically on every rank. ``cosine_unmatched`` pairs head ``i``
      with head ``i`` for comparison.
    * **Metrics**, computed per query row and then averaged over the valid rows of the probe set (never over
      flattened maps): cosine similarity, ``KL(model || reference)`` in nats with the reference clamped at
      ``eps``, and Jensen-Shannon divergence in nats (in ``[0, ln 2]``). Rows of padded queries are
      excluded (padding is ``x == pad_id`` for integer token inputs); padded keys already have probability 0.
    * **Nulls** (each gets the same head matching, so the matching's optimism is in the null too):
      ``uniform``: uniform attention over the valid keys vs the reference (averaged over all reference
      heads); ``shuffled``: the model's attention on sample ``i`` vs the reference's on another probe sample
      ``π(i)`` (a fixed seeded derangement of the probe set: realistic attention statistics, no
      correspondence; rows valid in both are compared); ``random_init``: a copy of the model re-initialised
      with ``reset_parameters()`` (seeded, made at the first probe) vs the reference.
    * **Skill** against the *strongest* enabled null (highest null cosine; lowest null KL/JS):
      :func:`skill_score`, ``(s - s_null) / (1 - s_null)`` for cosine and ``(d_null - d) / d_null`` for KL/JS.
    * **Entropy**: mean attention entropy per row (nats) of the model and of the reference.

    Why the nulls: two unrelated near-uniform attentions score cosine ≈ 0.99 and KL ≈ 0.01 (see the module
    docstring); only the skill says whether the model's agreement exceeds such chance agreement.

    The reference is one of:

    * ``reference``: an ``nn.Module`` given in Python (frozen and put in eval mode by this callback);
    * ``reference_checkpoint``: a Lightning checkpoint, loaded with ``reference_class.load_from_checkpoint``
      (default :class:`~pdelightning.task.ClassificationTask`, which rebuilds from checkpoints our CLI wrote,
      whose hparams hold the model's ``class_path``);
    * ``reference_config``: a YAML config in our CLI format whose ``model:`` section is instantiated (see
      :func:`build_from_config`; data-linked arguments such as ``num_classes`` and ``image_size`` missing from
      the file are copied from the model under training). Alone it gives a freshly initialised reference;
      together with ``reference_checkpoint`` the checkpoint's ``state_dict`` is loaded into it (for
      checkpoints whose hparams cannot rebuild the model, e.g. a task built in Python). Checkpoints are
      unpickled: give only files you trust;
    * none of them: a frozen copy of the model taken at the start of training (attention drift from
      initialisation); this copy is saved in the callback state so a resumed run keeps it.

    Cost: per probe, four eager forwards per probe batch (model, reference, reference on the partner samples,
    re-initialised copy); held between probes are the reference, the re-initialised copy and, for the
    shuffled null, the probe set's *inputs* on every rank (the partner of a sample may live on another rank).
    Nothing is kept across probes but per-sample ``[H, H_ref]`` sums until the gather; the callback keeps no
    history, so its checkpoint state is empty except for the initial-copy reference.

    Loaded references are frozen, in eval mode, moved to the module's device at each probe; their layers are
    found by :func:`~pdelightning.callbacks._targets.resolve_targets` (protocol, hook names, or the
    ``reference_layers``/``reference_attention`` globs). Both models must tokenize the probe inputs alike
    (same ``T``).

    Args:
        reference: the reference module.
        reference_checkpoint: path of a Lightning checkpoint of the reference.
        reference_config: path of a YAML config (our CLI format) describing the reference.
        reference_class: dotted path of the ``LightningModule`` class for ``reference_checkpoint`` or of the
            class whose arguments ``reference_config``'s ``model:`` section holds.
        reference_layers: glob of the reference's layer modules (``None``: discovery; the initial-copy
            reference uses ``layers``).
        reference_attention: glob of the reference's attention modules.
        layer_map: ``{model layer index: reference layer index}`` (``None``: ``i -> i``).
        match_by: head-matching criterion, ``"cosine"`` or ``"js"``.
        nulls: the null baselines to compute, a subset of ``("uniform", "shuffled", "random_init")``.
        eps: the KL guard (reference probabilities are clamped at ``eps``), in ``(0, 1)``.
        pad_id: padding id of integer token inputs (``None``: no padding).
        log_figures: write the attention-map and per-layer figures at each probe.
        null_seed: seed of the re-initialisation and of the shuffled pairing.
        **kwargs: :class:`~pdelightning.callbacks._probe.ProbeCallback` arguments (cadence, probe set, globs).

    Raises:
        ValueError: on conflicting reference arguments, an unknown null or ``match_by``, a bad ``eps`` or
            ``layer_map``; at setup, on a ``layer_map`` index out of range.
        TargetNotFoundError: at setup, when the model or the reference has no layers with attention.
        FileNotFoundError: at setup, when ``reference_checkpoint`` or ``reference_config`` does not exist.

    Logged metrics (``analysis/attention_similarity/<quantity>/<layer>`` and ``.../<quantity>/mean`` over
    layers, ``<layer>`` the model's layer name, e.g. ``blocks.0``):
        ``cosine``, ``kl``, ``js`` (matched heads); ``cosine_unmatched``;
        ``cosine_null_uniform``, ``kl_null_uniform``, ``js_null_uniform``,
        ``cosine_null_shuffled``, ``kl_null_shuffled``, ``js_null_shuffled``,
        ``cosine_null_random_init``, ``kl_null_random_init``, ``js_null_random_init`` (enabled nulls only);
        ``cosine_skill``, ``kl_skill``, ``js_skill`` (vs the strongest enabled null);
        ``entropy``, ``entropy_reference`` (nats).
        Figures: ``analysis/attention_similarity/attention_maps`` (head-averaged attention of probe sample 0,
        model above reference, per layer) and ``analysis/attention_similarity/by_layer`` (cosine per layer
        beside its nulls, and the cosine/JS skills per layer).

    Example::

        trainer = L.Trainer(callbacks=[AttentionSimilarity(reference_checkpoint="transformer.ckpt", every_n_epochs=1)])
        trainer.fit(pde_task, datamodule=dm)
    """

    name = "attention_similarity"
    needs = ("layers", "attention")

    def __init__(
        self,
        reference: nn.Module | None = None,
        reference_checkpoint: str | None = None,
        reference_config: str | None = None,
        reference_class: str | None = None,
        reference_layers: str | None = None,
        reference_attention: str | None = None,
        layer_map: dict[int, int] | None = None,
        match_by: str = "cosine",
        nulls: Sequence[str] = NULLS,
        eps: float = 1e-8,
        pad_id: int | None = 0,
        log_figures: bool = True,
        null_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reference is not None and (reference_checkpoint is not None or reference_config is not None):
            raise ValueError(
                "give the reference either as a module (reference=...) or by file (reference_checkpoint and/or "
                "reference_config), not both"
            )
        if reference is not None and not isinstance(reference, nn.Module):
            raise ValueError(f"reference must be an nn.Module, got {type(reference).__name__}")
        if reference_class is not None and reference_checkpoint is None and reference_config is None:
            raise ValueError(f"reference_class={reference_class!r} needs reference_checkpoint or reference_config")
        if reference_class is not None and "." not in reference_class:
            raise ValueError(f"reference_class={reference_class!r} must be a dotted path such as 'my_pkg.MyModule'")
        if match_by not in MATCH_BY:
            raise ValueError(f"match_by={match_by!r} is not one of {MATCH_BY}")
        if isinstance(nulls, str):
            nulls = (nulls,)
        unknown = [n for n in nulls if n not in NULLS]
        if unknown:
            raise ValueError(f"nulls={list(nulls)!r} contains unknown baselines {unknown}; choose from {NULLS}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps={eps} must lie in (0, 1)")
        if layer_map is not None:
            bad = {
                k: v
                for k, v in layer_map.items()
                if not (isinstance(k, int) and isinstance(v, int) and k >= 0 and v >= 0)
            }
            if bad or not layer_map:
                raise ValueError(
                    f"layer_map={layer_map!r} must map model layer indices to reference layer indices "
                    f"(non-negative ints, at least one pair); bad entries: {bad}"
                )
        self.reference_checkpoint = reference_checkpoint
        self.reference_config = reference_config
        self.reference_class = reference_class
        self.reference_patterns = {"layers": reference_layers, "attention": reference_attention}
        self.layer_map = dict(layer_map) if layer_map is not None else None
        self.match_by = match_by
        self.nulls = tuple(n for n in NULLS if n in nulls)
        self.eps = eps
        self.pad_id = pad_id
        self.log_figures = log_figures
        self.null_seed = null_seed
        self.initial = reference is None and reference_checkpoint is None and reference_config is None
        self._reference: nn.Module | None = _freeze(reference) if reference is not None else None
        self._pending_initial: dict[str, Tensor] | None = None
        self._template: nn.Module | None = None
        self._null_model: nn.Module | None = None
        self._partner_inputs: list[Any] | None = None
        self.last_results: dict[str, dict[str, Any]] = {}
        """Per model layer, the results of the latest probe (including head matchings and pooled matrices)."""

    @property
    @override
    def state_key(self) -> str:
        ref = "initial" if self.initial else (self.reference_checkpoint or self.reference_config or "module")
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs, reference=ref, **self.patterns
        )

    # ---- reference ---------------------------------------------------------------------------------------------
    def _load_reference(self, pl_module: L.LightningModule) -> nn.Module:
        if self.reference_config is not None and not Path(self.reference_config).is_file():
            raise FileNotFoundError(f"reference_config={self.reference_config!r} does not exist")
        cls = import_object(self.reference_class) if self.reference_class else None
        if self.reference_config is not None:
            module = build_from_config(self.reference_config, _linked_values(pl_module), cls)
            if self.reference_checkpoint is not None:
                if not Path(self.reference_checkpoint).is_file():
                    raise FileNotFoundError(f"reference_checkpoint={self.reference_checkpoint!r} does not exist")
                ckpt = torch.load(self.reference_checkpoint, map_location="cpu", weights_only=False)
                module.load_state_dict(ckpt.get("state_dict", ckpt))
            else:
                rank_zero_warn(
                    f"AttentionSimilarity: the reference built from {self.reference_config!r} is freshly initialised "
                    "(no reference_checkpoint given)"
                )
            return module
        return load_reference_checkpoint(
            self.reference_checkpoint, cls, hint="also give reference_config (a YAML describing the architecture)"
        )

    def _reference_targets(self, reference: nn.Module) -> AnalysisTargets:
        patterns = self.patterns if self.initial else self.reference_patterns
        return resolve_targets(reference, layers=patterns["layers"], attention=patterns["attention"], need=self.needs)

    def _layer_pairs(self, n_model: int, n_ref: int) -> list[tuple[int, int]]:
        if self.layer_map is None:
            return [(i, i) for i in range(min(n_model, n_ref))]
        bad = {k: v for k, v in self.layer_map.items() if k >= n_model or v >= n_ref}
        if bad:
            raise ValueError(
                f"layer_map entries {bad} are out of range: the model has {n_model} layers (0..{n_model - 1}) and the "
                f"reference {n_ref} (0..{n_ref - 1})"
            )
        return sorted(self.layer_map.items())

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self._reference is None and not self.initial:
            self._reference = _freeze(self._load_reference(pl_module))
        if self.initial or "random_init" in self.nulls:
            # Copied now, before the strategy wraps the model: under DDP the parameters carry the reducer's
            # hooks, which cannot be deep-copied. The weights are loaded at train start (after DDP's broadcast).
            self._template = module_copy(pl_module)
        reference = self._reference if self._reference is not None else pl_module
        ref_targets = self._reference_targets(reference)  # fail fast, before training
        self._layer_pairs(len(self.targets(pl_module).layers), len(ref_targets.layers))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial and self._reference is None:
            snapshot = module_copy(self._template if self._template is not None else pl_module)
            if self._pending_initial is not None:
                snapshot.load_state_dict(self._pending_initial)
                self._pending_initial = None
            else:
                snapshot.load_state_dict(unwrap(pl_module).state_dict())  # after DDP's broadcast: same on every rank
                rank_zero_info(
                    "AttentionSimilarity: no reference given; comparing with the model at the start of training"
                )
            self._reference = _freeze(snapshot)
        super().on_train_start(trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._null_model = None
        self._template = None
        self._partner_inputs = None

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.initial and self._reference is not None:
            return {"initial_reference": {k: v.detach().cpu() for k, v in self._reference.state_dict().items()}}
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.initial and "initial_reference" in state_dict:
            self._pending_initial = state_dict["initial_reference"]
            self._reference = None

    # ---- probing -----------------------------------------------------------------------------------------------
    def _partners(self, trainer: L.Trainer) -> list[Any] | None:
        """Single-sample inputs of the whole probe set (every rank), for the shuffled null; ``None`` if < 2."""
        if self._partner_inputs is None:
            loader = validation_loader(trainer)
            assert loader is not None  # probe_set() has already checked
            full = ProbeSet(loader.dataset, loader.collate_fn, self.probe_size, 1, self.seed)
            self._partner_inputs = [x for x, _, _ in full]
        return self._partner_inputs if len(self._partner_inputs) >= 2 else None

    def _patterns(self, module: nn.Module, targets: AnalysisTargets, x: Any) -> dict[str, Tensor]:
        with Capture(targets, layers=False, attention=True) as cap:
            self.forward(module, x)
            return cap.pop()[1]

    @override
    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        targets = self.targets(pl_module)
        assert self._reference is not None
        reference = self._reference.to(device).eval()
        ref_targets = self._reference_targets(reference)
        pairs = [
            (targets.layers[i].name, ref_targets.layers[j].name)
            for i, j in self._layer_pairs(len(targets.layers), len(ref_targets.layers))
        ]
        if "random_init" in self.nulls and self._null_model is None:
            self._null_model = reinitialised_copy(
                self._template if self._template is not None else pl_module, self.null_seed
            )
        null_model = (
            self._null_model.to(device) if "random_init" in self.nulls and self._null_model is not None else None
        )
        null_targets = resolve_targets(null_model, need=self.needs, **self.patterns) if null_model is not None else None
        partners = self._partners(trainer) if "shuffled" in self.nulls else None
        partner_of = derangement(len(partners), self.null_seed) if partners is not None else None

        comps = (
            ["main"]
            + (["shuffled"] if partners is not None else [])
            + (["random_init"] if null_model is not None else [])
        )
        keys = [f"rows/{a}" for a, _ in pairs] + [f"rows_shuffled/{a}" for a, _ in pairs]
        keys += [f"{c}/{m}/{a}" for c in comps for m in METRICS for a, _ in pairs]
        keys += [f"uniform/{m}/{a}" for m in METRICS for a, _ in pairs]
        keys += [f"entropy/{a}" for a, _ in pairs] + [f"entropy_reference/{a}" for a, _ in pairs]
        store = GatherStore(keys).to(device)
        maps: dict[str, tuple[Tensor, Tensor]] = {}

        with torch.no_grad():
            for x, _, idx in self.iter_probe(trainer, pl_module):
                p_all = self._patterns(pl_module, targets, x)
                r_all = self._patterns(reference, ref_targets, x)
                n_all = (
                    self._patterns(null_model, null_targets, x)
                    if null_model is not None and null_targets is not None
                    else {}
                )
                rs_all: dict[str, Tensor] = {}
                if partners is not None and partner_of is not None:
                    xs = _stack_inputs([partners[int(j)] for j in partner_of[idx.cpu()]], self.pad_id).to(device)
                    rs_all = self._patterns(reference, ref_targets, xs)
                    valid_s = _valid_tokens(xs, next(iter(rs_all.values())).shape[-1], self.pad_id, device)
                update: dict[str, Tensor] = {}
                for a, b in pairs:
                    p, r = p_all[a].float(), r_all[b].float()
                    if p.shape[-1] != r.shape[-1]:
                        raise ValueError(
                            f"model layer {a} attends over T={p.shape[-1]} tokens but reference layer {b} over "
                            f"T={r.shape[-1]}: both models must tokenize the probe inputs the same way"
                        )
                    valid = _valid_tokens(x, p.shape[-1], self.pad_id, device)
                    update[f"rows/{a}"] = valid.sum(-1)
                    for m, v in pairwise_head_sums(p, r, valid, self.eps).items():
                        update[f"main/{m}/{a}"] = v
                    for m, v in pairwise_head_sums(uniform_attention(valid), r, valid, self.eps).items():
                        update[f"uniform/{m}/{a}"] = v[:, 0]
                    w = valid.float()[:, None, :]
                    update[f"entropy/{a}"] = (attention_entropy(p) * w).sum((-1, -2)) / p.shape[1]
                    update[f"entropy_reference/{a}"] = (attention_entropy(r) * w).sum((-1, -2)) / r.shape[1]
                    if null_model is not None:
                        for m, v in pairwise_head_sums(n_all[a].float(), r, valid, self.eps).items():
                            update[f"random_init/{m}/{a}"] = v
                    if rs_all:
                        rs = rs_all[b].float()
                        t = max(p.shape[-1], rs.shape[-1])
                        both = _pad_mask(valid, t) & _pad_mask(valid_s, t)
                        update[f"rows_shuffled/{a}"] = both.sum(-1)
                        for m, v in pairwise_head_sums(_pad_pattern(p, t), _pad_pattern(rs, t), both, self.eps).items():
                            update[f"shuffled/{m}/{a}"] = v
                    else:
                        update[f"rows_shuffled/{a}"] = torch.zeros_like(valid.sum(-1))
                    if self.log_figures and bool((idx == 0).any()):  # probe sample 0 lives on rank zero
                        k = int((idx == 0).nonzero()[0, 0])
                        n = int(valid[k].sum())
                        maps[a] = (p[k].mean(0)[:n, :n].cpu(), r[k].mean(0)[:n, :n].cpu())
                store.update(idx, **update)
                del p_all, r_all, n_all, rs_all, update

        out = store.compute()  # a collective: every rank, same tensors
        results = {a: self._summarize(out, a, comps) for a, _ in pairs}
        self.last_results = results
        metrics: dict[str, float] = {}
        for a, res in results.items():
            metrics.update({self.key(q, a): v for q, v in res.items() if isinstance(v, float)})
        for q in sorted({q for res in results.values() for q, v in res.items() if isinstance(v, float)}):
            metrics[self.key(q, "mean")] = float(np.nanmean([res[q] for res in results.values() if q in res]))
        self.log_scalars(trainer, metrics)
        if self.log_figures and self.figures_due and trainer.is_global_zero:
            if maps:
                self.add_figure(trainer, self.key("attention_maps"), _maps_figure(maps, pairs))
            self.add_figure(trainer, self.key("by_layer"), _by_layer_figure(results, self.nulls))

    def _summarize(self, out: dict[str, Tensor], layer: str, comps: list[str]) -> dict[str, Any]:
        rows = out[f"rows/{layer}"]
        n = rows.sum().clamp_min(1).double()
        main = summarize_pairs({m: out[f"main/{m}/{layer}"] for m in METRICS}, rows, self.match_by)
        res: dict[str, Any] = {m: main[m] for m in METRICS}
        res["cosine_unmatched"] = main["cosine_unmatched"]
        res["matching"] = main["matching"]
        res["matrix"] = main["matrix"]
        nulls: dict[str, dict[str, float]] = {}
        if "uniform" in self.nulls:
            nulls["uniform"] = {m: float(out[f"uniform/{m}/{layer}"].sum(0).double().mean() / n) for m in METRICS}
        if "shuffled" in comps:
            s = summarize_pairs(
                {m: out[f"shuffled/{m}/{layer}"] for m in METRICS}, out[f"rows_shuffled/{layer}"], self.match_by
            )
            nulls["shuffled"] = {m: s[m] for m in METRICS}
        if "random_init" in comps:
            s = summarize_pairs({m: out[f"random_init/{m}/{layer}"] for m in METRICS}, rows, self.match_by)
            nulls["random_init"] = {m: s[m] for m in METRICS}
        for null, vals in nulls.items():
            res.update({f"{m}_null_{null}": v for m, v in vals.items()})
        if nulls:
            strongest_cos = max(v["cosine"] for v in nulls.values())
            res["cosine_skill"] = skill_score(res["cosine"], strongest_cos)
            for m in ("kl", "js"):
                res[f"{m}_skill"] = skill_score(res[m], min(v[m] for v in nulls.values()), higher_is_better=False)
        res["rows"] = int(rows.sum())  # valid query rows pooled (an int: not logged)
        res["entropy"] = float(out[f"entropy/{layer}"].sum().double() / n)
        res["entropy_reference"] = float(out[f"entropy_reference/{layer}"].sum().double() / n)
        return res

    @override
    def layout(self) -> dict[str, list[str]]:
        base = f"analysis/{self.name}"
        quantities = ["cosine", "kl", "js", "cosine_unmatched", "entropy", "entropy_reference"]
        quantities += [f"{m}_null_{n}" for n in self.nulls for m in METRICS]
        quantities += [f"{m}_skill" for m in METRICS] if self.nulls else []
        charts = {f"{q} per layer": [rf"^{base}/{q}/.*"] for q in quantities}
        for m in METRICS:
            charts[f"{m} vs nulls (mean over layers)"] = [rf"^{base}/{m}(_null_[a-z_]+)?/mean$"]
        return charts


# ---- figures -------------------------------------------------------------------------------------------------
def _maps_figure(maps: Mapping[str, tuple[Tensor, Tensor]], pairs: Sequence[tuple[str, str]]) -> Any:
    """Head-averaged attention of probe sample 0: model (top row) and reference (bottom row), one column per layer."""
    from matplotlib.figure import Figure

    names = [a for a, _ in pairs if a in maps]
    vmax = max(float(m.max()) for a in names for m in maps[a])
    fig = Figure(figsize=(2.4 * len(names) + 1.0, 5.0))
    axes = fig.subplots(2, len(names), squeeze=False)
    ref_of = dict(pairs)
    im = None
    for col, a in enumerate(names):
        for row, (mat, title) in enumerate(((maps[a][0], f"model {a}"), (maps[a][1], f"reference {ref_of[a]}"))):
            ax = axes[row][col]
            im = ax.imshow(mat.numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
    fig.subplots_adjust(left=0.08, right=0.86, wspace=0.45, hspace=0.45)
    if im is not None:
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.02, 0.7)), label="attention (head mean)")
    return fig


def _by_layer_figure(results: Mapping[str, Mapping[str, Any]], nulls: Sequence[str]) -> Any:
    """Left: per-layer matched cosine beside its nulls (y axis zoomed to the data). Right: skill per layer."""
    from matplotlib.figure import Figure

    layers = list(results)
    series = ["cosine"] + [f"cosine_null_{n}" for n in nulls]
    fig = Figure(figsize=(max(7.0, 2.0 * len(layers) + 3.0), 3.4))
    ax, ax_skill = fig.subplots(1, 2)
    width = 0.8 / len(series)
    values = []
    for k, s in enumerate(series):
        ys = [results[a].get(s, float("nan")) for a in layers]
        values += [y for y in ys if math.isfinite(y)]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, ys, width, label=s.replace("cosine_", ""))
    low = min(values, default=0.0)
    ax.set_ylim(max(0.0, low - 0.2 * (1.0 - low) - 1e-3), 1.0)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_ylabel("cosine similarity (per row)")
    ax.legend(fontsize=6)
    for q in ("cosine_skill", "js_skill"):
        ax_skill.plot(range(len(layers)), [results[a].get(q, float("nan")) for a in layers], marker="o", label=q)
    ax_skill.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax_skill.set_xticks(range(len(layers)), layers, fontsize=7)
    ax_skill.set_ylabel("skill vs strongest null")
    ax_skill.legend(fontsize=6)
    fig.subplots_adjust(bottom=0.18, wspace=0.3)
    return fig
