"""Under-training (issue 18, item 5): a verdict that reads a main run stopped before its plateau is not comparable.

A main run is *under-trained* when its record says its plateau criterion was not met and it stopped at its epoch or
step cap (:func:`~pdelightning_reproduce.divergence.recorded_under_trained`). Every verdict that reads such a run,
directly or through a pair unit built from its setting, becomes "not comparable: under-trained", naming the runs: a
claim about trained models is never decided on models that were still learning. The sweeps have no plateau
criterion (they are read at a fixed number of steps by design) and are not asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from pdelightning_reproduce.divergence import recorded_under_trained
from pdelightning_reproduce.rules import Rule
from pdelightning_reproduce.settings import MAIN_SETTING_NAMES, PAIRS, SEEDS
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import NOT_COMPARABLE, ClaimResult

_MNIST = ("mnist_transformer", "mnist_pde")
_NEWSGROUPS = ("newsgroups_transformer", "newsgroups_pde")
#: The main settings each report section's rules read (pair units count as their models' settings).
SECTION_READS: dict[str, tuple[str, ...]] = {
    "runs": ("mnist_transformer",),
    "table2": _MNIST,
    "table3": _MNIST,
    "attention": _MNIST,
    "refinement": ("mnist_pde",),
    "bottleneck": _NEWSGROUPS,
    "gradients": _NEWSGROUPS,
    "perturbation": _NEWSGROUPS,
    "ablations": (),
}
#: Rules that read fewer settings than their section and whose id does not say so.
RULE_READS: dict[str, tuple[str, ...]] = {
    "ib.pde_layer1_sharpest": ("newsgroups_pde",),
    "ib.decline_linear_relu": ("newsgroups_pde_linear_relu",),
    "ib.linear_relu_lower": ("newsgroups_transformer", "newsgroups_pde_linear_relu"),
    "ib.linear_relu_layer1_sharpest": ("newsgroups_pde_linear_relu",),
    "grad.linear_higher": ("newsgroups_transformer", "newsgroups_pde_linear"),
    "grad.linear_first_layer": ("newsgroups_transformer", "newsgroups_pde_linear"),
}
#: Settings a rule reads beyond its section's, by the last part of its id.
EXTRA_READS: dict[str, tuple[str, ...]] = {"diffusion": ("mnist_pde_diffusion",)}


def settings_read(rule: Rule) -> tuple[str, ...]:
    """The main settings ``rule`` reads: its section's, narrowed to one model when its id ends in ``transformer`` or
    ``pde`` (``ib.decline_pde``, ``t2.transformer``); a ``…_diffusion`` rule reads the paper's diffusion-only PDE in
    place of ours.

    Example::

        >>> from pdelightning_reproduce.rules import BY_ID
        >>> settings_read(BY_ID["grad.range_pde"]), settings_read(BY_ID["t3.cka_diffusion"])
        (('newsgroups_pde',), ('mnist_transformer', 'mnist_pde_diffusion'))
    """
    if rule.id in RULE_READS:
        return RULE_READS[rule.id]
    base = SECTION_READS.get(rule.section, ())
    last = re.split(r"[._]", rule.id)[-1]
    if last in ("transformer", "pde"):
        return tuple(s for s in base if s.endswith(f"_{last}"))
    if last in EXTRA_READS:
        return tuple(s for s in base if not s.endswith("_pde")) + EXTRA_READS[last]
    return base


def under_trained_runs(results: Results, settings: Sequence[str]) -> list[str]:
    """One phrase per setting of ``settings`` with runs whose record says they stopped before their plateau:
    ``"`<setting>` seeds 0, 1 (stopped at max_epochs, epoch 10)"``; ``[]`` when there are none.
    """
    out = []
    for s in settings:
        rows = [r for r in results.run_rows(s).to_dict("records") if recorded_under_trained(r)]
        if rows:
            seeds = ", ".join(str(int(r["seed"])) for r in rows)
            how = sorted({f"{r.get('stop_reason')}, epoch {r.get('epochs')}" for r in rows})
            unrecorded = [str(int(r["seed"])) for r in rows if str(r.get("plateau_met")) in ("nan", "None", "")]
            plural = "s" if len(unrecorded) > 1 else ""
            note = f"; seed{plural} {', '.join(unrecorded)} recorded no plateau verdict" if unrecorded else ""
            out.append(f"`{s}` seed{'s' * (len(rows) > 1)} {seeds} (stopped at {'; '.join(how)}{note})")
    return out


def guard_under_trained(claim: ClaimResult, results: Results) -> ClaimResult:
    """``claim`` with its verdict "not comparable" when it reads an under-trained run; its numbers, and what the rule
    reads on them, are kept as context.
    """
    runs = under_trained_runs(results, settings_read(claim.rule))
    if not runs or claim.rule.test is None:
        return claim
    reading, claim.verdict = claim.verdict, NOT_COMPARABLE
    context = (
        f" Context only, not a verdict: on these runs the rule reads '{reading}'." if reading != NOT_COMPARABLE else ""
    )
    claim.why = (
        f"Not comparable: under-trained: {'; '.join(runs)}, before the plateau criterion was met "
        f"(pdelightning_reproduce.divergence.under_trained).{context} " + claim.why
    )
    return claim


def guard_not_run(claim: ClaimResult, results: Results) -> ClaimResult:
    """``claim``, its reason made specific when it is not comparable because a setting it reads has no run at all in
    this summary, neither in the run table nor in the measurements ("not run here", naming the settings), instead of
    the generic "the runs or quantities are missing".
    """
    absent = [
        s for s in settings_read(claim.rule) if results.run_rows(s).empty and not (results.df["setting"] == s).any()
    ]
    if not absent or claim.verdict != NOT_COMPARABLE or claim.rule.test is None:
        return claim
    names = ", ".join(f"`{s}`" for s in absent)
    claim.why = (
        f"Not comparable: not run here: no run of {names} in this summary. docs/reproduction/v3_plan.md says which "
        "settings need a GPU. " + claim.why
    )
    return claim


def too_few_seeds(runs: pd.DataFrame, settings: Sequence[str]) -> list[str]:
    """One phrase per setting of ``settings`` that has rows in the run table ``runs``, but fewer trained seeds
    (complete or diverged) than the design's :data:`~pdelightning_reproduce.settings.SEEDS`:
    ``"`<setting>` 3 of 5 seeds (0, 1, 2)"``; ``[]`` when every setting read has them all (a setting without any run
    is :func:`guard_not_run`'s).
    """
    out = []
    for s in settings:
        rows = runs[runs["setting"] == s] if "setting" in runs else runs.iloc[:0]
        if rows.empty:
            continue
        status = rows["status"] if "status" in rows else pd.Series("", index=rows.index)
        trained = sorted({int(x) for x in rows["seed"][status.isin(("complete", "diverged"))]})
        if len(trained) < len(SEEDS):
            seeds = f" ({', '.join(map(str, trained))})" if trained else ""
            out.append(f"`{s}` {len(trained)} of {len(SEEDS)} seeds{seeds}")
    return out


def guard_too_few_seeds(claim: ClaimResult, results: Results, without: ClaimResult | None = None) -> ClaimResult:
    """``claim`` judged as if a setting with fewer trained seeds than the design asks (issue 18: n >= 5 in every cell;
    e.g. while its runs are still being trained) had not been run, with what the rule reads on the seeds there are
    kept as context.

    ``without`` is the same rule judged on ``results`` without those settings: its verdict is taken when it is decided
    (a claim that holds or fails whatever the partial setting shows), else the claim is "not comparable: too few seeds
    yet". So a verdict never rests on fewer seeds than the design, and adding the partial seeds cannot decide what
    their absence left open.
    """
    short = too_few_seeds(results.runs, settings_read(claim.rule))
    if not short or claim.rule.test is None:
        return claim
    reading = f"on the seeds there are the rule reads '{claim.verdict}'"
    if without is not None and without.verdict != NOT_COMPARABLE:
        without.why = f"Decided without {'; '.join(short)} (too few seeds yet; {reading}). " + without.why
        return without
    context = f" Context only, not a verdict: {reading}." if claim.verdict != NOT_COMPARABLE else ""
    claim.verdict = NOT_COMPARABLE
    claim.why = f"Not comparable: too few seeds yet: {'; '.join(short)}.{context} " + claim.why
    return claim


def held_back(results: Results) -> Results | None:
    """``results`` without the main settings that have fewer trained seeds than the design (:func:`too_few_seeds`)
    and without the pair units built from them (``pair_<name>``, :data:`~pdelightning_reproduce.settings.PAIRS`), or
    ``None`` when there are none.
    """
    partial = {s for s in MAIN_SETTING_NAMES if too_few_seeds(results.runs, [s])}
    if not partial:
        return None
    dropped = partial | {f"pair_{p.name}" for p in PAIRS if {p.model, p.reference} & partial}
    df, runs = results.df, results.runs
    return Results(df[~df["setting"].isin(dropped)], runs[~runs["setting"].isin(dropped)], results.compute)


def guard_all(
    claims: Sequence[ClaimResult], results: Results, without: dict[str, ClaimResult] | None = None
) -> list[ClaimResult]:
    """:func:`guard_under_trained`, :func:`guard_too_few_seeds`, then :func:`guard_not_run`, of every claim.

    ``without``: the claims judged on :func:`held_back` results, by rule id, each already guarded for under-trained
    runs among the runs it was judged on.
    """
    out = []
    for c in claims:
        c = guard_under_trained(c, results)
        c = guard_too_few_seeds(c, results, (without or {}).get(c.rule.id))
        out.append(guard_not_run(c, results))
    return out


__all__ = [
    "SECTION_READS",
    "guard_all",
    "guard_not_run",
    "guard_too_few_seeds",
    "guard_under_trained",
    "held_back",
    "settings_read",
    "too_few_seeds",
    "under_trained_runs",
]
