"""The report as text: the terminal summary (about a dozen lines) and a self-contained one-page ``report.html``.

The HTML page has the findings, the headline per callback with inline SVG sparklines of its curves, and the last
figure of every ``analysis/*`` image tag embedded as a base64 PNG; nothing is loaded from elsewhere.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pdelightning.report.headlines import Curve, Headline
from pdelightning.report.rules import Finding
from pdelightning.report.tags import fmt

MARK = {"critical": "!!", "warning": "! ", "info": "· "}
COLOR = {"critical": "#b00020", "warning": "#b25d00", "info": "#2b5797"}
LINE_COLORS = ("#1f77b4", "#d62728", "#2ca02c")


def summary_lines(
    headlines: Sequence[Headline], findings: Sequence[Finding], n_callbacks: int, report: Path | None, note: str = ""
) -> list[str]:
    """The terminal summary: a title, the findings (most severe first), a headline per callback, the report's path."""
    width = max((len(h.callback) for h in headlines), default=0)
    if n_callbacks:
        title = f"Analysis summary ({n_callbacks} callback{'s' * (n_callbacks != 1)}; {len(findings)} finding"
        title += f"{'s' * (len(findings) != 1)})"
    else:
        title = "Run summary: no analysis was logged in this run (add e.g. -c callbacks/all.yaml); training only"
    lines = [title] + ([f"  {note}"] if note else [])
    lines += [f"  {MARK[f.severity]} {f.text}" for f in findings]
    if n_callbacks and not findings:
        lines.append("  no findings: no rule's threshold was crossed")
    lines += [f"  {h.callback:<{width}}  {h.text}" for h in headlines]
    if report is not None:
        lines.append(f"Report: {report}")
    return lines


# ---- HTML ---------------------------------------------------------------------------------------------------------
def sparkline(curves: Sequence[Curve], width: int = 180, height: int = 40) -> str:
    """An inline SVG of up to three curves over the steps, each scaled to its own range (given in the legend)."""
    curves = [(label, [(s, v) for s, v in pts if math.isfinite(v)]) for label, pts in curves]
    curves = [(label, pts) for label, pts in curves if pts][: len(LINE_COLORS)]
    if not curves:
        return ""
    xs = [s for _, pts in curves for s, _ in pts]
    x0, x1, pad = min(xs), max(xs), 3

    def x(s: float) -> float:
        return pad + (width - 2 * pad) * ((s - x0) / (x1 - x0) if x1 > x0 else 0.5)

    parts, legend = [], []
    for (label, pts), color in zip(curves, LINE_COLORS, strict=False):
        y0, y1 = min(v for _, v in pts), max(v for _, v in pts)

        def y(v: float, y0: float = y0, y1: float = y1) -> float:
            return height - pad - (height - 2 * pad) * ((v - y0) / (y1 - y0) if y1 > y0 else 0.5)

        tip = html.escape(f"{label}: {fmt(pts[0][1])} at step {pts[0][0]} → {fmt(pts[-1][1])} at step {pts[-1][0]}")
        if len(pts) == 1:
            cx, cy = x(pts[0][0]), y(pts[0][1])
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2" fill="{color}"><title>{tip}</title></circle>')
        else:
            coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
            line = f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}">'
            parts.append(f"{line}<title>{tip}</title></polyline>")
        shown = fmt(y0) if fmt(y0) == fmt(y1) else f"{fmt(y0)} to {fmt(y1)}"
        legend.append(f'<span style="color:{color}">{html.escape(label)}</span> <span class="range">{shown}</span>')
    svg = (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f'<rect width="{width}" height="{height}" fill="#fafafa"/>{"".join(parts)}</svg>'
    )
    return f'{svg}<div class="legend">{" · ".join(legend)}</div>'


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:12px}ul.findings{list-style:none;padding:0}
ul.findings li{margin:4px 0;padding:6px 10px;border-left:4px solid;background:#f7f7f7}
.sev{font-weight:600;text-transform:uppercase;font-size:11px;margin-right:6px}
table{border-collapse:collapse;width:100%}td{border-bottom:1px solid #eee;padding:6px 8px;vertical-align:top}
td.cb{font-weight:600;white-space:nowrap}.legend{font-size:11px;color:#555}.range{color:#999}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
figure{margin:0}figure img{width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}
code{font-size:12px;color:#555}summary{font-size:12px;color:#777;cursor:pointer}
"""


def render_html(
    log_dir: Path,
    headlines: Sequence[Headline],
    findings: Sequence[Finding],
    images: Mapping[str, tuple[int, bytes]],
    n_tags: int,
    note: str = "",
) -> str:
    """The one-page report (see the module docstring)."""
    esc = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Run report: {esc(log_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report</h1><div class='meta'>{esc(str(log_dir))} · written {now} · {n_tags} analysis tags"
        + (f" · {esc(note)}" if note else "")
        + "</div>",
        "<h2>Findings</h2>",
    ]
    if findings:
        out.append("<ul class='findings'>")
        for f in findings:
            n = f"{len(f.tags)} tag" + "s" * (len(f.tags) != 1)
            tags = f"<details><summary>{n}</summary><code>{esc(', '.join(f.tags))}</code></details>"
            out.append(
                f"<li style='border-color:{COLOR[f.severity]}'><span class='sev' style='color:{COLOR[f.severity]}'>"
                f"{f.severity}</span>{esc(f.text)}{tags}</li>"
            )
        out.append("</ul>")
    else:
        why = " (no analysis was logged)" if not n_tags else ""
        out.append(f"<p>No finding: no rule's threshold was crossed{why}.</p>")
    out.append("<h2>Headlines</h2><table>")
    for h in headlines:
        cells = f"<td class='cb'>{esc(h.callback)}</td><td>{esc(h.text)}</td><td>{sparkline(h.curves)}</td>"
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    if images:
        out.append("<h2>Figures (the last of each)</h2><div class='figs'>")
        for tag, (step, png) in images.items():
            data = base64.b64encode(png).decode("ascii")
            out.append(
                f"<figure><img alt='{esc(tag)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(tag)} · step {step}</figcaption></figure>"
            )
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)
