"""Markdown rendering of the structured sections (no numbers are computed here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdelightning_reproduce import figures
from pdelightning_reproduce.rules import RULES, Quantity, Rule
from pdelightning_reproduce.sections.common import Section, Table
from pdelightning_reproduce.verdicts import NOT_COMPARABLE, VERDICTS, ClaimResult, rule_text


def md_cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines removed."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def claims_table(claims: Sequence[ClaimResult]) -> str:
    """The verdict table of one section."""
    rows = [
        [
            c.rule.claim,
            c.rule.paper,
            c.ours or "—",
            c.null or "—",
            c.ceiling or "—",
            c.accuracy or "—",
            f"**{c.verdict}**",
            c.why,
        ]
        for c in claims
    ]
    return md_table(["claim", "paper", "ours (95 % interval)", "null", "ceiling", "accuracy", "verdict", "why"], rows)


def render_table(t: Table) -> str:
    """A supporting table with its caption."""
    return md_table(t.headers, t.rows) + (f"\n\n*{t.caption}*" if t.caption else "")


def has_data(data: dict[str, Any]) -> bool:
    """Whether a figure's data has anything to plot: some series (``series``, ``dashed``), panel curves
    (``panels``) or a matrix (anything else); an axis with only the paper's marks is not a figure.

    Example::

        >>> has_data({"series": [], "paper": [("x", [1.0])]}), has_data({"series": [("a", [1.0])]})
        (False, True)
    """
    keys = {"series", "dashed", "panels"} & set(data)
    if not keys:
        return True

    def nonempty(x: Any) -> bool:
        return x.size > 0 if hasattr(x, "size") else bool(x)

    panels = data.get("panels") or ()
    return (
        nonempty(data.get("series") or []) or nonempty(data.get("dashed") or []) or any(nonempty(p[1]) for p in panels)
    )


def render_section(sec: Section, fig_dir: Path, fig_rel: str) -> str:
    """One section: intro, verdicts, tables, figures (drawn and saved now), notes."""
    parts = [f"## {sec.title}", sec.intro] if sec.intro else [f"## {sec.title}"]
    if sec.claims:
        parts.append(claims_table(sec.claims))
    parts += [render_table(t) for t in sec.tables]
    for f in sec.figures:
        if not has_data(f.data):
            parts.append(f"*Figure {f.name} not drawn: nothing to plot in this summary ({f.caption}).*")
            continue
        try:
            fig = f.draw(**f.data)
        except (ValueError, IndexError, KeyError) as e:  # a figure never blocks the report
            parts.append(f"*Figure {f.name} not drawn: {type(e).__name__}: {e}*")
            continue
        figures.save(fig, fig_dir / f"{f.name}.png")
        parts.append(f"![{f.caption}]({fig_rel}/{f.name}.png)\n\n*{f.caption}*")
    parts += [f"- {n}" for n in sec.notes]
    return "\n\n".join(p for p in parts if p)


def decided_by(verdict: str, why: str) -> str:
    """What decides a verdict, in one phrase: a not-comparable verdict's reason, else the verdict's interval method.

    Example::

        >>> decided_by("not comparable", "Not comparable: not run here: no run of `x`. Rule: holds if …")
        'not run here: no run of `x`'
    """
    if verdict == NOT_COMPARABLE and "Not comparable: " in why:
        return "; and ".join(part.split(". ", 1)[0] for part in why.split("Not comparable: ")[1:])
    return why.rsplit("Interval method: ", 1)[-1].rstrip(".") if "Interval method: " in why else "—"


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def summary_table(sections: Sequence[Section]) -> str:
    """Every verdict in one table, with the counts per class; a not-comparable verdict with its reason, shortened."""
    rows = [
        [
            s.title,
            c.rule.claim,
            f"**{c.verdict}**"
            + (f" ({_short(decided_by(c.verdict, c.why))})" if c.verdict == NOT_COMPARABLE and c.why else ""),
            c.ours or "—",
        ]
        for s in sections
        for c in s.claims
    ]
    counts = {v: sum(c.verdict == v for s in sections for c in s.claims) for v in VERDICTS}
    head = ", ".join(f"{n} {v}" for v, n in counts.items())
    return f"{head}.\n\n" + md_table(["section", "claim", "verdict", "ours"], rows)


def changes_table(changes: Sequence[dict[str, str]]) -> str:
    """The "changed verdicts" table."""
    if not changes:
        return "No verdict of the previous report changed."
    return md_table(
        ["claim (previous report)", "previous", "now", "rule", "what changed in the measurement", "ours now"],
        [[c["claim"], c["previous"], f"**{c['now']}**", c["rule"], c["why"], c.get("ours", "—")] for c in changes],
    )


def v2_changes_table(rows: Sequence[dict[str, str]]) -> str:
    """The "changed since v2" table (:func:`~pdelightning_reproduce.rule_changes.changed_since_v2` rows, each with
    ``today``: what decides today's verdict).
    """
    if not rows:
        return "No verdict changed since v2."
    return md_table(
        ["rule", "v2", "now", "what changed in the rule", "why", "what decides today's verdict"],
        [[r["rule"], r["v2"], f"**{r['now']}**", r["what changed"], r["why"], r.get("today", "—")] for r in rows],
    )


def _valid_text(q: Quantity) -> str:
    """A quantity's valid range and why, for the appendix ("" when it has none)."""
    if q.valid is None:
        return ""
    return f" (valid range [{q.valid[0]:g}, {q.valid[1]:g}]: {q.valid_reason or 'no reason recorded'})"


def rules_appendix(rules: Sequence[Rule] = RULES) -> str:
    """Every rule with its quantities and test, as fixed before the runs."""
    out = []
    for r in rules:
        q = "; ".join(f"`{x.key}`: {x.definition}{_valid_text(x)}" for x in r.quantities) or "—"
        test = rule_text(r.test) if r.test is not None else f"none: not comparable ({r.not_comparable})"
        out.append(f"- **{r.id}**: {r.claim}. Quantities: {q}. Holds if: {test}.")
    return "\n".join(out)
