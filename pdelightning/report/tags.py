"""Every TensorBoard tag the run report reads, in ONE table (:data:`TAGS`), and the helpers that look them up.

The callbacks log ``analysis/<callback>/<quantity>[/<layer>]`` (their docstrings' *Logged metrics*). A pattern here
names the callback and the quantity; any sub-prefixes between them are allowed (``analysis/<callback>/detail/
<quantity>/<layer>`` matches the same pattern), so moving secondary quantities under a sub-prefix does not break the
report. Renaming a quantity means editing its row here, nothing else.

Scalars are a plain mapping ``tag -> [(step, value), ...]`` (:data:`Scalars`), as :mod:`.events` reads them from the
event files; values may be NaN (older runs log undefined values as NaN, newer ones leave them out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Series = Sequence[tuple[int, float]]
Scalars = Mapping[str, Series]

CALLBACKS: dict[str, str] = {
    "attention_similarity": "AttentionSimilarity",
    "information_flow": "InformationFlow",
    "layer_mutual_information": "LayerMutualInformation",
    "gradient_flow": "GradientFlow",
    "perturbation_eval": "PerturbationEval",
    "stability_monitor": "StabilityMonitor",
    "pde_fit": "PDEFit",
    "jacobian_stability": "JacobianStability",
    "attention_rollout": "AttentionRollout",
}
"""Tag prefix (``analysis/<prefix>/``) -> callback class name, in the order the report lists them."""

AGGREGATE_LAYERS = frozenset({"mean"})
"""Last tag components that are summaries over layers, not layers (``.../cosine/mean``)."""


@dataclass(frozen=True)
class TagPattern:
    """One quantity of one callback: ``analysis/<callback>/[<sub>/...]<quantity>[/<layer>]``.

    Attributes:
        callback: the tag prefix after ``analysis/`` (``stability_monitor``; ``overhead`` for the hub's cost).
        quantity: the tag component naming the quantity (``eq21``).
        per_layer: whether a layer name follows the quantity.
    """

    callback: str
    quantity: str
    per_layer: bool = True

    @property
    def regex(self) -> re.Pattern[str]:
        """The compiled pattern; group ``layer`` holds the layer for per-layer quantities."""
        head = rf"^analysis/{re.escape(self.callback)}/(?:[^/]+/)*?{re.escape(self.quantity)}"
        return re.compile(head + (r"/(?P<layer>[^/]+)$" if self.per_layer else "$"))


def _p(callback: str, quantity: str, per_layer: bool = True) -> tuple[TagPattern, ...]:
    return (TagPattern(callback, quantity, per_layer),)


TAGS: dict[str, tuple[TagPattern, ...]] = {
    # ---- eq. (21): the model's own PDE layers first, then the number from PDEFit's fitted coefficients
    "eq21_monitor": _p("stability_monitor", "eq21"),
    "eq21_jacobian": _p("jacobian_stability", "eq21"),
    "eq21_fitted": _p("pde_fit", "eq21_fitted"),
    # ---- GradientFlow
    "grad_norm": _p("gradient_flow", "grad_norm"),
    "grad_vanishing": _p("gradient_flow", "vanishing"),
    "grad_exploding": _p("gradient_flow", "exploding"),
    "update_ratio": _p("gradient_flow", "update_ratio"),
    # ---- AttentionSimilarity
    "attn_cosine": _p("attention_similarity", "cosine"),
    "attn_cosine_null_uniform": _p("attention_similarity", "cosine_null_uniform"),
    "attn_entropy": _p("attention_similarity", "entropy"),
    "attn_entropy_reference": _p("attention_similarity", "entropy_reference"),
    "attn_kl_null_uniform": _p("attention_similarity", "kl_null_uniform"),
    # ln(number of keys) per layer, if a callback logs it (none does yet; see attention_near_uniform)
    "attn_log_keys": _p("attention_similarity", "entropy_uniform") + _p("attention_similarity", "log_keys"),
    # ---- LayerMutualInformation
    "mi_I_XT": _p("layer_mutual_information", "I_XT"),
    "mi_I_TY": _p("layer_mutual_information", "I_TY"),
    "mi_saturated": _p("layer_mutual_information", "saturated"),
    "mi_ceiling": _p("layer_mutual_information", "I_XT_ceiling", False),
    "mi_log2_N": _p("layer_mutual_information", "log2_N", False),
    "mi_H_Y": _p("layer_mutual_information", "H_Y", False),
    # ---- StabilityMonitor
    "loss_spike": _p("stability_monitor", "loss_spike", False),
    "loss_nonfinite": _p("stability_monitor", "nonfinite", False),
    "act_nonfinite": _p("stability_monitor", "nonfinite"),
    "loss_ema": _p("stability_monitor", "loss_ema", False),
    "rms_growth": _p("stability_monitor", "rms_growth"),
    "W_VO_spectral": _p("stability_monitor", "W_VO_spectral"),
    # ---- InformationFlow, PerturbationEval, PDEFit, JacobianStability, AttentionRollout (headlines)
    "cka_consecutive": _p("information_flow", "cka_consecutive"),
    "consecutive_corr": _p("information_flow", "consecutive_corr"),
    "pert_acc_clean": _p("perturbation_eval", "acc_clean", False),
    "pert_critical_eps": _p("perturbation_eval", "critical_eps", False),
    "pert_departure_ratio": _p("perturbation_eval", "departure_ratio", False),
    "amplification": _p("perturbation_eval", "amplification"),
    "pde_r2_attention": _p("pde_fit", "r2_attention"),
    "pde_r2_diffusion": _p("pde_fit", "r2_diffusion"),
    "pde_r2": _p("pde_fit", "r2"),
    "jac_spectral_norm": _p("jacobian_stability", "spectral_norm"),
    "jac_lyapunov": _p("jacobian_stability", "lyapunov", False),
    "rollout_entropy": _p("attention_rollout", "entropy"),
    "rollout_mixing": _p("attention_rollout", "mixing"),
    # ---- the hub's cost of analysis
    "overhead_fraction": _p("overhead", "fraction", False),
    "overhead_seconds": _p("overhead", "probe_seconds", False),
}
"""Name -> the patterns (alternatives, first match wins per tag) of every quantity the report reads."""

TRAIN_LOSS_TAGS = ("train/loss", "train_loss", "loss")
"""The training loss, as ``ClassificationTask`` logs it first, then common Lightning names."""
VAL_LOSS_TAGS = ("val/loss", "val_loss")
"""The validation loss (read for non-finite values)."""
FIGURE_TAG = re.compile(r"^analysis/")
"""Images the report embeds (the callbacks' figures)."""


# ---- lookups ------------------------------------------------------------------------------------------------------
def per_layer(scalars: Scalars, name: str) -> dict[str, list[tuple[int, float]]]:
    """``{layer: series}`` of the per-layer quantity ``name`` (summaries such as ``mean`` left out), in depth order."""
    found: dict[str, list[tuple[int, float]]] = {}
    for pattern in TAGS[name]:
        rx = pattern.regex
        for tag, series in scalars.items():
            m = rx.match(tag)
            if m and m.group("layer") not in AGGREGATE_LAYERS and m.group("layer") not in found:
                found[m.group("layer")] = sorted(series)
    return {k: found[k] for k in sorted(found, key=depth_key)}


def single(scalars: Scalars, name: str) -> list[tuple[int, float]]:
    """The series of the run-level quantity ``name`` (empty when not logged)."""
    for pattern in TAGS[name]:
        rx = pattern.regex
        for tag in sorted(scalars):
            if rx.match(tag):
                return sorted(scalars[tag])
    return []


def train_loss(scalars: Scalars) -> tuple[str, list[tuple[int, float]]] | None:
    """``(tag, series)`` of the training loss, or ``None``."""
    for tag in TRAIN_LOSS_TAGS:
        if scalars.get(tag):
            return tag, sorted(scalars[tag])
    return None


def callbacks_logged(scalars: Scalars, images: Iterable[str] = ()) -> list[str]:
    """The callback prefixes (keys of :data:`CALLBACKS`) with at least one tag, in :data:`CALLBACKS` order."""
    seen = {t.split("/")[1] for t in (*scalars, *images) if t.startswith("analysis/") and t.count("/") >= 2}
    return [c for c in CALLBACKS if c in seen]


def analysis_tags(scalars: Scalars) -> list[str]:
    """Every ``analysis/*`` scalar tag."""
    return sorted(t for t in scalars if t.startswith("analysis/"))


# ---- small pure helpers shared by rules and headlines --------------------------------------------------------------
def finite(series: Series) -> list[tuple[int, float]]:
    """The points of ``series`` whose value is finite."""
    return [(s, v) for s, v in series if math.isfinite(v)]


def last(series: Series) -> tuple[int, float] | None:
    """The last finite point, or ``None``."""
    points = finite(series)
    return points[-1] if points else None


def at_step(series: Series, step: int) -> float | None:
    """The value logged at ``step`` (the last one if several), or ``None``."""
    values = [v for s, v in series if s == step]
    return values[-1] if values else None


def depth_key(layer: str) -> tuple[int, tuple[tuple[int, int | str], ...]]:
    """Sort key putting ``embedding`` first, numbered layers in numeric order, ``head``/``other`` last.

    Example::

        >>> sorted(["head", "blocks.10", "blocks.2", "embedding"], key=depth_key)
        ['embedding', 'blocks.2', 'blocks.10', 'head']
    """
    rank = 0 if layer == "embedding" else 2 if layer in ("head", "other") else 1
    parts = tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", layer) if p)
    return rank, parts


def layer_span(layers: Sequence[str]) -> str:
    """A short name for a list of layers: runs of consecutive numbers joined with an en dash.

    Example::

        >>> layer_span(["blocks.7", "blocks.8", "blocks.9", "head"])
        'blocks.7–9, head'
    """
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            prefix, first, end = run[0][0], run[0][1], run[-1][1]
            out.append(f"{prefix}{first}" if first == end else f"{prefix}{first}–{end}")
            run.clear()

    for layer in sorted(layers, key=depth_key):
        m = re.fullmatch(r"(.*?)(\d+)", layer)
        if m and run and run[-1][0] == m.group(1) and run[-1][1] + 1 == int(m.group(2)):
            run.append((m.group(1), int(m.group(2))))
            continue
        flush()
        if m:
            run.append((m.group(1), int(m.group(2))))
        else:
            out.append(layer)
    flush()
    return ", ".join(out)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a sentence: ``3`` significant digits, ``n/a`` for ``None``/NaN.

    Example::

        >>> fmt(0.012345), fmt(1234.5), fmt(float("nan"))
        ('0.0123', '1.23e+03', 'n/a')
    """
    if value is None or not math.isfinite(value):
        return "n/a" if value is None or math.isnan(value) else str(value)
    return f"{value:.{digits}g}"
