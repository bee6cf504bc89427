"""The reference side of a probe callback that compares the model with a reference model and a null model.

:class:`ReferenceProbe` holds what :class:`~pdelightning.callbacks.AttentionSimilarity` needs besides its math:
the reference (a module, a checkpoint and/or a config, or a frozen copy of the model at the start of training,
kept in the callback's state), a re-initialised copy of the model as a null model, their sharding like the
model's under FSDP2, the layer pairing, and the requests that run both models in the shared probe forward.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from pdelightning.adapters.base import ModelAdapter
from pdelightning.adapters.registry import resolve
from pdelightning.callbacks._reference import freeze, load_reference, reinitialised_copy
from pdelightning.callbacks._targets import module_copy, unwrap
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.models.protocol import AnalysisTargets
from pdelightning.probing.capture import Request
from pdelightning.probing.sharding import full, is_sharded, shard_copies, shard_like


class ReferenceProbe(ProbeCallback):
    """A probe callback that runs a reference model (and, with ``null``, a re-initialised copy) beside the model.

    Args:
        reference: the reference module.
        reference_checkpoint: path of a Lightning checkpoint of the reference.
        reference_config: path of a YAML config (our CLI format) describing the reference.
        reference_class: dotted path of the ``LightningModule`` class for the checkpoint or the config.
        reference_layers: glob of the reference's layer modules (``None``: discovery).
        reference_attention: glob of the reference's attention modules.
        layer_map: ``{model layer index: reference layer index}`` (``None``: ``i -> i``).
        null: run a re-initialised copy of the model as a null model.
        null_seed: seed of the re-initialisation.
        trust_checkpoint: load ``reference_checkpoint`` with ``weights_only=False``.
        **kwargs: :class:`~pdelightning.callbacks.ProbeCallback` arguments.

    Raises:
        ValueError: on conflicting reference arguments or a bad ``layer_map``.
    """

    def __init__(
        self,
        reference: nn.Module | None = None,
        reference_checkpoint: str | None = None,
        reference_config: str | None = None,
        reference_class: str | None = None,
        reference_layers: str | None = None,
        reference_attention: str | None = None,
        layer_map: dict[int, int] | None = None,
        null: bool = True,
        null_seed: int = 0,
        trust_checkpoint: bool = False,
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
        if layer_map is not None:
            bad = {k: v for k, v in layer_map.items() if not (_index(k) and _index(v))}
            if bad or not layer_map:
                raise ValueError(
                    f"layer_map={layer_map!r} must map model layer indices to reference layer indices "
                    f"(non-negative ints, at least one pair); bad entries: {bad}"
                )
        self.reference_checkpoint = reference_checkpoint
        self.reference_config = reference_config
        self.reference_class = reference_class
        self.trust_checkpoint = bool(trust_checkpoint)
        self.reference_patterns = {"layers": reference_layers, "attention": reference_attention}
        self.layer_map = dict(layer_map) if layer_map is not None else None
        self.use_null = null
        self.null_seed = null_seed
        self.initial = reference is None and reference_checkpoint is None and reference_config is None
        self._reference: nn.Module | None = freeze(reference) if reference is not None else None
        self._pending_initial: dict[str, Tensor] | None = None
        self._template: nn.Module | None = None
        self._null_model: nn.Module | None = None
        self._null_failed = False

    def reference_request(self) -> Request:
        """What the reference and null models capture in the shared probe forward (a subclass says)."""
        raise NotImplementedError

    def _load_reference(self, pl_module: L.LightningModule) -> nn.Module:
        files = (self.reference_config, self.reference_checkpoint, self.reference_class)
        return load_reference(pl_module, *files, type(self).__name__, trust=self.trust_checkpoint)

    def _reference_targets(self, reference: nn.Module) -> tuple[ModelAdapter | None, AnalysisTargets]:
        patterns = self.patterns if self.initial else self.reference_patterns
        return resolve(reference, layers=patterns["layers"], attention=patterns["attention"], need=self.needs)

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
    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().check(trainer, pl_module)
        if self._reference is None and not self.initial:
            self._reference = freeze(self._load_reference(pl_module))
        if self.initial or self.use_null:
            # Copied now, before the strategy wraps the model: under DDP the parameters carry the reducer's
            # hooks, which cannot be deep-copied. The weights are loaded at train start (after DDP's broadcast).
            self._template = module_copy(pl_module)
        if self.use_null and self._null_model is None and not self._null_failed:
            # drawn now (its weights do not depend on the model's), not inside the first probe's timing
            source = self._template if self._template is not None else pl_module
            self._null_model = reinitialised_copy(source, self.null_seed)
            self._null_failed = self._null_model is None
        reference = self._reference if self._reference is not None else pl_module
        _, ref_targets = self._reference_targets(reference)  # fail fast, before training
        self._layer_pairs(len(self.targets(pl_module).layers), len(ref_targets.layers))

    @override
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the hub calls this before the start probe, also when another probe callback's on_train_start runs it
        model = unwrap(pl_module)
        sharded = is_sharded(model)  # FSDP2: the copies are sharded like the model, never whole
        if self.initial and self._reference is None:
            snapshot = module_copy(self._template if self._template is not None else pl_module)
            if self._pending_initial is not None:
                snapshot.load_state_dict(self._pending_initial)
                self._pending_initial = None
            else:  # sharded: each rank copies its own shards of the model's weights
                snapshot = shard_like(snapshot, model) if sharded else snapshot
                snapshot.load_state_dict(model.state_dict())  # after DDP's broadcast: same on every rank
                rank_zero_info(
                    f"{type(self).__name__}: no reference given; comparing with the model at the start of training"
                )
            self._reference = freeze(snapshot)
        if sharded:  # a given reference is another model and stays whole; the copies of this one are sharded
            self._template = None
            shard_copies(model, pl_module.device, self._reference if self.initial else None, self._null_model)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._null_model = None
        self._template = None

    @override
    def extra_state(self) -> dict[str, Any]:
        if self.initial and self._reference is not None:
            state = self._reference.state_dict()  # sharded: gathered whole (every rank saves the callback's state)
            return {"initial_reference": {k: full(v).detach().cpu() for k, v in state.items()}}
        return {}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.initial and "initial_reference" in state:
            self._pending_initial = state["initial_reference"]
            self._reference = None

    @override
    def extra_models(self, pl_module: nn.Module) -> dict[str, tuple[nn.Module, Request]]:
        assert self._reference is not None
        request = self.reference_request()
        models = {f"reference:{id(self._reference)}": (self._reference, request)}
        if self.use_null and not self._null_failed:
            if self._null_model is None:
                source = self._template if self._template is not None else pl_module
                self._null_model = reinitialised_copy(source, self.null_seed)
                self._null_failed = self._null_model is None
            if self._null_model is not None:
                models[f"null:{id(self._null_model)}"] = (self._null_model, request)
        return models


def _index(i: object) -> bool:
    """Whether ``i`` is a layer index: a non-negative int."""
    return isinstance(i, int) and i >= 0
