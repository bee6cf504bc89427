"""``pdelightning report``: a Markdown reproduction report of arXiv 2408.09523 from finished runs' TensorBoard logs.

Reads the scalar logs of finished runs (``<root>/<setting>/seed<k>/events.out.tfevents.*`` and ``run.json``) with
TensorBoard's ``EventAccumulator``, compares them with the paper's numbers (:mod:`pdelightning.reproduce.paper`, the
only numbers in the report not computed from the logs), and writes ``<out>/REPRODUCTION.md`` with PNG figures in
``<out>/figures/``. Nothing is re-trained.

Conventions, stated once here and in the report:

* "at the end of training" is the last logged step of a scalar, "at initialisation" its first (step 0).
* ``mean ± std (n=…)`` is over seeds; std is the sample standard deviation (``ddof=1``); one seed shows no std.
* Claims use the **complete** runs only (``run.json`` says ``completed: true``). The instability claims of the v2
  ablations are about trajectories and also use incomplete runs (a run that blew up may have stopped early).
* A claim whose runs or scalars are absent gets the verdict ``not comparable`` with the reason; it is never skipped.
* Every verdict comes from an explicit rule whose text is in the table's "why" column; the rule's thresholds are the
  module constants below.

Example::

    pdelightning report runs/ --out reports/
    python -m pdelightning.reproduce.report runs/mnist_pde/seed0 runs/mnist_transformer/seed0 --out reports/
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pdelightning.reproduce import paper

__all__ = ["SETTINGS", "Run", "discover_runs", "main", "parse_eps_label", "write_report"]

#: The settings the reproduction driver writes, in report order.
SETTINGS: tuple[str, ...] = (
    "mnist_transformer",
    "mnist_pde",
    "mnist_transformer_no_residual",
    "mnist_transformer_no_layernorm",
    "mnist_pde_stabilized",
    "newsgroups_transformer",
    "newsgroups_pde",
)
#: Seeds expected at least (the union with the seeds found is expected).
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)

# ---- rule thresholds (the text of every rule is built from these) ------------------------------------------------
TABLE2_TOLERANCE = 0.05  # |ours - paper| per pair
TABLE2_MIN_PAIRS = 7  # of the 9 pairs
TABLE3_MIN_FALL = 0.5  # layer 1 minus layer 10
TABLE3_MAX_END = 0.2  # layer 10 below this
ATTENTION_MIN_SKILL = 0.5  # skill vs the strongest null
ATTENTION_KL_FACTOR = 2.0  # ours at most this times the paper's KL
MAJORITY = 0.5  # "primarily", "mostly", "general": more than this fraction of the layers
GRADIENT_FIRST_LAYER_FACTOR = 2.0  # "markedly higher": blocks.0 at least this times every other block
PERTURBATION_SIMILAR_REL = 0.10  # relative loss increase below which a model "performs as when clean"
PERTURBATION_NEAR_DECADES = 0.5  # "approximately eps": within this many decades
DRIFT_FACTOR = 2.0  # "catastrophic drift": ablated drift at least this times the baseline's
IXT_STATIC_BITS = 0.1  # an I(X;T) curve moving less than this over training shows no compression
EXPLOSION_FACTOR = 10.0  # "explosive": max gradient norm at least this times the baseline's

FIGURE_DPI = 90
MAX_FIGURE_BYTES = 200_000

HOLDS, FAILS, NOT_COMPARABLE = "holds", "does not hold", "not comparable"
_NEWSGROUPS_MODELS = (("Transformer", "newsgroups_transformer"), ("PDE", "newsgroups_pde"))

_IF = "analysis/information_flow"
_AS = "analysis/attention_similarity"
_MI = "analysis/layer_mutual_information"
_GF = "analysis/gradient_flow"
_PE = "analysis/perturbation_eval"
_SM = "analysis/stability_monitor"
_NULLS = ("uniform", "shuffled", "random_init")
_SEED_DIR = re.compile(r"^seed(\d+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)$")

Series = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step


# ---- small pure helpers ------------------------------------------------------------------------------------------
def parse_eps_label(label: str) -> float:
    """The ε of a perturbation tag or label: ``"eps=3.16e-04"``, ``"1e-03"`` or a full tag ``".../loss/eps=1e+00"``.

    Example::

        >>> parse_eps_label("analysis/perturbation_eval/loss/eps=3.16e-04"), parse_eps_label("1e+00")
        (0.000316, 1.0)

    Raises:
        ValueError: the label holds no number.
    """
    text = label.rsplit("/", 1)[-1].strip()
    text = text.removeprefix("eps=")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"cannot read an epsilon from {label!r}; expected e.g. 'eps=1e-03' or '3.16e-04'") from None


def fmt(x: float | None) -> str:
    """Four decimals for ordinary magnitudes (as the paper's tables), else three significant digits."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4f}"
    return f"{x:.2e}"


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (``ddof=1``; ``nan`` for one value) and count."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)


def fmt_ms(values: Sequence[float]) -> str:
    """``mean ± std (n=k)`` over seeds; ``—`` without values."""
    m, s, n = _stats(values)
    if n == 0:
        return "—"
    if n == 1:
        return f"{fmt(m)} (n=1)"
    return f"{fmt(m)} ± {fmt(s)} (n={n})"


def _mean(values: Sequence[float]) -> float:
    return _stats(values)[0]


def fmt_mean(values: Sequence[float]) -> str:
    """The seed mean alone; ``—`` without values."""
    return fmt(_mean(values)) if len(values) else "—"


def _layer_key(name: str) -> tuple[int, int, str]:
    m = _BLOCK.match(name)
    if name == "embedding":
        return (0, 0, name)
    return (1, int(m.group(1)), name) if m else (2, 0, name)


def _fmt_eps(eps: float) -> str:
    return "none on the grid" if not math.isfinite(eps) else f"{eps:.3g}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- runs ----------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One ``<setting>/seed<k>`` run: its ``run.json`` (``meta``) and its scalars (``tag -> (steps, values)``)."""

    setting: str
    seed: int
    path: Path | None
    meta: dict[str, Any] | None = None
    scalars: dict[str, Series] = field(default_factory=dict)
    has_events: bool = False

    @property
    def status(self) -> str:
        """``missing`` (no dir or event file), ``incomplete`` (run.json absent or not completed), ``complete``."""
        if not self.has_events:
            return "missing"
        return "complete" if self.meta is not None and self.meta.get("completed") is True else "incomplete"

    def series(self, tag: str) -> Series | None:
        return self.scalars.get(tag)

    def last(self, tag: str) -> float | None:
        s = self.scalars.get(tag)
        return float(s[1][-1]) if s is not None and s[1].size else None

    def first(self, tag: str) -> float | None:
        s = self.scalars.get(tag)
        return float(s[1][0]) if s is not None and s[1].size else None

    def suffixes(self, prefix: str) -> list[str]:
        """Names logged under ``prefix/`` (one level), e.g. the layers of a quantity."""
        p = prefix.rstrip("/") + "/"
        return sorted({t[len(p) :] for t in self.scalars if t.startswith(p) and "/" not in t[len(p) :]}, key=_layer_key)


def load_scalars(event_dir: Path) -> dict[str, Series]:
    """Every scalar of the event files in ``event_dir``, all steps kept, sorted by step (the last write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 1, "histograms": 1, "compressedHistograms": 1, "tensors": 1, "audio": 1}
    acc = EventAccumulator(str(event_dir), size_guidance=guidance)
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        steps = np.asarray([e.step for e in events], dtype=np.int64)
        values = np.asarray([e.value for e in events], dtype=float)
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        keep = np.append(steps[1:] != steps[:-1], True)
        out[tag] = (steps[keep], values[keep])
    return out


def _event_dir(d: Path) -> Path | None:
    if any(d.glob("events.out.tfevents.*")):
        return d
    files = sorted(d.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    return files[-1].parent if files else None


def _is_run_dir(d: Path) -> bool:
    return (d / "run.json").is_file() or any(d.glob("events.out.tfevents.*")) or bool(_SEED_DIR.match(d.name))


def _read_meta(d: Path, notes: list[str]) -> dict[str, Any] | None:
    f = d / "run.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as err:
        notes.append(f"`{f}` could not be read ({err}); the run counts as incomplete.")
        return None
    return meta if isinstance(meta, dict) else None


def discover_runs(log_dirs: Sequence[Path]) -> tuple[dict[tuple[str, int], Run], list[int], list[str]]:
    """Find the runs under ``log_dirs`` and add a ``missing`` entry for every expected setting × seed not found.

    A log dir is a run dir (it has ``run.json``, an event file, or is named ``seed<k>``), a setting dir (it holds
    ``seed<k>`` dirs) or a root (it holds ``<setting>/seed<k>`` dirs). Expected seeds are the seeds found together
    with :data:`DEFAULT_SEEDS`.

    Returns:
        ``{(setting, seed): Run}``, the expected seeds, and notes (unreadable files, duplicates).
    """
    notes: list[str] = []
    runs: dict[tuple[str, int], Run] = {}
    roots: list[Path] = []
    for d in map(Path, log_dirs):
        if not d.is_dir():
            notes.append(f"log dir `{d}` does not exist.")
            continue
        candidates: list[tuple[str | None, Path]]
        if _is_run_dir(d):
            candidates = [(None, d)]
        elif any(_SEED_DIR.match(s.name) for s in d.iterdir() if s.is_dir()):
            candidates = [(d.name, s) for s in sorted(d.iterdir()) if s.is_dir() and _SEED_DIR.match(s.name)]
        else:
            roots.append(d)
            candidates = [
                (sd.name, s)
                for sd in sorted(p for p in d.iterdir() if p.is_dir())
                for s in sorted(sd.iterdir())
                if s.is_dir() and _SEED_DIR.match(s.name)
            ]
        for setting_hint, path in candidates:
            meta = _read_meta(path, notes)
            setting = str((meta or {}).get("setting") or setting_hint or path.parent.name)
            seed_match = _SEED_DIR.match(path.name)
            seed = (meta or {}).get("seed", int(seed_match.group(1)) if seed_match else None)
            if seed is None:
                notes.append(f"`{path}`: no seed in run.json nor in the directory name; ignored.")
                continue
            event_dir = _event_dir(path)
            run = Run(
                setting, int(seed), path, meta, load_scalars(event_dir) if event_dir else {}, event_dir is not None
            )
            key = (run.setting, run.seed)
            if key in runs and runs[key].has_events:
                notes.append(f"`{path}` repeats {setting} seed {seed} of `{runs[key].path}`; the first one is used.")
                continue
            runs[key] = run
    seeds = sorted({s for _, s in runs} | set(DEFAULT_SEEDS))
    for setting in SETTINGS:
        for seed in seeds:
            if (setting, seed) not in runs:
                guess = roots[0] / setting / f"seed{seed}" if len(roots) == 1 else None
                runs[(setting, seed)] = Run(setting, seed, guess)
    return runs, seeds, notes


# ---- report structure --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One claim: ``claim | paper | ours | null baseline | verdict | why``."""

    claim: str
    paper: str
    ours: str
    null: str
    verdict: str
    why: str


@dataclass
class Section:
    title: str
    intro: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


@dataclass
class _Ctx:
    runs: dict[tuple[str, int], Run]
    seeds: list[int]
    fig_dir: Path

    def usable(self, setting: str) -> list[Run]:
        """Complete runs of ``setting``, by seed."""
        return [self.runs[(setting, s)] for s in self.seeds if self.runs[(setting, s)].status == "complete"]

    def traced(self, setting: str) -> list[Run]:
        """Runs of ``setting`` with an event file, complete or not (for trajectory claims)."""
        return [self.runs[(setting, s)] for s in self.seeds if self.runs[(setting, s)].has_events]

    def missing(self, *settings: str, traced: bool = False) -> str | None:
        """``not comparable: runs missing (…)`` when a setting has no usable run, else ``None``."""
        pick = self.traced if traced else self.usable
        absent = [s for s in settings if not pick(s)]
        if not absent:
            return None
        return f"{NOT_COMPARABLE}: runs missing ({', '.join(absent)})"

    def shortfall(self, *settings: str, traced: bool = False) -> str:
        """A note when fewer seeds than expected went into a claim."""
        pick = self.traced if traced else self.usable
        short = [f"{s}: {len(pick(s))} of {len(self.seeds)} seeds" for s in settings if len(pick(s)) < len(self.seeds)]
        return f" Fewer seeds than expected ({'; '.join(short)})." if short else ""


def _not_comparable(claim: str, paper_text: str, verdict: str, rule: str) -> Row:
    return Row(claim, paper_text, "—", "—", verdict, rule)


def _end(runs: Sequence[Run], tag: str) -> list[float]:
    return [v for v in (r.last(tag) for r in runs) if v is not None]


def _start(runs: Sequence[Run], tag: str) -> list[float]:
    return [v for v in (r.first(tag) for r in runs) if v is not None]


def _layers(runs: Sequence[Run], prefix: str, blocks_only: bool = True) -> list[str]:
    names = {n for r in runs for n in r.suffixes(prefix)}
    names = {n for n in names if _BLOCK.match(n)} if blocks_only else names - {"mean"}
    return sorted(names, key=_layer_key)


def _per_run_mean(
    runs: Sequence[Run], tags: Sequence[str], first: bool = False, reduce: Callable[[np.ndarray], Any] | None = None
) -> list[float]:
    """Per run that logged all ``tags``: the mean over tags of their end (``first``: start) values.

    With ``reduce``, each tag's whole series is reduced by it (e.g. ``np.nanmedian`` over training) instead.
    """
    out = []
    for r in runs:
        vals: list[float | None]
        if reduce is not None:
            series = [r.series(t) for t in tags]
            vals = [float(reduce(s[1])) if s is not None and s[1].size else None for s in series]
        else:
            vals = [r.first(t) if first else r.last(t) for t in tags]
        clean = [v for v in vals if v is not None]
        if vals and len(clean) == len(vals):
            out.append(float(np.mean(clean)))
    return out


def _per_run_layer_mean(runs: Sequence[Run], prefix: str) -> list[float]:
    """Per run: ``prefix/mean`` at the end if logged, else the mean over its block layers at the end."""
    out = []
    for r in runs:
        v = r.last(f"{prefix}/mean")
        if v is None:
            vals = [
                x for x in (r.last(f"{prefix}/{n}") for n in r.suffixes(prefix) if _BLOCK.match(n)) if x is not None
            ]
            v = float(np.mean(vals)) if vals else None
        if v is not None:
            out.append(v)
    return out


def _mean_curve(series: Sequence[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves interpolated onto the steps of the longest one: ``(steps, mean, std)`` (std 0 for one seed)."""
    grid = max(series, key=lambda s: s[0].size)[0].astype(float)
    stack = []
    for steps, values in series:
        y = np.interp(grid, steps.astype(float), values)
        y[(grid < steps[0]) | (grid > steps[-1])] = np.nan
        stack.append(y)
    arr = np.vstack(stack)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns
        mean = np.nanmean(arr, axis=0)
        std = np.nanstd(arr, axis=0, ddof=1) if arr.shape[0] > 1 else np.zeros_like(mean)
    return grid, mean, np.nan_to_num(std)


# ---- figures -------------------------------------------------------------------------------------------------------
def _new_figure(width: float = 7.0, height: float = 3.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure(
    ctx: _Ctx, name: str, caption: str, build: Callable[[], Figure | str]
) -> str:  # builder returns a Figure or the reason it cannot
    """Save the figure ``build()`` returns as ``figures/<name>.png`` and return its Markdown, or a skip note."""
    result = build()
    if isinstance(result, str):
        return f"*Figure `{name}` skipped: {result}.*"
    ctx.fig_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.fig_dir / f"{name}.png"
    dpi = FIGURE_DPI
    result.savefig(path, dpi=dpi)
    while path.stat().st_size > MAX_FIGURE_BYTES and dpi > 30:
        dpi = int(dpi * 0.7)
        result.savefig(path, dpi=dpi)
    return f"![{caption}](figures/{name}.png)\n\n*{caption}*"


def _band(ax: Any, x: Sequence[float], values: list[list[float]], label: str, color: str, marker: str = "o") -> None:
    """Seed mean with a ±std band; ``values[i]`` are the seeds' values at ``x[i]``."""
    stats = [_stats(v) for v in values]
    m = np.array([s[0] for s in stats])
    sd = np.nan_to_num(np.array([s[1] for s in stats]))
    ax.plot(x, m, marker=marker, ms=3, color=color, label=label)
    ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.2, lw=0)


def _log_if_wide(ax: Any) -> None:
    """Log y axis when the plotted values are positive and span more than two decades."""
    ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines] or [np.array([])])
    ys = ys[np.isfinite(ys)]
    if ys.size and ys.min() > 0 and ys.max() / ys.min() > 100:
        ax.set_yscale("log")


# ---- §3.1 information flow: Table 2 and Table 3 -----------------------------------------------------------------
def _section_table2(ctx: _Ctx) -> Section:
    sec = Section(
        "Information flow: inter-layer correlation (Table 2)",
        f"Paper: {paper.TABLE2_SOURCE}. Ours: `{_IF}/consecutive_corr/blocks.i` (correlation of `blocks.(i-1)` and "
        '`blocks.i`; the paper\'s pair "i-(i+1)" is our `blocks.i`, i = 1..9) at the end of training, MNIST runs '
        "`mnist_transformer` and `mnist_pde`. Null baseline: the same quantity at initialisation.",
    )
    n_pairs = len(paper.TABLE2_PAIRS)
    tags = [f"{_IF}/consecutive_corr/blocks.{i}" for i in range(1, n_pairs + 1)]
    rule = (
        f"Rule: holds if our seed mean is within {TABLE2_TOLERANCE} of the paper's at ≥ {TABLE2_MIN_PAIRS} of "
        f"{n_pairs} pairs and the change from the first to the last pair has the paper's sign."
    )
    models = (("Transformer", "mnist_transformer", paper.TABLE2_TRANSFORMER), ("PDE", "mnist_pde", paper.TABLE2_PDE))
    ends: dict[str, list[list[float]]] = {}
    inits: dict[str, list[list[float]]] = {}
    for name, setting, ref in models:
        claim = f"{name} inter-layer correlation (Table 2)"
        paper_text = f"{fmt(ref[0])} → {fmt(ref[-1])} (pairs {paper.TABLE2_PAIRS[0]} … {paper.TABLE2_PAIRS[-1]})"
        if miss := ctx.missing(setting):
            sec.rows.append(_not_comparable(claim, paper_text, miss, rule))
            continue
        runs = ctx.usable(setting)
        ends[name] = [_end(runs, t) for t in tags]
        inits[name] = [_start(runs, t) for t in tags]
        absent = [t.rsplit("/", 1)[-1] for t, v in zip(tags, ends[name], strict=True) if not v]
        if absent:
            ends.pop(name)
            listed = ", ".join(absent[:3]) + (" …" if len(absent) > 3 else "")
            verdict = f"{NOT_COMPARABLE}: not logged ({setting}: consecutive_corr/{listed})"
            sec.rows.append(_not_comparable(claim, paper_text, verdict, rule))
            continue
        means = [_mean(v) for v in ends[name]]
        within = sum(abs(m - p) <= TABLE2_TOLERANCE for m, p in zip(means, ref, strict=True))
        d_ours, d_paper = means[-1] - means[0], ref[-1] - ref[0]
        trend = np.sign(d_ours) == np.sign(d_paper)
        ok = within >= TABLE2_MIN_PAIRS and trend
        init_means = [_mean(v) for v in inits[name]]
        sec.rows.append(
            Row(
                claim,
                paper_text,
                f"{fmt_ms(ends[name][0])} → {fmt_ms(ends[name][-1])}; {within} of {n_pairs} pairs within "
                f"{TABLE2_TOLERANCE}",
                f"at initialisation: {fmt(init_means[0])} → {fmt(init_means[-1])}",
                HOLDS if ok else FAILS,
                f"{rule} Ours: {within} of {n_pairs} within; first→last change {fmt(d_ours)} vs the paper's "
                f"{fmt(d_paper)}." + ctx.shortfall(setting),
            )
        )
    claim = "PDE correlation above the Transformer's"
    paper_count = sum(p > t for p, t in zip(paper.TABLE2_PDE, paper.TABLE2_TRANSFORMER, strict=True))
    paper_text = f"at {paper_count} of {n_pairs} pairs"
    rule3 = f"Rule: holds if the PDE seed mean exceeds the Transformer's at ≥ {TABLE2_MIN_PAIRS} of {n_pairs} pairs."
    if "Transformer" in ends and "PDE" in ends:
        count = sum(_mean(p) > _mean(t) for p, t in zip(ends["PDE"], ends["Transformer"], strict=True))
        init_count = sum(_mean(p) > _mean(t) for p, t in zip(inits["PDE"], inits["Transformer"], strict=True))
        sec.rows.append(
            Row(
                claim,
                paper_text,
                f"at {count} of {n_pairs} pairs",
                f"at initialisation: at {init_count} of {n_pairs} pairs",
                HOLDS if count >= TABLE2_MIN_PAIRS else FAILS,
                rule3,
            )
        )
    else:
        verdict = ctx.missing("mnist_transformer", "mnist_pde") or f"{NOT_COMPARABLE}: a model's Table 2 is not logged"
        sec.rows.append(_not_comparable(claim, paper_text, verdict, rule3))
    if ends:
        rows = []
        for k, pair in enumerate(paper.TABLE2_PAIRS):
            row = [pair, f"blocks.{k}→blocks.{k + 1}"]
            for name, _, ref in models:
                row += [fmt(ref[k]), fmt_ms(ends[name][k]) if name in ends else "—"]
            row += [fmt_mean(inits[n][k]) if n in ends else "—" for n, _, _ in models]
            rows.append(row)
        headers = ["pair (paper)", "ours", "paper Transformer", "ours Transformer", "paper PDE", "ours PDE"]
        sec.details.append(_table([*headers, "Transformer at init", "PDE at init"], rows))
    cka = {
        name: [_end(ctx.usable(setting), f"{_IF}/cka_consecutive/blocks.{i}") for i in range(1, n_pairs + 1)]
        for name, setting, _ in models
    }
    if any(v for vals in cka.values() for v in vals):
        sec.details.append(
            f"Linear CKA of consecutive layers (`{_IF}/cka_consecutive/blocks.i`, unbiased HSIC), end of training; the "
            "paper reports no CKA, so there is no verdict. CKA is invariant to rotations and isotropic scaling of the "
            "features, which the correlation above is not."
        )
        cka_rows = [
            [
                pair,
                f"blocks.{k}→blocks.{k + 1}",
                *[fmt_ms(cka[name][k]) if cka[name][k] else "—" for name, _, _ in models],
            ]
            for k, pair in enumerate(paper.TABLE2_PAIRS)
        ]
        sec.details.append(_table(["pair (paper)", "ours", "CKA Transformer", "CKA PDE"], cka_rows))

    def build() -> Figure | str:
        if not ends:
            return "no Table 2 correlations were logged by complete runs"
        fig = _new_figure(6.0, 3.2)
        ax = fig.add_subplot()
        x = list(range(n_pairs))
        for (name, _, ref), color in zip(models, ("tab:blue", "tab:red"), strict=True):
            if name in ends:
                _band(ax, x, ends[name], f"{name} (ours, ±std)", color)
            ax.plot(x, ref, ls="--", marker="x", ms=4, color=color, label=f"{name} (paper)")
        ax.set_xticks(x, paper.TABLE2_PAIRS)
        ax.set_xlabel("layer pair (paper numbering)")
        ax.set_ylabel("inter-layer correlation")
        ax.legend(fontsize=7)
        return fig

    sec.figures.append(_figure(ctx, "table2_interlayer_correlation", "Table 2: inter-layer correlation", build))
    return sec


def _section_table3(ctx: _Ctx) -> Section:
    sec = Section(
        "Information flow: same-layer correlation, Transformer vs PDE (Table 3)",
        f"Paper: {paper.TABLE3_SOURCE}. Ours: `{_IF}/pearson_vs_reference/blocks.i` and `spearman_vs_reference` in the "
        "`mnist_pde` runs, whose reference is the Transformer of the same seed (the paper's layer i is our "
        "`blocks.(i-1)`), at the end of training. Null baseline: the same at initialisation (untrained PDE).",
    )
    n = len(paper.TABLE3_LAYERS)
    setting = "mnist_pde"
    rule = (
        f"Rule: holds if the seed mean falls from layer {paper.TABLE3_LAYERS[0]} to layer {paper.TABLE3_LAYERS[-1]} by "
        f"more than {TABLE3_MIN_FALL} and ends below {TABLE3_MAX_END}."
    )
    ends: dict[str, list[list[float]]] = {}
    inits: dict[str, list[list[float]]] = {}
    refs = {"Pearson": paper.TABLE3_PEARSON, "Spearman": paper.TABLE3_SPEARMAN}
    for kind, ref in refs.items():
        claim = f"{kind} correlation falls with depth to near zero (Table 3)"
        paper_text = f"{fmt(ref[0])} (layer 1) → {fmt(ref[-1])} (layer {n})"
        if miss := ctx.missing(setting):
            sec.rows.append(_not_comparable(claim, paper_text, miss, rule))
            continue
        runs = ctx.usable(setting)
        tags = [f"{_IF}/{kind.lower()}_vs_reference/blocks.{i}" for i in range(n)]
        vals = [_end(runs, t) for t in tags]
        absent = [t.rsplit("/", 2)[-2] + "/" + t.rsplit("/", 1)[-1] for t, v in zip(tags, vals, strict=True) if not v]
        if absent:
            verdict = (
                f"{NOT_COMPARABLE}: not logged ({setting}: {', '.join(absent[:3])}{' …' if len(absent) > 3 else ''})"
            )
            sec.rows.append(_not_comparable(claim, paper_text, verdict, rule))
            continue
        ends[kind], inits[kind] = vals, [_start(runs, t) for t in tags]
        first, last = _mean(vals[0]), _mean(vals[-1])
        ok = first - last > TABLE3_MIN_FALL and last < TABLE3_MAX_END
        sec.rows.append(
            Row(
                claim,
                paper_text,
                f"{fmt_ms(vals[0])} → {fmt_ms(vals[-1])}",
                f"at initialisation: {fmt(_mean(inits[kind][0]))} → {fmt(_mean(inits[kind][-1]))}",
                HOLDS if ok else FAILS,
                f"{rule} Ours: falls by {fmt(first - last)}, ends at {fmt(last)}." + ctx.shortfall(setting),
            )
        )
    if ends:
        cka = [_end(ctx.usable(setting), f"{_IF}/cka_vs_reference/blocks.{i}") for i in range(n)]
        rows = []
        for i, layer in enumerate(paper.TABLE3_LAYERS):
            row: list[str] = [str(layer), f"blocks.{i}"]
            for kind, ref in refs.items():
                row += [fmt(ref[i]), fmt_ms(ends[kind][i]) if kind in ends else "—"]
            row += [fmt_mean(inits[k][i]) if k in ends else "—" for k in refs]
            row.append(fmt_ms(cka[i]) if cka[i] else "—")
            rows.append(row)
        headers = ["layer (paper)", "ours", "paper Pearson", "ours Pearson", "paper Spearman", "ours Spearman"]
        sec.details.append(
            _table([*headers, "Pearson at init", "Spearman at init", "ours CKA (not in the paper)"], rows)
        )

    def build() -> Figure | str:
        if not ends:
            return "no same-layer correlations were logged by complete `mnist_pde` runs"
        fig = _new_figure(7.0, 3.0)
        x = list(paper.TABLE3_LAYERS)
        for k, (kind, ref) in enumerate(refs.items()):
            ax = fig.add_subplot(1, 2, k + 1)
            if kind in ends:
                _band(ax, x, ends[kind], "ours (±std)", "tab:purple")
                ax.plot(x, [_mean(v) for v in inits[kind]], ls=":", color="grey", label="ours at init")
            ax.plot(x, ref, ls="--", marker="x", ms=4, color="black", label="paper")
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_title(kind, fontsize=9)
            ax.set_xlabel("layer (paper numbering)")
            ax.set_xticks(x)
            ax.legend(fontsize=7)
        return fig

    sec.figures.append(_figure(ctx, "table3_same_layer_correlation", "Table 3: same-layer correlation", build))
    sec.figures.append(
        _tensorboard_image(
            ctx,
            setting,
            f"{_IF}/heatmaps",
            "mnist_heatmaps",
            "Per-layer representation heatmaps (probe samples × features), the last that InformationFlow logged: "
            "the PDE model (top row) and its Transformer reference (bottom row)",
        )
    )
    return sec


def _tensorboard_image(ctx: _Ctx, setting: str, tag: str, name: str, caption: str) -> str:
    """The last image logged under ``tag`` by the first complete run of ``setting``, saved as ``figures/<name>.png``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in ctx.usable(setting):
        event_dir = _event_dir(run.path) if run.path is not None else None
        if event_dir is None:
            continue
        acc = EventAccumulator(str(event_dir), size_guidance={"images": 1, "scalars": 1, "histograms": 1})
        acc.Reload()
        if tag not in acc.Tags().get("images", []):
            continue
        event = acc.Images(tag)[-1]
        ctx.fig_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.fig_dir / f"{name}.png"
        path.write_bytes(event.encoded_image_string)
        if path.stat().st_size > MAX_FIGURE_BYTES:
            from PIL import Image

            with Image.open(path) as image:
                image.load()
            while path.stat().st_size > MAX_FIGURE_BYTES and min(image.size) > 64:
                image = image.resize((image.width * 7 // 10, image.height * 7 // 10))
                image.save(path, optimize=True)
        source = f"{setting}/seed{run.seed}, step {event.step}"
        return f"![{caption}](figures/{name}.png)\n\n*{caption} ({source}).*"
    return f"*Figure `{name}` skipped: no complete `{setting}` run logged the image `{tag}`.*"


# ---- §3.2 attention ------------------------------------------------------------------------------------------------
def _section_attention(ctx: _Ctx) -> Section:
    setting = "mnist_pde"
    sec = Section(
        "Attention: PDE vs Transformer attention (§3.2)",
        f"Paper: {paper.ATTENTION_SOURCE}. Ours: `{_AS}/<quantity>/<layer>` in the `mnist_pde` runs, whose reference "
        "is the Transformer of the same seed, at the end of training; heads matched by the Hungarian method. Null "
        "baselines: uniform attention, the reference on another sample (shuffled), a re-initialised model. Skill = "
        "`(s - s_null)/(1 - s_null)` for cosine and `(d_null - d)/d_null` for KL, against the strongest null.",
    )
    rule_cos = (
        f"Rule: holds if the seed-mean cosine exceeds {fmt(paper.ATTENTION_LAYER_COSINE_MIN)} at every layer and the "
        f"seed-mean cosine skill against the strongest null (mean over layers) exceeds {ATTENTION_MIN_SKILL}."
    )
    rule_kl = (
        f"Rule: holds if the seed-mean KL (mean over layers) is at most {ATTENTION_KL_FACTOR}× the paper's and the "
        f"KL skill against the strongest null exceeds {ATTENTION_MIN_SKILL}."
    )
    claim_cos = "PDE attention matches the Transformer's (cosine, every layer > 0.98)"
    claim_cos = claim_cos.replace("0.98", fmt(paper.ATTENTION_LAYER_COSINE_MIN))
    paper_cos = f"{fmt(paper.ATTENTION_COSINE)}; every layer > {fmt(paper.ATTENTION_LAYER_COSINE_MIN)}"
    claim_kl, paper_kl = "Low KL divergence of the attention distributions", fmt(paper.ATTENTION_KL)
    runs = ctx.usable(setting)
    layers = _layers(runs, f"{_AS}/cosine")
    if miss := ctx.missing(setting):
        sec.rows += [
            _not_comparable(claim_cos, paper_cos, miss, rule_cos),
            _not_comparable(claim_kl, paper_kl, miss, rule_kl),
        ]
    elif not layers:
        verdict = f"{NOT_COMPARABLE}: not logged ({setting}: {_AS}/cosine/<layer>)"
        sec.rows += [
            _not_comparable(claim_cos, paper_cos, verdict, rule_cos),
            _not_comparable(claim_kl, paper_kl, verdict, rule_kl),
        ]
    else:
        cos = {n: _end(runs, f"{_AS}/cosine/{n}") for n in layers}
        null_cos = {k: _per_run_layer_mean(runs, f"{_AS}/cosine_null_{k}") for k in _NULLS}
        null_kl = {k: _per_run_layer_mean(runs, f"{_AS}/kl_null_{k}") for k in _NULLS}
        skill = _per_run_layer_mean(runs, f"{_AS}/cosine_skill")
        kl_skill = _per_run_layer_mean(runs, f"{_AS}/kl_skill")
        cos_mean = _per_run_layer_mean(runs, f"{_AS}/cosine")
        kl_mean = _per_run_layer_mean(runs, f"{_AS}/kl")
        low = [n for n in layers if not _mean(cos[n]) > paper.ATTENTION_LAYER_COSINE_MIN]
        strongest = max((k for k in _NULLS if null_cos[k]), key=lambda k: _mean(null_cos[k]), default=None)
        null_text = (
            ", ".join(f"{k.replace('_', ' ')} {fmt_ms(null_cos[k])}" for k in _NULLS if null_cos[k]) or "not logged"
        )
        s_mean = _mean(skill) if skill else float("nan")
        skill_ok = math.isfinite(s_mean) and s_mean > ATTENTION_MIN_SKILL
        min_layer = min(layers, key=lambda n: _mean(cos[n]))
        if not skill:
            verdict, why = f"{NOT_COMPARABLE}: no null baselines logged ({_AS}/cosine_skill)", ""
        elif not low and skill_ok:
            verdict, why = HOLDS, "cosine is high at every layer and well above the strongest null."
        elif not low:
            verdict = FAILS
            why = (
                f"cosine is high (> {fmt(paper.ATTENTION_LAYER_COSINE_MIN)} at every layer) but no better than the "
                f"null: skill {fmt(s_mean)} ≤ {ATTENTION_MIN_SKILL} (strongest null: {strongest})."
            )
        else:
            verdict = FAILS
            why = f"cosine ≤ {fmt(paper.ATTENTION_LAYER_COSINE_MIN)} at {', '.join(low)}; skill {fmt(s_mean)}."
        sec.rows.append(
            Row(
                claim_cos,
                paper_cos,
                f"{fmt_ms(cos_mean)} (mean over layers); lowest layer {min_layer}: {fmt_ms(cos[min_layer])}; "
                f"skill {fmt_ms(skill)}",
                null_text,
                verdict,
                f"{rule_cos} Ours: {why}" + ctx.shortfall(setting),
            )
        )
        kl_m, kls = _mean(kl_mean) if kl_mean else float("nan"), _mean(kl_skill) if kl_skill else float("nan")
        if not kl_mean:
            verdict = f"{NOT_COMPARABLE}: not logged ({setting}: {_AS}/kl)"
        elif not kl_skill:
            verdict = f"{NOT_COMPARABLE}: no null baselines logged ({_AS}/kl_skill)"
        else:
            verdict = HOLDS if kl_m <= ATTENTION_KL_FACTOR * paper.ATTENTION_KL and kls > ATTENTION_MIN_SKILL else FAILS
        null_kl_text = ", ".join(f"{k.replace('_', ' ')} {fmt_ms(null_kl[k])}" for k in _NULLS if null_kl[k])
        sec.rows.append(
            Row(
                claim_kl,
                paper_kl,
                f"{fmt_ms(kl_mean)} (mean over layers); skill {fmt_ms(kl_skill)}",
                null_kl_text or "not logged",
                verdict,
                f"{rule_kl} Ours: KL {fmt(kl_m)} vs {fmt(ATTENTION_KL_FACTOR * paper.ATTENTION_KL)} allowed, "
                f"skill {fmt(kls)}." + ctx.shortfall(setting),
            )
        )
        rows = []
        for n in layers:
            rows.append(
                [
                    n,
                    fmt_ms(cos[n]),
                    *(fmt_mean(_end(runs, f"{_AS}/cosine_null_{k}/{n}")) for k in _NULLS),
                    fmt_ms(_end(runs, f"{_AS}/cosine_skill/{n}")),
                    fmt_ms(_end(runs, f"{_AS}/kl/{n}")),
                    fmt_mean(_end(runs, f"{_AS}/entropy/{n}")),
                    fmt_mean(_end(runs, f"{_AS}/entropy_reference/{n}")),
                ]
            )
        headers = ["layer", "cosine", "null uniform", "null shuffled", "null random init", "cosine skill", "KL"]
        sec.details.append(
            f"Paper: cosine {fmt(paper.ATTENTION_COSINE)}, KL {fmt(paper.ATTENTION_KL)}, every layer > "
            f"{fmt(paper.ATTENTION_LAYER_COSINE_MIN)}.\n\n"
            + _table([*headers, "entropy PDE (nats)", "entropy Transformer (nats)"], rows)
        )

    def build() -> Figure | str:
        if not runs or not layers:
            return "no attention similarities were logged by complete `mnist_pde` runs"
        fig = _new_figure(6.5, 3.2)
        ax = fig.add_subplot()
        x = list(range(len(layers)))
        _band(ax, x, [_end(runs, f"{_AS}/cosine/{n}") for n in layers], "PDE vs Transformer (±std)", "tab:red")
        for k, color in zip(_NULLS, ("tab:grey", "tab:olive", "tab:cyan"), strict=True):
            vals = [_end(runs, f"{_AS}/cosine_null_{k}/{n}") for n in layers]
            if any(vals):
                ax.plot(
                    x, [_mean(v) if v else np.nan for v in vals], ls=":", marker=".", color=color, label=f"null: {k}"
                )
        ax.axhline(paper.ATTENTION_COSINE, color="black", ls="--", lw=1, label="paper (mean)")
        ax.axhline(paper.ATTENTION_LAYER_COSINE_MIN, color="black", ls=":", lw=0.8, label="paper: every layer >")
        ax.set_xticks(x, layers, fontsize=7)
        ax.set_ylabel("attention cosine similarity")
        ax.legend(fontsize=6)
        return fig

    sec.figures.append(
        _figure(ctx, "attention_cosine_by_layer", "Attention cosine per layer with null baselines", build)
    )
    return sec


# ---- §3.3 information bottleneck -----------------------------------------------------------------------------------
def _section_ib(ctx: _Ctx) -> Section:
    models = _NEWSGROUPS_MODELS
    sec = Section(
        "Information bottleneck: I(T;Y) over training (§3.3)",
        f"Paper: {paper.IB_SOURCE}. Ours: `{_MI}/I_TY/<layer>` and `I_XT/<layer>` (bits) in the 20 Newsgroups runs; "
        "start = first probe (step 0), end = last probe; peak-to-end drop = the maximum over training minus the end "
        "value. The paper's layer 1 is our `blocks.0`. Ceiling of I(T;Y): H(Y) (`H_Y`).",
    )
    data: dict[str, dict[str, dict[str, list[float]]]] = {}
    for name, setting in models:
        claim = f"{name}: I(T;Y) declines over training"
        rule = (
            f"Rule: holds if the seed-mean I(T;Y) at the end is below its start in more than {MAJORITY:.0%} of the "
            "layers."
        )
        if miss := ctx.missing(setting):
            sec.rows.append(_not_comparable(claim, paper.IB_DECLINE.text, miss, rule))
            continue
        runs = ctx.usable(setting)
        layers = _layers(runs, f"{_MI}/I_TY")
        if not layers:
            verdict = f"{NOT_COMPARABLE}: not logged ({setting}: {_MI}/I_TY/<layer>)"
            sec.rows.append(_not_comparable(claim, paper.IB_DECLINE.text, verdict, rule))
            continue
        d: dict[str, dict[str, list[float]]] = {}
        for n in layers:
            tag = f"{_MI}/I_TY/{n}"
            series = [s for s in (r.series(tag) for r in runs) if s is not None]
            d[n] = {
                "start": _start(runs, tag),
                "end": _end(runs, tag),
                "drop": [float(np.nanmax(v) - v[-1]) for _, v in series],
                "xt_start": _start(runs, f"{_MI}/I_XT/{n}"),
                "xt_end": _end(runs, f"{_MI}/I_XT/{n}"),
                "saturated": _end(runs, f"{_MI}/saturated/{n}"),
                "log2_n": _end(runs, f"{_MI}/log2_N"),
            }
        data[name] = d
        declines = [n for n in layers if _mean(d[n]["end"]) < _mean(d[n]["start"])]
        start_all = _per_run_mean(runs, [f"{_MI}/I_TY/{n}" for n in layers], first=True)
        end_all = _per_run_mean(runs, [f"{_MI}/I_TY/{n}" for n in layers])
        sat = [n for n in layers if d[n]["saturated"] and _mean(d[n]["saturated"]) > 0.5]
        sat_note = f" Saturated estimates at the end (at log2 N): {', '.join(sat)}." if sat else ""
        sec.rows.append(
            Row(
                claim,
                paper.IB_DECLINE.text,
                f"declines in {len(declines)} of {len(layers)} layers; layer mean {fmt_ms(start_all)} → "
                f"{fmt_ms(end_all)}",
                f"H(Y) = {fmt_ms(_end(runs, f'{_MI}/H_Y'))}",
                HOLDS if len(declines) > MAJORITY * len(layers) else FAILS,
                f"{rule} Ours: declines in {', '.join(declines) or 'no layer'}.{sat_note}" + ctx.shortfall(setting),
            )
        )
    claim = "PDE I(T;Y) lower than the Transformer's"
    rule = "Rule: holds if the PDE's seed mean of the layer-mean I(T;Y) at the end is below the Transformer's."
    if "Transformer" in data and "PDE" in data:
        per = {}
        for name, setting in models:
            runs = ctx.usable(setting)
            per[name] = _per_run_mean(runs, [f"{_MI}/I_TY/{n}" for n in data[name]])
        ok = _mean(per["PDE"]) < _mean(per["Transformer"])
        sec.rows.append(
            Row(
                claim,
                paper.IB_PDE_LOWER.text,
                f"PDE {fmt_ms(per['PDE'])} vs Transformer {fmt_ms(per['Transformer'])}",
                "—",
                HOLDS if ok else FAILS,
                rule,
            )
        )
    else:
        verdict = ctx.missing(*(s for _, s in models)) or f"{NOT_COMPARABLE}: I(T;Y) not logged for both models"
        sec.rows.append(_not_comparable(claim, paper.IB_PDE_LOWER.text, verdict, rule))
    claim = "PDE layer 1 has the sharpest drop"
    rule = "Rule: holds if the PDE's `blocks.0` has the largest positive seed-mean peak-to-end drop of the PDE layers."
    if "PDE" in data and "blocks.0" in data["PDE"]:
        drops = {n: _mean(v["drop"]) for n, v in data["PDE"].items()}
        top = max(drops, key=lambda n: drops[n])
        ok = top == "blocks.0" and drops[top] > 0
        sec.rows.append(
            Row(
                claim,
                paper.IB_PDE_LAYER1_SHARPEST.text,
                f"blocks.0 drop {fmt_ms(data['PDE']['blocks.0']['drop'])}; largest: {top} ({fmt(drops[top])})",
                "—",
                HOLDS if ok else FAILS,
                rule,
            )
        )
    else:
        verdict = ctx.missing("newsgroups_pde") or f"{NOT_COMPARABLE}: not logged (newsgroups_pde: {_MI}/I_TY/blocks.0)"
        sec.rows.append(_not_comparable(claim, paper.IB_PDE_LAYER1_SHARPEST.text, verdict, rule))
    if data:
        rows = []
        for name, d in data.items():
            for n, v in d.items():
                rows.append(
                    [
                        name,
                        n,
                        fmt_ms(v["start"]),
                        fmt_ms(v["end"]),
                        fmt_ms(v["drop"]),
                        fmt_mean(v["xt_start"]),
                        fmt_mean(v["xt_end"]),
                        fmt_mean(v["log2_n"]),
                    ]
                )
        headers = ["model", "layer", "I(T;Y) start", "I(T;Y) end", "peak-to-end drop", "I(X;T) start", "I(X;T) end"]
        sec.details.append(_table([*headers, "I(X;T) ceiling log2 N"], rows))
        if note := _ixt_range_note(ctx, models, data):
            sec.details.append(note)

    def build() -> Figure | str:
        if not data:
            return "no layer mutual information was logged by complete 20 Newsgroups runs"
        fig = _new_figure(7.0, 3.2)
        for k, (name, setting) in enumerate(models):
            ax = fig.add_subplot(1, 2, k + 1)
            ax.set_title(name, fontsize=9)
            runs = ctx.usable(setting)
            for n in data.get(name, {}):
                xs = [r.series(f"{_MI}/I_XT/{n}") for r in runs]
                ys = [r.series(f"{_MI}/I_TY/{n}") for r in runs]
                pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
                if not pairs:
                    continue
                _, mx, _ = _mean_curve([x for x, _ in pairs])
                _, my, _ = _mean_curve([y for _, y in pairs])
                m = min(mx.size, my.size)
                (line,) = ax.plot(mx[:m], my[:m], marker=".", ms=3, lw=1, label=n)
                ax.plot(mx[:1], my[:1], marker="o", mfc="none", color=line.get_color())
            ax.ticklabel_format(axis="x", useOffset=False)
            ax.set_xlabel("I(X;T) [bits]")
            ax.set_ylabel("I(T;Y) [bits]")
            if ax.lines:
                ax.legend(fontsize=6, title="circle = start", title_fontsize=6)
        return fig

    sec.figures.append(
        _figure(ctx, "information_plane", "Information plane per layer over training (seed mean)", build)
    )
    return sec


def _ixt_range_note(ctx: _Ctx, models: Sequence[tuple[str, str]], data: dict[str, Any]) -> str | None:
    """How far I(X;T) moved over training and how close it sits to its log2 N ceiling (all layers, probes, seeds)."""
    values, ceilings = [], []
    for name, setting in models:
        for r in ctx.usable(setting):
            for n in data.get(name, {}):
                series = r.series(f"{_MI}/I_XT/{n}")
                if series is not None:
                    values.append(series[1])
            ceilings += _end([r], f"{_MI}/log2_N")
    if not values or not ceilings:
        return None
    allv = np.concatenate(values)
    lo, hi, ceiling = float(np.nanmin(allv)), float(np.nanmax(allv)), float(np.nanmin(ceilings))
    spread = max(float(np.nanmax(v) - np.nanmin(v)) for v in values)
    text = (
        f"I(X;T) over every layer, probe and seed lies in [{fmt(lo)}, {fmt(hi)}] bits; the largest change of one "
        f"layer's curve over training is {fmt(spread)} bits, and the highest value is {fmt(ceiling - hi)} bits under "
        f"the lowest ceiling log2 N = {fmt(ceiling)}."
    )
    if spread < IXT_STATIC_BITS:
        text += (
            f" An I(X;T) that moves less than {IXT_STATIC_BITS} bits cannot show compression, so the information "
            "plane here is, in effect, I(T;Y) over training."
        )
    return text


# ---- §3.4 gradient flow --------------------------------------------------------------------------------------------
def _section_gradients(ctx: _Ctx) -> Section:
    models = (
        ("Transformer", "newsgroups_transformer", paper.GRADIENT_RANGE_TRANSFORMER),
        ("PDE", "newsgroups_pde", paper.GRADIENT_RANGE_PDE),
    )
    sec = Section(
        "Gradient flow (§3.4)",
        f"Paper: {paper.GRADIENT_SOURCE}. Ours: per run and layer, the median over training of "
        f"`{_GF}/grad_abs_mean/blocks.i` (mean absolute gradient per parameter entry), then mean ± std over seeds.",
    )
    med: dict[str, dict[str, list[float]]] = {}
    for name, setting, (lo, hi) in models:
        claim = f"{name} gradients mostly in [{lo:g}, {hi:g}]"
        rule = (
            f"Rule: holds if the seed-mean median lies in [{lo:g}, {hi:g}] for more than {MAJORITY:.0%} of the blocks."
        )
        paper_text = f"[{lo:g}, {hi:g}]"
        if miss := ctx.missing(setting):
            sec.rows.append(_not_comparable(claim, paper_text, miss, rule))
            continue
        runs = ctx.usable(setting)
        layers = _layers(runs, f"{_GF}/grad_abs_mean")
        if not layers:
            verdict = f"{NOT_COMPARABLE}: not logged ({setting}: {_GF}/grad_abs_mean/blocks.i)"
            sec.rows.append(_not_comparable(claim, paper_text, verdict, rule))
            continue
        med[name] = {}
        for n in layers:
            series = [r.series(f"{_GF}/grad_abs_mean/{n}") for r in runs]
            med[name][n] = [float(np.nanmedian(s[1])) for s in series if s is not None and s[1].size]
        means = {n: _mean(v) for n, v in med[name].items()}
        inside = [n for n, m in means.items() if lo <= m <= hi]
        sec.rows.append(
            Row(
                claim,
                paper_text,
                f"per-block medians {fmt(min(means.values()))} … {fmt(max(means.values()))}; {len(inside)} of "
                f"{len(layers)} blocks in range",
                "—",
                HOLDS if len(inside) > MAJORITY * len(layers) else FAILS,
                f"{rule} Ours in range: {', '.join(inside) or 'none'}." + ctx.shortfall(setting),
            )
        )
    both = "Transformer" in med and "PDE" in med
    claim = "PDE gradients higher than the Transformer's"
    rule = "Rule: holds if the PDE's seed mean of the block-mean median exceeds the Transformer's."
    if both:
        per = {
            name: _per_run_mean(
                ctx.usable(setting), [f"{_GF}/grad_abs_mean/{n}" for n in med[name]], reduce=np.nanmedian
            )
            for name, setting, _ in models
        }
        ok = _mean(per["PDE"]) > _mean(per["Transformer"])
        sec.rows.append(
            Row(
                claim,
                paper.GRADIENT_PDE_HIGHER.text,
                f"PDE {fmt_ms(per['PDE'])} vs Transformer {fmt_ms(per['Transformer'])}",
                "—",
                HOLDS if ok else FAILS,
                rule,
            )
        )
    else:
        verdict = ctx.missing("newsgroups_transformer", "newsgroups_pde") or f"{NOT_COMPARABLE}: not logged for both"
        sec.rows.append(_not_comparable(claim, paper.GRADIENT_PDE_HIGHER.text, verdict, rule))
    claim = "PDE first layer markedly higher; Transformer more uniform"
    rule = (
        f"Rule: holds if the PDE's `blocks.0` seed-mean median is at least {GRADIENT_FIRST_LAYER_FACTOR}× every other "
        "PDE block's and the Transformer's max/min ratio across blocks is below the PDE's."
    )
    if both and "blocks.0" in med["PDE"] and len(med["PDE"]) > 1 and len(med["Transformer"]) > 1:
        pm = {n: _mean(v) for n, v in med["PDE"].items()}
        tm = {n: _mean(v) for n, v in med["Transformer"].items()}
        other = max(v for n, v in pm.items() if n != "blocks.0")
        ratio_first = pm["blocks.0"] / other if other > 0 else float("inf")
        spread_p = max(pm.values()) / min(pm.values()) if min(pm.values()) > 0 else float("inf")
        spread_t = max(tm.values()) / min(tm.values()) if min(tm.values()) > 0 else float("inf")
        ok = ratio_first >= GRADIENT_FIRST_LAYER_FACTOR and spread_t < spread_p
        sec.rows.append(
            Row(
                claim,
                paper.GRADIENT_PDE_FIRST_LAYER.text,
                f"PDE blocks.0 / largest other block = {fmt(ratio_first)}; max/min across blocks: PDE {fmt(spread_p)}, "
                f"Transformer {fmt(spread_t)}",
                "—",
                HOLDS if ok else FAILS,
                rule,
            )
        )
    else:
        verdict = (
            ctx.missing("newsgroups_transformer", "newsgroups_pde") or f"{NOT_COMPARABLE}: need ≥ 2 blocks per model"
        )
        sec.rows.append(_not_comparable(claim, paper.GRADIENT_PDE_FIRST_LAYER.text, verdict, rule))
    if med:
        layers = sorted({n for d in med.values() for n in d}, key=_layer_key)
        rows = [[n, *(fmt_ms(med[m].get(n, [])) if m in med else "—" for m, _, _ in models)] for n in layers]
        rng = {m: f"{lo:g}–{hi:g}" for m, _, (lo, hi) in models}
        sec.details.append(
            _table(
                [
                    "layer",
                    f"Transformer median (paper {rng['Transformer']})",
                    f"PDE median (paper {rng['PDE']})",
                ],
                rows,
            )
        )

    def build() -> Figure | str:
        if not med:
            return "no gradient statistics were logged by complete 20 Newsgroups runs"
        fig = _new_figure(7.0, 3.2)
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (name, setting, (lo, hi)) in zip(axes, models, strict=True):
            ax.set_title(name, fontsize=9)
            ax.axhspan(lo, hi, color="tab:green", alpha=0.12, label="paper's range")
            for n in med.get(name, {}):
                series = [
                    s for s in (r.series(f"{_GF}/grad_abs_mean/{n}") for r in ctx.usable(setting)) if s is not None
                ]
                if series:
                    grid, m, _ = _mean_curve(series)
                    ax.plot(grid, np.where(m > 0, m, np.nan), lw=1, label=n)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        axes[0].set_ylabel("mean |gradient| (seed mean)")
        return fig

    sec.figures.append(_figure(ctx, "gradient_magnitude", "Gradient magnitude per layer over training", build))
    return sec


# ---- §3.5 perturbation ---------------------------------------------------------------------------------------------
def _curve(run: Run) -> dict[float, float]:
    """``{eps: loss}`` at the end of training."""
    prefix = f"{_PE}/loss/"
    out = {}
    for tag in run.scalars:
        if tag.startswith(prefix + "eps="):
            v = run.last(tag)
            if v is not None:
                out[parse_eps_label(tag)] = v
    return out


def _section_perturbation(ctx: _Ctx) -> Section:
    models = _NEWSGROUPS_MODELS
    sec = Section(
        "Perturbation sensitivity (§3.5)",
        f"Paper: {paper.PERTURBATION_SOURCE}. Ours: `{_PE}/loss/eps=<ε>` and `loss_clean` at the end of training; "
        f"critical ε = `{_PE}/critical_eps`, the smallest grid ε whose loss departs from the clean loss by the "
        "callback's factor (none on the grid counts as beyond it). Relative increase = (loss(ε) − clean) / clean.",
    )
    curves: dict[str, list[dict[float, float]]] = {}
    clean: dict[str, list[float]] = {}
    crit: dict[str, list[float]] = {}
    for name, setting in models:
        runs = ctx.usable(setting)
        c = [_curve(r) for r in runs]
        if runs and all(c):
            curves[name] = c
            clean[name] = _end(runs, f"{_PE}/loss_clean")
            crit[name] = [v if math.isfinite(v) else float("inf") for v in _end(runs, f"{_PE}/critical_eps")]
    miss = ctx.missing(*(s for _, s in models))
    absent = None if miss else next((s for n, s in models if n not in curves), None)
    nc = miss or (f"{NOT_COMPARABLE}: not logged ({absent}: {_PE}/loss/eps=…)" if absent else None)
    eps_grid = sorted({e for c in curves.values() for run in c for e in run})

    def rel(name: str, eps: float) -> list[float]:
        return [
            (run[eps] - cl) / cl for run, cl in zip(curves[name], clean[name], strict=False) if eps in run and cl > 0
        ]

    claim, ptext = "Both models similar below ε = 1e-3", paper.PERTURBATION_SIMILAR.text
    lim = paper.PERTURBATION_SIMILAR_BELOW_EPS
    claim = claim.replace("1e-3", f"{lim:g}")
    rule = (
        f"Rule: holds if, at every grid ε < {lim:g}, both models' seed-mean relative loss increase is below "
        f"{PERTURBATION_SIMILAR_REL:.0%}."
    )
    small = [e for e in eps_grid if e < lim]
    if nc:
        sec.rows.append(_not_comparable(claim, ptext, nc, rule))
    elif not small:
        sec.rows.append(_not_comparable(claim, ptext, f"{NOT_COMPARABLE}: no grid ε below {lim:g}", rule))
    else:
        worst = {n: max(_mean(rel(n, e)) for e in small) for n, _ in models}
        ok = all(w < PERTURBATION_SIMILAR_REL for w in worst.values())
        gap = max(
            abs(_mean([r[e] for r in curves["PDE"]]) - _mean([r[e] for r in curves["Transformer"]])) for e in small
        )
        sec.rows.append(
            Row(
                claim,
                ptext,
                f"largest relative increase below {lim:g}: Transformer {fmt(worst['Transformer'])}, "
                f"PDE {fmt(worst['PDE'])}",
                f"clean loss: Transformer {fmt_ms(clean['Transformer'])}, PDE {fmt_ms(clean['PDE'])}",
                HOLDS if ok else FAILS,
                f"{rule} Largest absolute loss gap between the models there: {fmt(gap)}.",
            )
        )
    med = {n: float(np.median(v)) if v else float("nan") for n, v in crit.items()}
    crit_text = {
        n: f"median {_fmt_eps(med[n])} (per seed: {', '.join(_fmt_eps(v) for v in crit[n])}; n={len(crit[n])})"
        for n in crit
    }
    claim, ptext = "PDE degrades faster than the Transformer", paper.PERTURBATION_PDE_FASTER.text
    rule = "Rule: holds if the PDE's median critical ε is below the Transformer's."
    if nc or len(crit) < 2 or not all(crit.values()):
        sec.rows.append(_not_comparable(claim, ptext, nc or f"{NOT_COMPARABLE}: critical_eps not logged", rule))
    else:
        top = eps_grid[-1]
        if math.isinf(med["PDE"]) and math.isinf(med["Transformer"]):
            verdict = (
                f"{NOT_COMPARABLE}: neither model's loss departs from its clean loss by the critical factor on the "
                f"grid (ε ≤ {top:g}), so where degradation starts is not measured"
            )
            why = (
                f"{rule} Context, not part of the rule: relative loss increase at ε = {top:g}: PDE "
                f"{fmt(_mean(rel('PDE', top)))}, Transformer {fmt(_mean(rel('Transformer', top)))}."
            )
        else:
            verdict, why = (HOLDS if med["PDE"] < med["Transformer"] else FAILS), rule
        crit_both = f"PDE {crit_text['PDE']}; Transformer {crit_text['Transformer']}"
        sec.rows.append(Row(claim, ptext, crit_both, "—", verdict, why))
    target = paper.PERTURBATION_DIVERGENCE_EPS
    claim, ptext = f"Divergence near ε = {target:g}", paper.PERTURBATION_DIVERGENCE.text
    rule = (
        f"Rule: holds if the PDE's median critical ε is within {PERTURBATION_NEAR_DECADES} decades of {target:g} and "
        "below the Transformer's."
    )
    if nc or len(crit) < 2 or not all(crit.values()):
        sec.rows.append(_not_comparable(claim, ptext, nc or f"{NOT_COMPARABLE}: critical_eps not logged", rule))
    else:
        near = (
            math.isfinite(med["PDE"]) and abs(math.log10(med["PDE"]) - math.log10(target)) <= PERTURBATION_NEAR_DECADES
        )
        ok = near and med["PDE"] < med["Transformer"]
        at = min(eps_grid, key=lambda e: abs(math.log10(e) - math.log10(target)))
        sec.rows.append(
            Row(
                claim,
                ptext,
                f"PDE {crit_text['PDE']}",
                f"Transformer {crit_text['Transformer']}",
                HOLDS if ok else FAILS,
                f"{rule} Relative loss increase at ε = {at:g}: PDE {fmt(_mean(rel('PDE', at)))}, Transformer "
                f"{fmt(_mean(rel('Transformer', at)))}.",
            )
        )
    if curves:
        rows = [["clean", *(fmt_ms(clean[n]) if n in curves else "—" for n, _ in models)]]
        rows += [
            [f"{e:.3g}", *(fmt_ms([r[e] for r in curves[n] if e in r]) if n in curves else "—" for n, _ in models)]
            for e in eps_grid
        ]
        sec.details.append(_table(["ε", "Transformer loss", "PDE loss"], rows))

    def build() -> Figure | str:
        if not curves:
            return "no perturbation curves were logged by complete 20 Newsgroups runs"
        fig = _new_figure(6.0, 3.2)
        ax = fig.add_subplot()
        for (name, _), color in zip(models, ("tab:blue", "tab:red"), strict=True):
            if name not in curves:
                continue
            grid = sorted({e for r in curves[name] for e in r})
            _band(ax, grid, [[r[e] for r in curves[name] if e in r] for e in grid], f"{name} (±std)", color)
            ax.axhline(_mean(clean[name]), color=color, ls=":", lw=0.8)
            if math.isfinite(med.get(name, float("nan"))):
                ax.axvline(med[name], color=color, ls="--", lw=1, label=f"{name} critical ε (median)")
        ax.axvline(paper.PERTURBATION_SIMILAR_BELOW_EPS, color="grey", lw=0.6)
        ax.axvline(paper.PERTURBATION_DIVERGENCE_EPS, color="black", lw=0.6, label="paper: divergence ε")
        ax.set_xscale("log")
        _log_if_wide(ax)
        ax.set_xlabel("ε (noise scale)")
        ax.set_ylabel("loss (dotted: clean)")
        ax.legend(fontsize=6)
        return fig

    sec.figures.append(_figure(ctx, "loss_vs_eps", "Loss vs perturbation ε, critical ε marked", build))
    return sec


# ---- v2 ablations --------------------------------------------------------------------------------------------------
def _last_layer(runs: Sequence[Run], prefix: str) -> str | None:
    layers = _layers(runs, prefix)
    return layers[-1] if layers else None


def _loss_series(run: Run) -> Series | None:
    """``train/loss``, or the stability monitor's running average where the loss was not logged (short runs)."""
    return run.series("train/loss") or run.series(f"{_SM}/loss_ema")


def _instability(run: Run) -> dict[str, float]:
    """Max gradient norm over steps and layers, max training loss, non-finite flag, loss-spike count."""
    grads = [run.scalars[t][1] for t in run.scalars if t.startswith(f"{_GF}/grad_norm/")]
    loss = _loss_series(run)
    losses = loss[1] if loss is not None else np.array([])
    flags = [run.scalars[t][1] for t in run.scalars if t == f"{_SM}/nonfinite" or t.startswith(f"{_SM}/nonfinite/")]
    nonfinite = any(np.any(~np.isfinite(v)) for v in [*grads, losses]) or any(np.nansum(v) > 0 for v in flags)
    finite_g = np.concatenate([v[np.isfinite(v)] for v in grads]) if grads else np.array([])
    finite_l = losses[np.isfinite(losses)]
    spikes = run.scalars.get(f"{_SM}/loss_spike")
    return {
        "grad": float(finite_g.max()) if finite_g.size else float("nan"),
        "loss": float(finite_l.max()) if finite_l.size else float("nan"),
        "nonfinite": float(nonfinite),
        "spikes": float(np.nansum(spikes[1])) if spikes is not None else float("nan"),
    }


def _accuracy_note(ctx: _Ctx, ablation: str, baseline: str) -> str:
    """The final ``val/acc`` of both settings, context beside a rule that does not use it."""
    a, b = _end(ctx.usable(ablation), "val/acc"), _end(ctx.usable(baseline), "val/acc")
    if not a or not b:
        return ""
    return f" Not part of the rule: final val/acc {fmt_ms(a)} (`{ablation}`) vs {fmt_ms(b)} (`{baseline}`)."


def _section_ablations(ctx: _Ctx) -> Section:
    sec = Section(
        "Stabilizers: v2 ablations (MNIST)",
        f"Paper: {paper.V2_SOURCE}. Baseline `mnist_transformer`; ablations `mnist_transformer_no_residual`, "
        "`mnist_transformer_no_layernorm`; the PDE without stabilizers `mnist_pde` against `mnist_pde_stabilized`. "
        f"Drift = `{_SM}/drift/<last layer>` (‖h − u₀‖/‖u₀‖) at the end of training. Instability: max over steps and "
        f"layers of `{_GF}/grad_norm`, max `train/loss` (`{_SM}/loss_ema` where it was not logged), non-finite "
        f"values anywhere (losses, gradient norms, `{_SM}/nonfinite`), loss spikes (`{_SM}/loss_spike`); these use "
        "incomplete runs too.",
    )
    base = "mnist_transformer"
    claim, ptext = "No residual → catastrophic representational drift", paper.V2_NO_RESIDUAL.text
    rule = (
        f"Rule: holds if the ablation's seed-mean drift at its last layer is at least {DRIFT_FACTOR}× the baseline's."
    )
    abl = "mnist_transformer_no_residual"
    if miss := ctx.missing(abl, base):
        sec.rows.append(_not_comparable(claim, ptext, miss, rule))
    else:
        la, lb = _last_layer(ctx.usable(abl), f"{_SM}/drift"), _last_layer(ctx.usable(base), f"{_SM}/drift")
        if la is None or lb is None:
            sec.rows.append(_not_comparable(claim, ptext, f"{NOT_COMPARABLE}: not logged ({_SM}/drift)", rule))
        else:
            da, db = _end(ctx.usable(abl), f"{_SM}/drift/{la}"), _end(ctx.usable(base), f"{_SM}/drift/{lb}")
            ratio = _mean(da) / _mean(db) if _mean(db) > 0 else float("inf")
            sec.rows.append(
                Row(
                    claim,
                    ptext,
                    f"drift at {la}: {fmt_ms(da)}",
                    f"baseline drift at {lb}: {fmt_ms(db)}",
                    HOLDS if ratio >= DRIFT_FACTOR else FAILS,
                    f"{rule} Ours: ratio {fmt(ratio)}." + _accuracy_note(ctx, abl, base) + ctx.shortfall(abl, base),
                )
            )

    def unstable_row(claim: str, ptext: str, abl: str, ref: str) -> Row:
        rule = (
            f"Rule: holds if a run of `{abl}` has non-finite values, or its seed-mean max gradient norm is at least "
            f"{EXPLOSION_FACTOR}× that of `{ref}`."
        )
        if miss := ctx.missing(abl, ref, traced=True):
            return _not_comparable(claim, ptext, miss, rule)
        ia, ib = [_instability(r) for r in ctx.traced(abl)], [_instability(r) for r in ctx.traced(ref)]

        def text(stats: list[dict[str, float]], runs: list[Run]) -> str:
            inc = sum(r.status == "incomplete" for r in runs)
            g = [s["grad"] for s in stats if math.isfinite(s["grad"])]
            lo = [s["loss"] for s in stats if math.isfinite(s["loss"])]
            sp = [s["spikes"] for s in stats if math.isfinite(s["spikes"])]
            return (
                f"max grad norm {fmt_ms(g)}; max train loss {fmt_ms(lo)}; non-finite in "
                f"{int(sum(s['nonfinite'] for s in stats))} of {len(stats)} runs; loss spikes {int(sum(sp))}"
                + (f" ({inc} incomplete run{'s' if inc > 1 else ''})" if inc else "")
            )

        ga = [s["grad"] for s in ia if math.isfinite(s["grad"])]
        gb = [s["grad"] for s in ib if math.isfinite(s["grad"])]
        nonfinite = any(s["nonfinite"] for s in ia)
        ratio = _mean(ga) / _mean(gb) if ga and gb and _mean(gb) > 0 else float("nan")
        if not nonfinite and not math.isfinite(ratio):
            verdict = f"{NOT_COMPARABLE}: not logged ({_GF}/grad_norm)"
        else:
            verdict = HOLDS if nonfinite or ratio >= EXPLOSION_FACTOR else FAILS
        return Row(
            claim,
            ptext,
            text(ia, ctx.traced(abl)),
            f"`{ref}`: {text(ib, ctx.traced(ref))}",
            verdict,
            f"{rule} Ours: grad-norm ratio {fmt(ratio)}; non-finite: {'yes' if nonfinite else 'no'}."
            + _accuracy_note(ctx, abl, ref)
            + ctx.shortfall(abl, ref, traced=True),
        )

    sec.rows.append(
        unstable_row(
            "No LayerNorm → unstable, explosive training",
            paper.V2_NO_LAYERNORM.text,
            "mnist_transformer_no_layernorm",
            base,
        )
    )
    sec.rows.append(
        unstable_row(
            "PDE without stabilizers unstable vs with", paper.V2_PDE_UNSTABLE.text, "mnist_pde", "mnist_pde_stabilized"
        )
    )
    compared = (
        base,
        "mnist_transformer_no_residual",
        "mnist_transformer_no_layernorm",
        "mnist_pde",
        "mnist_pde_stabilized",
    )
    rows = []
    for s in compared:
        runs = ctx.usable(s)
        last = _last_layer(runs, f"{_SM}/drift")
        st = [_instability(r) for r in ctx.traced(s)]
        rows.append(
            [
                s,
                f"{last}: {fmt_ms(_end(runs, f'{_SM}/drift/{last}'))}" if last else "—",
                fmt_ms([x["grad"] for x in st if math.isfinite(x["grad"])]),
                f"{int(sum(x['nonfinite'] for x in st))} of {len(st)}",
                fmt_ms(_end(runs, "val/acc")),
            ]
        )
    sec.details.append(
        _table(["setting", "drift at last layer", "max grad norm", "non-finite runs", "final val/acc"], rows)
    )
    colors = dict(zip(compared, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), strict=True))

    def build_drift() -> Figure | str:
        present = [s for s in compared if _layers(ctx.usable(s), f"{_SM}/drift")]
        if not present:
            return "no drift was logged by complete MNIST runs"
        fig = _new_figure(6.0, 3.2)
        ax = fig.add_subplot()
        for s in present:
            layers = _layers(ctx.usable(s), f"{_SM}/drift")
            idx = [int(_BLOCK.match(n).group(1)) for n in layers]  # type: ignore[union-attr]
            _band(ax, idx, [_end(ctx.usable(s), f"{_SM}/drift/{n}") for n in layers], s, colors[s])
        ax.set_yscale("log")
        ax.set_xlabel("layer (blocks.i)")
        ax.set_ylabel("drift ‖h − u₀‖/‖u₀‖ at end")
        ax.legend(fontsize=6)
        return fig

    def build_dynamics() -> Figure | str:
        present = [s for s in compared if ctx.traced(s)]
        if not present:
            return "no MNIST runs with event files"
        fig = _new_figure(7.0, 3.2)
        ax_g, ax_l = fig.subplots(1, 2)
        for s in present:
            g_series = []
            for r in ctx.traced(s):
                tags = [t for t in r.scalars if t.startswith(f"{_GF}/grad_norm/")]
                if tags:
                    steps = np.unique(np.concatenate([r.scalars[t][0] for t in tags]))
                    stack = [np.interp(steps, *r.scalars[t]) for t in tags]
                    g_series.append((steps, np.nanmax(np.vstack(stack), axis=0)))
            if g_series:
                grid, m, _ = _mean_curve(g_series)
                ax_g.plot(grid, m, lw=1, color=colors[s], label=s)
            l_series = [x for x in (_loss_series(r) for r in ctx.traced(s)) if x is not None and x[0].size]
            if l_series:
                grid, m, _ = _mean_curve(l_series)
                ax_l.plot(grid, m, lw=1, color=colors[s], label=s)
        ax_g.set_yscale("log")
        _log_if_wide(ax_l)
        ax_g.set_title("max grad norm over layers", fontsize=9)
        ax_l.set_title("training loss", fontsize=9)
        for ax in (ax_g, ax_l):
            ax.set_xlabel("step")
        if ax_g.lines:
            ax_g.legend(fontsize=6)
        elif ax_l.lines:
            ax_l.legend(fontsize=6)
        return fig

    sec.figures.append(
        _figure(ctx, "ablation_drift", "Drift from the embedding per layer at the end of training", build_drift)
    )
    sec.figures.append(
        _figure(ctx, "ablation_dynamics", "Training dynamics: gradient norm and loss (seed mean)", build_dynamics)
    )
    return sec


# ---- runs and settings ---------------------------------------------------------------------------------------------
def _runs_section(ctx: _Ctx, notes: list[str]) -> str:
    missing = [r for r in ctx.runs.values() if r.status == "missing"]
    incomplete = [r for r in ctx.runs.values() if r.status == "incomplete"]
    order = {s: i for i, s in enumerate(SETTINGS)}
    key = lambda r: (order.get(r.setting, len(order)), r.setting, r.seed)  # noqa: E731
    lines = [
        "## Runs",
        "",
        f"Expected: every setting of {', '.join(f'`{s}`' for s in SETTINGS)} × seeds {', '.join(map(str, ctx.seeds))}. "
        "Claims use complete runs only (the v2 instability claims also use incomplete ones).",
        "",
    ]
    if missing:
        lines.append("**Missing** (no directory or no event file):")
        lines += [
            f"- `{r.setting}` seed {r.seed}" + (f" (`{r.path}`)" if r.path else "") for r in sorted(missing, key=key)
        ]
    else:
        lines.append("**Missing**: none.")
    lines.append("")
    if incomplete:
        lines.append("**Incomplete** (excluded from the claims):")
        for r in sorted(incomplete, key=key):
            why = "run.json absent" if r.meta is None else "run.json says completed=false"
            lines.append(f"- `{r.setting}` seed {r.seed}: {why} (`{r.path}`)")
    else:
        lines.append("**Incomplete**: none.")
    lines += ["", *(f"- Note: {n}" for n in notes), "", "### Run inventory", ""]
    rows = []
    for r in sorted(ctx.runs.values(), key=key):
        meta = r.meta or {}
        wall = meta.get("wall_s")
        rows.append(
            [
                r.setting,
                r.seed,
                r.status,
                meta.get("global_step", "—"),
                f"{float(wall):.1f}" if isinstance(wall, (int, float)) else "—",
                fmt(r.last("val/acc")),
            ]
        )
    lines.append(_table(["setting", "seed", "status", "global_step", "wall_s", "final val/acc"], rows))
    return "\n".join(lines)


def _settings_section(ctx: _Ctx) -> str:
    def uniq(values: list[Any]) -> str:
        out: list[str] = []
        for v in values:
            t = "—" if v is None else (", ".join(map(str, v)) if isinstance(v, list) else str(v))
            if t not in out:
                out.append(t)
        return "; ".join(out) if out else "—"

    def common_overrides(metas: list[dict[str, Any]]) -> str:
        lists = [m.get("overrides") or [] for m in metas]
        common = [o for o in lists[0] if all(o in other for other in lists[1:])] if lists else []
        return ", ".join(map(str, common)) or "—"

    settings = [*SETTINGS, *sorted({s for s, _ in ctx.runs} - set(SETTINGS))]
    rows = []
    for s in settings:
        metas = [r.meta for r in (ctx.runs[k] for k in sorted(ctx.runs) if k[0] == s) if r.meta is not None]
        seeds = sorted(r.seed for r in ctx.runs.values() if r.setting == s and r.has_events)
        rows.append(
            [
                s,
                uniq([m.get("config") for m in metas]),
                ", ".join(map(str, seeds)) or "—",
                uniq([m.get("max_epochs") for m in metas]),
                uniq([m.get("train_subset") for m in metas]),
                uniq([m.get("device") for m in metas]),
                uniq([m.get("data") for m in metas]),
                common_overrides(metas),
                uniq([m.get("notes") for m in metas]),
            ]
        )
    headers = [
        "setting",
        "config",
        "seeds",
        "epochs",
        "train_subset",
        "device",
        "data",
        "overrides (all seeds)",
        "notes",
    ]
    return "\n".join(
        [
            "## Settings and deviations from the paper",
            "",
            "From each run's `run.json` (values that differ between seeds are separated by `;`; the deviations from "
            "the paper are in `notes`).",
            "",
            _compute_line(ctx),
            "",
            _table(headers, rows),
        ]
    )


def _compute_line(ctx: _Ctx) -> str:
    """Which devices the runs used (from ``run.json``), GPU runs named."""
    by_device: dict[str, list[str]] = {}
    for key in sorted(ctx.runs):
        run = ctx.runs[key]
        if run.meta is not None:
            by_device.setdefault(str(run.meta.get("device", "unknown")), []).append(f"{run.setting}/seed{run.seed}")
    if not by_device:
        return "**Compute:** no run recorded its device."
    gpu = {d: r for d, r in by_device.items() if d.startswith("cuda")}
    parts = [f"{len(r)} run(s) on `{d}`" for d, r in by_device.items()]
    line = "**Compute:** " + "; ".join(parts) + "."
    if gpu:
        return line + " GPU runs: " + "; ".join(f"`{d}`: " + ", ".join(r) for d, r in gpu.items()) + "."
    return line + " No run used a GPU."


def _shown_path(d: Path | str) -> str:
    """``d`` relative to the working directory when it lies below it (no machine-specific prefix), else absolute."""
    path = Path(d).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---- entry points --------------------------------------------------------------------------------------------------
def write_report(log_dirs: list[Path], out: Path, command: str | None = None) -> Path:
    """Write ``<out>/REPRODUCTION.md`` and ``<out>/figures/*.png`` from the runs under ``log_dirs``.

    Args:
        log_dirs: roots (``<root>/<setting>/seed<k>``), setting dirs or single run dirs.
        out: the output directory (created).
        command: the command line shown in the report (default: the equivalent ``pdelightning report`` call).

    Returns:
        The path of the Markdown report.
    """
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()
    runs, seeds, notes = discover_runs([Path(d) for d in log_dirs])
    ctx = _Ctx(runs, seeds, fig_dir)
    sections = [
        _section_table2(ctx),
        _section_table3(ctx),
        _section_attention(ctx),
        _section_ib(ctx),
        _section_gradients(ctx),
        _section_perturbation(ctx),
        _section_ablations(ctx),
    ]
    if command is None:
        command = (
            "pdelightning report " + " ".join(shlex.quote(str(d)) for d in log_dirs) + f" --out {shlex.quote(str(out))}"
        )
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    headers = ["claim", "paper", "ours (mean ± std over seeds)", "null baseline", "verdict", "why"]
    parts = [
        "# Reproduction of arXiv 2408.09523 (PDE view of Transformers)",
        "",
        f"Generated by `{command}` on {now} from {', '.join(f'`{_shown_path(d)}`' for d in log_dirs)}.",
        "",
        "Every number here is computed from the runs' TensorBoard scalars except the paper's, which come from "
        "`pdelightning/reproduce/paper.py` with their section and table. End of training = the last logged step, "
        "at initialisation = the first; mean ± std over seeds, std with ddof = 1. Verdicts follow the rule stated in "
        "each row's *why*: **holds**, **does not hold**, or **not comparable** with the reason.",
        "",
        "## Summary",
        "",
        _table(["section", "claim", "verdict"], [[s.title, r.claim, r.verdict] for s in sections for r in s.rows]),
        "",
        _runs_section(ctx, notes),
        "",
        _settings_section(ctx),
    ]
    for sec in sections:
        parts += ["", f"## {sec.title}", "", sec.intro, "", _table(headers, [[*vars(r).values()] for r in sec.rows])]
        for d in sec.details:
            parts += ["", d]
        for f in sec.figures:
            parts += ["", f]
    md = out / "REPRODUCTION.md"
    md.write_text("\n".join(parts) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    """``pdelightning report <log dirs...> --out <dir>``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["report"]:
        args_list = args_list[1:]
    parser = argparse.ArgumentParser(
        prog="pdelightning report",
        description="Write a Markdown reproduction report (REPRODUCTION.md and figures/) from finished runs' logs.",
    )
    parser.add_argument("log_dirs", nargs="+", type=Path, help="roots (<root>/<setting>/seed<k>) or single run dirs")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(args_list)
    absent = [str(d) for d in args.log_dirs if not d.is_dir()]
    if absent:
        parser.error(f"log dir(s) not found: {', '.join(absent)}")
    command = "pdelightning report " + " ".join(shlex.quote(a) for a in args_list)
    path = write_report(args.log_dirs, args.out, command=command)
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
