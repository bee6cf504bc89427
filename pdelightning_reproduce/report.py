"""``pdelightning-reproduce report``: REPRODUCTION.md and its figures from the compact summary, without training.

    pdelightning-reproduce report docs/reproduction --out docs        # from the committed summary.csv.gz and runs.csv
    pdelightning-reproduce report runs/paper --out /tmp/report       # from a runs root (every unit's summary.csv)

Reading (:mod:`.summary`), the claim sections (:mod:`.sections`, structured results with verdicts), and rendering
(:mod:`.render`, :mod:`.figures`) are separate; this module only wires them and writes the document: a banner saying
which runs the verdicts judge (:func:`provenance`), the verdicts that changed since the v2 report with what changed
in each rule and why (:func:`~pdelightning_reproduce.rule_changes.changed_since_v2`), and the pre-run rules sha256
beside today's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path

from pdelightning_reproduce import rules as rules_module
from pdelightning_reproduce.render import (
    changes_table,
    decided_by,
    render_section,
    rules_appendix,
    summary_table,
    v2_changes_table,
)
from pdelightning_reproduce.rule_changes import CHANGES_AFTER_V3_RECORD, changed_since_v2
from pdelightning_reproduce.rules import BY_ID, CHANGES_AFTER_FIXING, INTERVAL
from pdelightning_reproduce.sections import Section, build_sections
from pdelightning_reproduce.sections.training import too_few_seeds
from pdelightning_reproduce.settings import MAIN_SETTING_NAMES, SEEDS, SETTING_NAMES
from pdelightning_reproduce.summary import Results

#: What the v3 runs are, for the banner of a report made without them.
V3_PLAN = (
    "The v3 runs (the paper's PDE variants beside ours, n >= 5 seeds in every cell, 20 Newsgroups on the full "
    "training set to its plateau criterion, the PDE sweeps over Δt cells, baseline and ablations at matched learning "
    "rates, every loss recorded for the divergence rule) are specified in `docs/reproduction/v3_plan.md` and are "
    "**not yet trained**."
)

#: The previous report's verdicts are read from the summary's folder unless ``--previous`` names another file.
PREVIOUS_NAME = "previous_verdicts.json"


def rules_sha256() -> str:
    """sha256 of ``rules.py`` as it is now (the report prints it beside the one recorded before the runs)."""
    return rules_module.rules_sha256()


def changed_verdicts(sections: Sequence[Section], previous: Path) -> list[dict[str, str]]:
    """Every previous verdict whose rule now gives another one, with what changed in the measurement."""
    if not previous.is_file():
        return []
    now = {c.rule.id: c for s in sections for c in s.claims}
    prev_of = {p: r.id for r in BY_ID.values() for p in r.previous}
    out = []
    for old in json.loads(previous.read_text())["verdicts"]:
        rid = prev_of.get(old["claim"])
        new = now.get(rid) if rid else None
        row = {"claim": old["claim"], "previous": old["verdict"], "rule": rid or "—"}
        if new is None:
            out.append({**row, "now": "not re-tested", "why": "no rule continues this claim"})
        elif new.verdict != old["verdict"]:
            out.append({**row, "now": new.verdict, "why": new.rule.changes or "—", "ours": new.ours or "—"})
    return out


def provenance(results: Results) -> str:
    """The banner: which runs (settings, seeds, budgets) the verdicts judge, and what they are not."""
    runs = results.runs
    if not len(runs):
        return "> **No run table**: the verdicts below judge whatever the summary holds."
    parts = []
    for setting, g in runs.groupby("setting", sort=True):
        seeds = sorted({int(x) for x in g["seed"]})
        cells = sorted({str(c) for c in g["cell"] if str(c)})
        budgets = ", ".join(sorted({str(b) for b in g["budget"] if str(b) not in ("", "nan")})) or "?"
        where = f"{len(cells)} cells x " if cells else ""
        parts.append(f"`{setting}` ({where}seeds {', '.join(map(str, seeds))}; budget {budgets})")
    # a run trained since v2 records its loss series, so it carries training's divergence verdict; v2's runs do not
    judged = runs["training_divergence"].dropna() if "training_divergence" in runs else ()
    if any(str(v).strip() not in ("", "nan", "None") for v in judged):
        absent = [f"`{s}`" for s in SETTING_NAMES if s not in set(runs["setting"])]
        missing = (
            f" **Not run here**: {', '.join(absent)}; every verdict that reads them is *not comparable: not run "
            "here* (`docs/reproduction/v3_plan.md` says what each part costs and which need a GPU)."
            if absent
            else ""
        )
        short = too_few_seeds(runs, MAIN_SETTING_NAMES)
        partial = (
            f" **Fewer seeds than the design's {len(SEEDS)}** (still being trained): {'; '.join(short)}; they count as "
            "not run: a verdict that reads them is judged without them (and says so) where that decides it, else it "
            "is *not comparable: too few seeds yet*; what the rule reads on their seeds is given as context."
            if short
            else ""
        )
        return f"> **The runs judged here**: {'; '.join(parts)}.{missing}{partial}"
    return (
        "> **These are v2's runs judged by the v3 rules.** Nothing was re-trained: the verdicts re-judge the runs of "
        f"the v2 report ({len(runs)} runs: {'; '.join(parts)}; budgets in `pdelightning_reproduce/budget.py`) with "
        f"the rules fixed for v3. {V3_PLAN} Verdicts that read a measurement v2 did not make (the held-out I(T;Y) "
        "bound with its limits, training's divergence from a loss series, the paper's diffusion-only PDE) are "
        "**not comparable: not measured yet**; verdicts that read a main run stopped before its plateau criterion "
        "are **not comparable: under-trained** (the runs are named)."
    )


def write_report(source: Path, out: Path, previous: Path | None = None) -> Path:
    """Write ``<out>/REPRODUCTION.md`` and ``<out>/figures/*.png`` from the summary at ``source``.

    ``previous`` defaults to ``<source>/previous_verdicts.json``.
    """
    previous = Path(previous) if previous is not None else Path(source) / PREVIOUS_NAME
    results = Results.load(Path(source))
    sections = build_sections(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quick = (
        bool(results.runs.get("quick", []).astype(str).str.lower().isin(["true", "1"]).any())
        if len(results.runs)
        else False
    )
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# Reproduction of arXiv 2408.09523 (PDE view of Transformers): v3 rules",
        provenance(results),
        f"Generated by `pdelightning-reproduce report {source} --out {out}` on {when}. Nothing here is re-trained: "
        "every number comes from the per-run summary (`docs/reproduction/summary.csv.gz`, `runs.csv`), which "
        "`pdelightning-reproduce analyze` computes from the runs' saved weights, except the paper's "
        "(`pdelightning_reproduce/paper.py`).",
    ]
    if quick:
        head.append(
            "> **QUICK PIPELINE CHECK**: these runs used `--quick` (a few steps on small data). The numbers "
            "mean nothing; only the rendering is checked."
        )
    head.append(
        "**How to read a verdict.** Every claim has a rule fixed before any run ("
        f"{rules_module.sha_text()}). Each number in a rule is a seed mean with its 95 % interval "
        f"({INTERVAL}). A rule **holds** when every interval it tests lies on the claim's side of its threshold, "
        "**does not hold** when one lies wholly on the other side, is **inconclusive** when an interval straddles a "
        "threshold, and is **not comparable** when the claim cannot be measured here, reads an estimate outside its "
        "estimator's valid range, or reads an under-trained model (the reason is given). Every number is printed "
        "as value [95 % interval] with its interval method and n in the verdict's 'why'; each model's accuracy is "
        "reported beside its verdicts."
    )
    changes_after = (
        ("Changes to the rules after they were fixed: " + "; ".join(CHANGES_AFTER_FIXING))
        if CHANGES_AFTER_FIXING
        else "No rule was changed after it was fixed."
    )
    claims = [c for sec in sections for c in sec.claims]
    v2_rows = changed_since_v2((c.rule.id, c.verdict) for c in claims)
    reason = {c.rule.id: decided_by(c.verdict, c.why) for c in claims}
    body = [
        "## Summary",
        summary_table(sections),
        "## Verdicts that changed since v2",
        "The v2 report's verdict of every rule (`pdelightning_reproduce.rule_changes.V2_VERDICTS`) against today's, "
        "with what changed in the rule and why (`RULE_CHANGES_V3`), and what decides today's verdict.",
        v2_changes_table([{**r, "today": reason.get(r["rule"], "—")} for r in v2_rows]),
        "Changes to the v3 rules after their sha256 was first recorded: "
        + ("; ".join(CHANGES_AFTER_V3_RECORD) if CHANGES_AFTER_V3_RECORD else "none."),
        "## Verdicts that changed since the v1 report",
        "The v1 report (7 settings x 3 seeds, CPU, 86-step MNIST runs, twins, no intervals) is kept as data "
        "in `docs/reproduction/previous_verdicts.json`.",
        changes_table(changed_verdicts(sections, previous)),
        changes_after,
    ]
    body += [render_section(s, out / "figures", "figures") for s in sections]
    body += ["## Appendix: the rules", rules_appendix()]
    path = out / "REPRODUCTION.md"
    path.write_text("\n\n".join(head + body) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """``pdelightning-reproduce report SOURCE --out DIR``."""
    p = argparse.ArgumentParser(
        prog="pdelightning-reproduce report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", type=Path, help="folder with summary.csv.gz and runs.csv, or a runs root")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where REPRODUCTION.md and figures/ go")
    p.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="previous verdicts (JSON) for the changes section (default: SOURCE/previous_verdicts.json)",
    )
    args = p.parse_args(argv)
    if not args.source.exists():
        p.error(f"{args.source} does not exist; give a folder with summary.csv.gz and runs.csv, or a runs root")
    path = write_report(args.source, args.out, args.previous)
    print(f"[report] {path}")
    return 0
