"""``pdelightning-reproduce analyze``: every number of the report, computed afterwards from saved weights.

An *analysis unit* is a run (``<setting>[/<cell>]/seed<k>``, this module) or a pair (``pair_<name>/seed<k>``: a
model and an independently initialised reference, see :data:`~pdelightning_reproduce.settings.PAIRS`;
:mod:`.pairs`). Each unit loads the
checkpoints it needs, computes its quantities on the fixed probe set (:mod:`.probe`) with the functions of
:mod:`pdelightning.analysis`, and writes ``summary.csv`` (long format, :mod:`.summary`) into its folder. Fixing an
estimator means re-running this, never re-training. The quantities of a unit are listed in the functions below; the
rules that use them say exactly what each is (:mod:`.rules`).
"""

from __future__ import annotations

import itertools
import json
import math
import traceback
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdelightning.analysis import information as info
from pdelightning.analysis.cka import linear_cka
from pdelightning.analysis.linear_probe import crossfit_probe_information, probe_information
from pdelightning.analysis.perturbation import amplification, format_eps, gaussian_noise, per_sample_rms
from pdelightning.analysis.representation import layer_correlation
from pdelightning_reproduce.ib import ib_values
from pdelightning_reproduce.lens import lens_values
from pdelightning_reproduce.measures import eq21_per_step, refined
from pdelightning_reproduce.probe import (
    BATCH,
    EMBEDDING,
    ProbeData,
    forward_capture,
    layer_outputs,
    model_layers,
    probe_data,
)
from pdelightning_reproduce.recorder import CKPT_DIR, FINAL, load_model, read_payload
from pdelightning_reproduce.rules import (
    AMPLIFICATION_EPS,
    CKA_UNBIASED,
    EPS_GRID,
    IXT_MAX_SAMPLES,
    IXT_NOISE_VARIANCE,
    NOISE_SEED,
    PERTURBATION_N,
    SKIP_STEPS,
)
from pdelightning_reproduce.settings import RunSpec, setting
from pdelightning_reproduce.summary import SUMMARY_NAME, Row, rows_from, write_rows

_LN2 = math.log(2.0)


def checkpoints(rdir: Path) -> list[tuple[int, str, Path]]:
    """``(step, stage, path)`` of a run's saved weights: step 0 is ``init``, ``final.pt`` is ``final``."""
    d = Path(rdir) / CKPT_DIR
    out = []
    final_step = None
    if (d / FINAL).is_file():
        final_step = int(read_payload(d / FINAL)["step"])
    for p in sorted(d.glob("step*.pt")):
        step = int(p.stem[4:])
        if step == final_step:
            continue
        out.append((step, "init" if step == 0 else "", p))
    if final_step is not None:
        out.append((final_step, "final", d / FINAL))
    return out


def _f(x: Tensor | float) -> float:
    v = float(x)
    return v if math.isfinite(v) else math.nan


def _safe(fn: Any, *args: Any, **kw: Any) -> float:
    try:
        return _f(fn(*args, **kw))
    except (ValueError, RuntimeError):
        return math.nan


def _nanmean(t: Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: str, batch: int = 1000) -> tuple[float, float, Tensor]:
    logits = torch.cat([model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])
    loss = F.cross_entropy(logits, y, reduction="mean") if torch.isfinite(logits).all() else torch.tensor(math.nan)
    return float((logits.argmax(-1) == y).float().mean()), _f(loss), logits


def _test_accuracy(model: nn.Module, pdata: ProbeData, device: str, keep: dict[str, Tensor]) -> dict[str, float]:
    """Accuracy and loss on the full test split; the logits are kept in ``keep["logits"]``."""
    acc, loss, keep["logits"] = _accuracy(model, pdata.x_test, pdata.y_test, device)
    return {"test_acc": acc, "test_loss": loss}


# ---- per-model quantities --------------------------------------------------------------------------------------------
def representation_values(
    model: nn.Module, pdata: ProbeData, device: str, consecutive: bool, erank_layers: bool | Collection[str] = True
) -> dict[str, Any]:
    """CKA to the embedding, effective rank (at ``erank_layers``: all, none, or the names given), RMS and non-finite
    share per layer, and the accuracy on the probe set (``probe_acc``); with ``consecutive`` also the
    consecutive-layer Pearson correlation (Table 2) and CKA, all on pooled probe-set representations.
    """
    cap = forward_capture(model, pdata.x, device, pdata.pad_id, erank=erank_layers)
    emb = cap.pooled[EMBEDDING]
    v: dict[str, Any] = {"cka_to_embedding": {}, "erank": {}, "rms": {}, "nonfinite": {}}
    v["probe_acc"] = float((cap.logits.argmax(-1) == pdata.y).float().mean())
    for name in cap.layers:
        if name in cap.erank:
            v["erank"][name] = _nanmean(cap.erank[name])
        v["rms"][name] = cap.rms(name)
        v["nonfinite"][name] = cap.nonfinite[name] / max(cap.count[name], 1.0)
        if name != EMBEDDING:
            v["cka_to_embedding"][name] = _safe(linear_cka, cap.pooled[name], emb, CKA_UNBIASED)
    if consecutive:
        v["consecutive_corr"], v["cka_consecutive"] = {}, {}
        blocks = [n for n in cap.layers if n != EMBEDDING]
        for a, b in itertools.pairwise(blocks):
            v["consecutive_corr"][b] = _safe(layer_correlation, cap.pooled[a], cap.pooled[b], "pearson", "flattened")
            v["cka_consecutive"][b] = _safe(linear_cka, cap.pooled[a], cap.pooled[b], CKA_UNBIASED)
    return v


def _ity(t_fit: Tensor, y_fit: Tensor, t_probe: Tensor, y_probe: Tensor, n_classes: int) -> tuple[float, float]:
    """I(T;Y) >= H(Y) - CE (bits) of the shrinkage-LDA probe fitted on training-split features and scored on the
    probe set, unclipped (:func:`~pdelightning.analysis.linear_probe.probe_information`); ``nan`` for non-finite
    features. Returns ``(I(T;Y), H(Y) of the probe set)``.
    """
    if not (torch.isfinite(t_fit).all() and torch.isfinite(t_probe).all()):
        return math.nan, info.entropy_bits(y_probe)
    return probe_information(t_fit.double(), y_fit, t_probe.double(), y_probe, n_classes=n_classes, clip=False)


def information_values(model: nn.Module, pdata: ProbeData, device: str) -> dict[str, Any]:
    """I(T;Y) (probe fitted on the fitting set, scored on the probe set, unclipped; the rules' estimator), the
    cross-fitted probe-set estimate (``I_TY_crossfit``: 5-fold LDA on the probe set alone, test posts only; context),
    I(X;T) (KDE upper bound) per block, H(Y), and the model's own head bound H(Y) - CE/ln 2 on the probe set.
    """
    probe = forward_capture(model, pdata.x, device, pdata.pad_id, erank=False)
    fit = forward_capture(model, pdata.x_fit, device, pdata.pad_id, erank=False)
    sub = info.subsample(len(pdata.y), IXT_MAX_SAMPLES, 0)
    v: dict[str, Any] = {"I_TY": {}, "I_TY_crossfit": {}, "I_XT": {}}
    for name in probe.layers:
        if name == EMBEDDING:
            continue
        v["I_TY"][name] = _ity(fit.pooled[name], pdata.y_fit, probe.pooled[name], pdata.y, pdata.num_classes)[0]
        t_probe = probe.pooled[name]
        v["I_TY_crossfit"][name] = (
            crossfit_probe_information(t_probe.double(), pdata.y, n_classes=pdata.num_classes)[0]
            if torch.isfinite(t_probe).all()
            else math.nan
        )
        t = probe.pooled[name][sub].double()
        finite = bool(torch.isfinite(t).all())
        v["I_XT"][name] = info.kde_mutual_information(t, pdata.y[sub], IXT_NOISE_VARIANCE)[0] if finite else math.nan
    h_y = info.entropy_bits(pdata.y)
    ce = F.cross_entropy(probe.logits, pdata.y) if torch.isfinite(probe.logits).all() else torch.tensor(math.nan)
    v.update(
        H_Y=h_y, head_bound=h_y - _f(ce) / _LN2, probe_acc=float((probe.logits.argmax(-1) == pdata.y).float().mean())
    )
    return v


def gradient_values(model: nn.Module, pdata: ProbeData, device: str) -> dict[str, Any]:
    """Per block: ||dCE/dθ||, ||θ||, their ratio and the mean absolute gradient, CE on the gradient batch (eval
    mode, so no dropout and the bottleneck's mean).
    """
    model.zero_grad(set_to_none=True)
    x, y = pdata.x_grad.to(device), pdata.y_grad.to(device)
    with torch.enable_grad():
        F.cross_entropy(model(x), y).backward()
    v: dict[str, Any] = {"grad_norm": {}, "weight_norm": {}, "relgrad": {}, "grad_abs_mean": {}}
    for layer in model_layers(model):
        ps = [p for p in (layer.block or layer.module).parameters() if p.grad is not None]
        g = torch.cat([p.grad.detach().flatten().double() for p in ps])
        w = torch.cat([p.detach().flatten().double() for p in ps])
        name = layer.name
        v["grad_norm"][name], v["weight_norm"][name] = _f(g.norm()), _f(w.norm())
        v["relgrad"][name] = _f(g.norm() / w.norm())
        v["grad_abs_mean"][name] = _f(g.abs().mean())
    model.zero_grad(set_to_none=True)
    return v


def perturbation_values(model: nn.Module, pdata: ProbeData, device: str, n: int | None = None) -> dict[str, Any]:
    """Loss and accuracy with Gaussian noise ε x (sample's embedding RMS) on the embedding, for every ε of the fixed
    grid; per-layer amplification ||Δh_l|| / ||Δh_0|| at ``AMPLIFICATION_EPS``; on the first ``n`` probe samples
    (all by default). The noise of a sample depends only on its index in the test split and ε.
    """
    x, y, index = pdata.x[:n], pdata.y[:n], pdata.index[:n]
    v: dict[str, Any] = {"loss": {}, "acc": {}, "amplification": {}, "perturbation_n": float(len(y))}
    clean = forward_capture(model, x, device, pdata.pad_id, erank=False)
    v["loss_clean"] = _f(F.cross_entropy(clean.logits, y))
    v["acc_clean"] = float((clean.logits.argmax(-1) == y).float().mean())

    def noisy(eps: float) -> Any:
        def embed_fn(start: int, u0: Tensor, valid: Tensor | None) -> Tensor:
            idx = index[start : start + u0.shape[0]]
            z = gaussian_noise(idx, list(u0.shape[1:]), NOISE_SEED, None if valid is None else valid.cpu())
            return u0 + eps * per_sample_rms(u0, valid)[:, None, None] * z.to(u0)

        return embed_fn

    for eps in EPS_GRID:
        cap = forward_capture(model, x, device, pdata.pad_id, erank=False, embed_fn=noisy(eps))
        key = f"eps={format_eps(eps)}"
        finite = bool(torch.isfinite(cap.logits).all())
        v["loss"][key] = _f(F.cross_entropy(cap.logits, y)) if finite else math.inf
        v["acc"][key] = float((cap.logits.argmax(-1) == y).float().mean())
    # amplification: token-level clean vs noisy outputs, batch by batch
    amps: dict[str, list[Tensor]] = {}
    embed_fn = noisy(AMPLIFICATION_EPS)
    for start in range(0, len(x), BATCH):
        xb = x[start : start + BATCH].to(device)
        clean_out = layer_outputs(model, xb, pdata.pad_id)
        noisy_out = layer_outputs(model, xb, pdata.pad_id, embed_fn, start)
        valid = None if xb.dtype.is_floating_point else (xb != pdata.pad_id).cpu()
        dh0 = (noisy_out[EMBEDDING] - clean_out[EMBEDDING]).cpu()
        for name, h in noisy_out.items():
            if name != EMBEDDING:
                amps.setdefault(name, []).append(amplification((h - clean_out[name]).cpu(), dh0, valid))
    v["amplification"] = {k: _nanmean(torch.cat(a)) for k, a in amps.items()}
    return v


def refinement_values(
    model: nn.Module, pdata: ProbeData, device: str, logits: Tensor | None = None
) -> dict[str, float]:
    """The trained PDE model vs the same weights run as 2L steps of Δt/2 on the full test split (``logits``: the
    L-step model's test-split logits when already computed).
    """
    if logits is None:
        acc, _, z = _accuracy(model, pdata.x_test, pdata.y_test, device)
    else:
        acc, z = float((logits.argmax(-1) == pdata.y_test).float().mean()), logits
    acc2, _, z2 = _accuracy(refined(model, 2).to(device), pdata.x_test, pdata.y_test, device)
    dist = _f((z2 - z).norm() / z.norm())
    return {"refine_acc_L": acc, "refine_acc_2L": acc2, "refine_acc_change": acc2 - acc, "refine_logit_distance": dist}


# ---- units ----------------------------------------------------------------------------------------------------------
def analyze_run(spec: RunSpec, out: Path, device: str = "cpu") -> int:
    """Analyse one run; writes ``<run>/summary.csv`` and returns the number of rows."""
    rdir = spec.path(out)
    meta = json.loads((rdir / "run.json").read_text())
    s = setting(spec.setting)
    rows: list[Row] = []
    ckpts = checkpoints(rdir)
    if meta.get("status") == "failed" or not ckpts:
        write_rows(rdir / SUMMARY_NAME, rows)
        return 0
    pdata = probe_data(meta)
    main = s.role == "main"
    for step, stage, path in ckpts:
        if step in SKIP_STEPS and stage == "":
            continue
        model, _ = load_model(path, device)
        layers = model_layers(model)
        last = layers[-1].name
        test: dict[str, Tensor] = {}  # the accuracy group's test logits, reused by the refinement group

        groups: list[tuple[str, Any]] = []
        if any(t.pde is not None for t in layers):
            groups.append(("eq21", lambda m: {"eq21": eq21_per_step(m)}))
        if s.data == "mnist" and (stage == "final" or (stage == "init" and main)):  # sweeps: final only
            ranks: bool | set[str] = True if main else {EMBEDDING, last}
            groups.append(("representation", lambda m, r=ranks: representation_values(m, pdata, device, main, r)))
        if s.data == "newsgroups":
            groups.append(("information", lambda m: information_values(m, pdata, device)))
            groups.append(("ib_bound", lambda m: ib_values(m, pdata, device)))  # the IB rules' lower bounds (.ib)
            groups.append(("gradients", lambda m: gradient_values(m, pdata, device)))
        if stage == "final":
            if main and s.data == "mnist":  # the others report the accuracy of their probe-set pass instead
                groups.append(("accuracy", lambda m, t=test: _test_accuracy(m, pdata, device, t)))
            if s.data == "newsgroups":
                n = PERTURBATION_N[s.data]
                groups.append(("perturbation", lambda m, n=n: perturbation_values(m, pdata, device, n)))
            if spec.setting == "mnist_pde":
                groups.append(("refinement", lambda m, t=test: refinement_values(m, pdata, device, t.get("logits"))))
            if main and s.data == "mnist" and all(hasattr(b, "attn") for b in model.blocks):  # (repro-models)
                groups.append(("lens", lambda m: lens_values(m, pdata, device)))
        v: dict[str, Any] = {}
        for name, fn in groups:
            try:
                v.update(fn(model))
            except Exception:  # one failing group must not lose the others: logged and marked in the summary
                traceback.print_exc()
                v[f"analysis_error_{name}"] = 1.0
        rows += rows_from(spec.setting, spec.cell, spec.seed, step, stage, v)
    if s.data == "newsgroups":
        sub = info.subsample(len(pdata.y), IXT_MAX_SAMPLES, 0)
        ceiling = info.distinct_entropy_bits(pdata.x[sub])
        rows.append(Row(spec.setting, spec.cell, spec.seed, 0, "init", "ixt_ceiling", "", ceiling))
        rows.append(Row(spec.setting, spec.cell, spec.seed, 0, "init", "probe_n", "", float(len(pdata.y))))
        rows.append(Row(spec.setting, spec.cell, spec.seed, 0, "init", "fit_n", "", float(len(pdata.y_fit))))
        rows.append(Row(spec.setting, spec.cell, spec.seed, 0, "init", "probe_d", "", float(model.d_model)))
    return write_rows(rdir / SUMMARY_NAME, rows)


def eps_label(eps: float) -> str:
    """The ``layer`` column of a perturbation value at ``eps``."""
    return f"eps={format_eps(eps)}"


__all__ = ["analyze_run", "checkpoints", "eps_label", "np"]
