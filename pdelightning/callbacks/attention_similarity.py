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
:mod:`pdelightning.analysis.attention`. :class:`AttentionSimilarity` is a thin adapter that consumes the shared
probe captures, gathers per-sample sums across ranks and logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from typing_extensions import override

from pdelightning._checks import check_choice
from pdelightning.adapters.windowed import dense_attention
from pdelightning.analysis.attention import MATCH_BY, METRICS, SKILL_MIN_ROOM
from pdelightning.analysis.attention_layers import compare_layers, summarize_layer
from pdelightning.callbacks._layout import DETAIL
from pdelightning.callbacks._reference_probe import ReferenceProbe
from pdelightning.plots import attention_by_layer_figure, attention_maps_figure
from pdelightning.probing.capture import Request
from pdelightning.probing.hub import ProbeBatch, ProbeSession
from pdelightning.probing.probe_set import partner_rows
from pdelightning.probing.store import GatherStore

NULLS = ("uniform", "shuffled", "random_init")
"""The null baselines: uniform attention, the reference on another probe sample, a re-initialised model copy."""


def _all_valid(n: int, t: int, device: torch.device) -> Tensor:
    return torch.ones(n, t, dtype=torch.bool, device=device)


# ---- the callback ----------------------------------------------------------------------------------------
class AttentionSimilarity(ReferenceProbe):
    r"""Compare the attention of the model under training with a reference model's (paper section 3.2).

    On a fixed probe set both models run on the same inputs; their attention probabilities (softmax of
    eq. (10), ``[B, H, T, T]``) are compared layer by layer:

    * **Layers**: model layer ``i`` with reference layer ``i`` for ``i < min(L, L_ref)`` (extra layers of the
      deeper model are not compared), or as given by ``layer_map``. Keys carry the model's layer names.
    * **Heads**: head order is arbitrary, so heads are paired per layer by the Hungarian method
      (:func:`~pdelightning.analysis.attention.match_heads`) on the probe-set mean of the per-row cosine
      (``match_by="cosine"``) or JS divergence; with different head counts ``min(H, H_ref)`` pairs are formed. The
      matching is made after the gather, on the whole probe set, identically on every rank. ``cosine_unmatched`` pairs
      head ``i`` with head ``i`` for comparison.
    * **Metrics**, computed per query row and then averaged over the valid rows of the probe set (never over
      flattened maps): cosine similarity, ``KL(model || reference)`` in nats with the reference clamped at
      ``eps``, and Jensen-Shannon divergence in nats (in ``[0, ln 2]``). Rows of padded queries are
      excluded (the padding mask the model itself uses, or the batch's ``attention_mask``); masked keys (padding,
      causal future) already have probability 0.
    * **Nulls** (each gets the same head matching, so the matching's optimism is in the null too):
      ``uniform``: uniform attention over the keys the reference may attend (valid and, for causal models,
      not in the future) vs the reference (averaged over all reference heads); ``shuffled``: the model's
      attention on sample ``i`` vs the reference's on its partner probe sample (probe positions ``2k`` and
      ``2k+1`` are partners: a random other sample, realistic attention statistics, no correspondence; rows
      valid in both are compared; no extra forward); ``random_init``: a copy of the model re-initialised by
      its family's own initialiser (seeded, made at the first probe) vs the reference; dropped with a warning
      when the family has none (it would be a copy of the model).
    * **Skill** against the *strongest* enabled null (highest null cosine; lowest null KL/JS):
      :func:`~pdelightning.analysis.attention.skill_score`, ``(s - s_null) / (1 - s_null)`` for cosine and
      ``(d_null - d) / d_null`` for KL/JS, and the raw **margin** over that null (``s - s_null``,
      ``d_null - d``). When the null leaves little room (a near-uniform reference makes the uniform null's
      cosine ~0.99), the skill's denominator is tiny and the skill meaningless: read the margin then.
    * **Entropy**: mean attention entropy per row (nats) of the model and of the reference.

    Why the nulls: two unrelated near-uniform attentions score cosine ≈ 0.99 and KL ≈ 0.01 (see the module
    docstring); only the skill says whether the model's agreement exceeds such chance agreement.

    The reference is one of:

    * ``reference``: an ``nn.Module`` given in Python (frozen and put in eval mode by this callback);
    * ``reference_checkpoint``: a Lightning checkpoint, loaded with ``reference_class.load_from_checkpoint``
      (default :class:`~pdelightning.task.ClassificationTask`, which rebuilds from checkpoints our CLI wrote,
      whose hparams hold the model's ``class_path``);
    * ``reference_config``: a YAML config in our CLI format whose ``model:`` section is instantiated (see
      :func:`~pdelightning.callbacks._reference.build_from_config`; data-linked arguments such as ``num_classes`` and
      ``image_size`` missing from the file are copied from the model under training). Alone it gives a freshly
      initialised reference; together with ``reference_checkpoint`` the checkpoint's ``state_dict`` is loaded into it
      (for checkpoints whose hparams cannot rebuild the model, e.g. a task built in Python). Checkpoints are unpickled:
      give only files you trust;
    * none of them: a frozen copy of the model taken at the start of training (attention drift from
      initialisation); this copy is saved in the callback state so a resumed run keeps it.

    Cost: per probe batch the model's forward is shared with the other callbacks; the reference and the
    re-initialised copy run once each (shared too, when another callback uses the same reference module).
    Held between probes are the reference and the re-initialised copy. Nothing is kept across probes but
    per-sample ``[H, H_ref]`` sums until the gather; the checkpoint state is the initial-copy reference.

    Loaded references are frozen, in eval mode, moved to the module's device at each probe; their layers are
    found by their adapters (:mod:`pdelightning.adapters`), or the ``reference_layers``/``reference_attention``
    globs. Both models must tokenize the probe inputs alike
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
        log_figures: write the attention-map and per-layer figures (on the probes that draw figures).
        null_seed: seed of the re-initialisation.
        max_samples: how many probe samples the comparison uses (a random subset of whole shuffled-null pairs, the
            same at every probe and on any number of processes; the reference and the null model run on it only;
            ``None``: the whole probe set).
        skill_min_room: the least room a null must leave (``1 - s_null`` for cosine, ``d_null`` for KL/JS) for a
            skill to be reported; below it the skill is NaN (its denominator would blow up tiny differences, e.g.
            skill -28 against a uniform null at cosine 0.988) and the margin is the number to read.
        trust_checkpoint: load ``reference_checkpoint`` with ``weights_only=False``, running its pickle code; only
            for a file whose author you trust (by default it is loaded as data, and a file holding any other
            pickle global is refused with ``UntrustedFileError``).
        **kwargs: :class:`~pdelightning.callbacks.ProbeCallback` arguments (cadence, probe set, globs).

    Raises:
        ValueError: on conflicting reference arguments, an unknown null or ``match_by``, a bad ``eps`` or
            ``layer_map``; at setup, on a ``layer_map`` index out of range.
        TargetNotFoundError: at setup, when the model or the reference has no layers with attention.
        FileNotFoundError: at setup, when ``reference_checkpoint`` or ``reference_config`` does not exist.

    Logged metrics (``analysis/attention_similarity/<quantity>/<layer>`` and ``.../<quantity>/mean`` over
    layers, ``<layer>`` the model's layer name, e.g. ``blocks.0``):
        ``cosine``, ``kl``, ``js`` (matched heads); ``entropy`` (nats);
        ``cosine_skill``, ``kl_skill``, ``js_skill`` (vs the strongest enabled null). A skill is undefined, and
        then not logged (said once in the log), where the strongest null leaves less than ``skill_min_room``.
        Secondary, under ``analysis/attention_similarity/detail/<quantity>/<layer>``:
        ``cosine_null_uniform``, ``kl_null_uniform``, ``js_null_uniform``,
        ``cosine_null_shuffled``, ``kl_null_shuffled``, ``js_null_shuffled``,
        ``cosine_null_random_init``, ``kl_null_random_init``, ``js_null_random_init`` (enabled nulls only);
        ``cosine_margin``, ``kl_margin``, ``js_margin`` (raw improvement over the strongest enabled null);
        ``cosine_unmatched`` (head ``i`` with head ``i``); ``entropy_reference`` (nats).
        Figures: ``analysis/attention_similarity/attention_maps`` (head-averaged attention of probe sample 0,
        model above reference, per layer) and ``analysis/attention_similarity/by_layer`` (cosine per layer
        beside its nulls, and the cosine/JS skills per layer).

    Example::

        trainer = L.Trainer(callbacks=[AttentionSimilarity(reference_checkpoint="transformer.ckpt", every_n_epochs=1)])
        trainer.fit(pde_task, datamodule=dm)
    """

    name = "attention_similarity"
    needs = ("layers", "attention")
    detail = (r"(cosine|kl|js)_null_[a-z_]+", r"(cosine|kl|js)_margin", "cosine_unmatched", "entropy_reference")
    undefined: ClassVar[dict[str, str]] = {f"{m}_skill": f"null leaves no room; see detail/{m}_margin" for m in METRICS}

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
        log_figures: bool = True,
        null_seed: int = 0,
        skill_min_room: float = SKILL_MIN_ROOM,
        max_samples: int | None = 64,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        check_choice("match_by", match_by, MATCH_BY)
        if isinstance(nulls, str):
            nulls = (nulls,)
        unknown = [n for n in nulls if n not in NULLS]
        if unknown:
            raise ValueError(f"nulls={list(nulls)!r} contains unknown baselines {unknown}; choose from {NULLS}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps={eps} must lie in (0, 1)")
        super().__init__(
            reference,
            reference_checkpoint,
            reference_config,
            reference_class,
            reference_layers,
            reference_attention,
            layer_map,
            null="random_init" in nulls,
            null_seed=null_seed,
            trust_checkpoint=trust_checkpoint,
            **kwargs,
        )
        self.match_by = match_by
        self.nulls = tuple(n for n in NULLS if n in nulls)
        self.eps = eps
        self.log_figures = log_figures
        if not 0.0 <= skill_min_room < 1.0:
            raise ValueError(f"skill_min_room={skill_min_room} must lie in [0, 1)")
        self.skill_min_room = skill_min_room
        if max_samples is not None and (max_samples < 2 or max_samples % 2):
            raise ValueError(f"max_samples={max_samples} must be an even number >= 2 (whole shuffled pairs), or None")
        self.max_samples = max_samples
        self.last_results: dict[str, dict[str, Any]] = {}
        """Per model layer, the results of the latest probe (including head matchings and pooled matrices)."""

    @property
    @override
    def state_key(self) -> str:
        ref = "initial" if self.initial else (self.reference_checkpoint or self.reference_config or "module")
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs, reference=ref, **self.patterns
        )

    # ---- probing -----------------------------------------------------------------------------------------------
    @override
    def request(self) -> Request:
        return Request(attention=True)

    @override
    def reference_request(self) -> Request:
        return Request(attention=True, samples=self.max_samples)

    @override
    def begin(self, session: ProbeSession) -> None:
        assert self._reference is not None
        self._ref_key = f"reference:{id(self._reference)}"
        self._null_key = f"null:{id(self._null_model)}" if self._null_model is not None else None
        targets, ref_targets = session.targets["model"], session.targets[self._ref_key]
        if self.initial and any(p is not None for p in self.patterns.values()):
            ref_targets = self._reference_targets(self._reference)[1]
            session.targets[self._ref_key] = ref_targets
        self._pairs = [
            (targets.layers[i].name, ref_targets.layers[j].name)
            for i, j in self._layer_pairs(len(targets.layers), len(ref_targets.layers))
        ]
        self._windows = {t.name: t.windows for t in targets.layers}
        comps = ["main", "shuffled"] if "shuffled" in self.nulls else ["main"]
        comps += ["random_init"] if self._null_key is not None else []
        comps += ["uniform"] if "uniform" in self.nulls else []
        a_names = [a for a, _ in self._pairs]
        self._fields = ["rows", "rows_shuffled", "entropy", "entropy_reference"]
        self._fields += [f"{c}/{m}" for c in comps for m in METRICS]
        keys = [f"{f}/{a}" for f in self._fields for a in a_names]
        self._store = GatherStore(keys).to(session.device)
        self._maps: dict[str, tuple[Tensor, Tensor]] = {}

    @override
    def consume(self, pb: ProbeBatch) -> None:
        pb = pb.take(pb.session.subset(pb.index, self.max_samples))
        p_all = pb.captured["model"].attention
        r_all = pb.captured[self._ref_key].attention
        n_all = pb.captured[self._null_key].attention if self._null_key is not None else {}
        partner = partner_rows(pb.index, pb.session.partner) if "shuffled" in self.nulls else None
        uniform = "uniform" in self.nulls
        ps, rs, valids = [], [], []
        for a, b in self._pairs:
            p, r = p_all[a].float(), r_all[b].float()
            if p.shape[-1] != r.shape[-1]:
                raise ValueError(
                    f"model layer {a} attends over T={p.shape[-1]} tokens but reference layer {b} over "
                    f"T={r.shape[-1]}: both models must tokenize the probe inputs the same way"
                )
            n, t = p.shape[0], p.shape[-2]  # query rows (windowed attention: [B, H, T, N], one row per token)
            valid = pb.valid if pb.valid is not None and pb.valid.shape == (n, t) else _all_valid(n, t, p.device)
            ps.append(p)
            rs.append(r)
            valids.append(valid)
            here = pb.index == pb.session.figure_position  # the figure's sample lives on process 0
            if self.log_figures and bool(here.any()):
                k = int(here.nonzero()[0, 0])
                keep = valid[k]
                pk, rk = p[k : k + 1].mean(1, keepdim=True), r[k : k + 1].mean(1, keepdim=True)  # heads averaged
                if self._windows.get(a) is not None:  # the full token-by-token map of one sample, for the figure
                    pk, rk = dense_attention(pk, self._windows[a]), dense_attention(rk, self._windows[a])
                self._maps[a] = (pk[0, 0][keep][:, keep].cpu(), rk[0, 0][keep][:, keep].cpu())
        nulls = [n_all[a].float() for a, _ in self._pairs] if self._null_key is not None else None
        if partner is not None and ps and len(partner) != len(ps[0]):  # a stand-in row (no sample selected here)
            partner = torch.full((len(ps[0]),), -1, dtype=torch.long, device=partner.device)
        per_layer = compare_layers(ps, rs, valids, self.eps, null=nulls, partner=partner, uniform=uniform)
        update = {f"{k}/{a}": v for (a, _), sums in zip(self._pairs, per_layer, strict=True) for k, v in sums.items()}
        self._store.update(pb.index, **update)

    @override
    def finish(self, session: ProbeSession) -> None:
        out = self._store.gather()  # a collective: every rank, same tensors
        self._store = None  # type: ignore[assignment]
        results = {}
        for a, _ in self._pairs:
            sums = {f: out[f"{f}/{a}"] for f in self._fields}
            results[a] = summarize_layer(sums, self.match_by, "uniform" in self.nulls, self.skill_min_room)
        self.last_results = results
        metrics: dict[str, float] = {}
        for a, res in results.items():
            metrics.update({self.key(q, a): v for q, v in res.items() if isinstance(v, float)})
        for q in sorted({q for res in results.values() for q, v in res.items() if isinstance(v, float)}):
            values = [res[q] for res in results.values() if q in res and math.isfinite(res[q])]
            metrics[self.key(q, "mean")] = float(np.mean(values)) if values else float("nan")  # nan: not logged
        self.log_scalars(session.trainer, metrics, session.step)
        if self.log_figures:
            maps, pairs = dict(self._maps), list(self._pairs)
            plain = {a: {q: v for q, v in res.items() if isinstance(v, float)} for a, res in results.items()}
            nulls = [n for n in self.nulls if n != "random_init" or self._null_key is not None]
            if maps:
                self.figure(session, self.key("attention_maps"), attention_maps_figure, maps, pairs)
            self.figure(session, self.key("by_layer"), attention_by_layer_figure, plain, nulls)

    @override
    def layout(self) -> dict[str, list[str]]:
        base = f"analysis/{self.name}"
        charts = {f"{m} per layer": [rf"^{base}/{m}/[^/]+$"] for m in (*METRICS, "entropy")}
        charts |= {f"{m} skill per layer": [rf"^{base}/{m}_skill/[^/]+$"] for m in METRICS}
        for m in METRICS:
            means = [rf"^{base}/{m}/mean$", rf"^{base}/{DETAIL}/{m}_null_[a-z_]+/mean$"]
            charts[f"{m} vs nulls (mean over layers)"] = means
        return charts
