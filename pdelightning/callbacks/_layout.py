"""The run's TensorBoard Custom Scalars layout, built only from the tags the callbacks actually logged.

Every analysis tag reads ``analysis/<callback>/<quantity>[/<layer>]``; secondary quantities (nulls, raw margins,
unmatched variants, estimator diagnostics) read ``analysis/<callback>/detail/<quantity>[/<layer>]``, so that the
first page of each view shows the headline numbers. A callback proposes charts (``{title: [tag regex, ...]}``);
:func:`build_layout` keeps a regex only when it matches a logged tag, a chart only when it keeps a regex, and adds one
multiline chart (all layers of one quantity as the lines of ONE chart) for every logged quantity no proposed chart
covers. Charts whose every tag is under ``detail/`` go to a category of their own, ``analysis/<callback>/detail``.
Everything here is pure (no TensorBoard, no trainer), so it is tested on plain lists of tags.

Nothing is logged as NaN: :func:`finite_only` leaves an undefined value out (TensorBoard draws nothing for NaN
anyway, and a NaN point hides the rest of a chart's scale) and says once per quantity why it is undefined.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

__all__ = ["DETAIL", "build_layout", "finite_only", "is_detail", "quantity_chart"]

DETAIL = "detail"


def is_detail(quantity: str, patterns: Sequence[str]) -> bool:
    """Whether ``quantity`` is secondary: it fully matches one of the regexes ``patterns``.

    Example::

        >>> is_detail("cosine_null_uniform", [r".*_null_.*", r".*_margin"]), is_detail("cosine", [r".*_null_.*"])
        (True, False)
    """
    return any(re.fullmatch(p, quantity) for p in patterns)


def quantity_chart(tag: str, name: str) -> tuple[str, str, bool] | None:
    """``(title, regex, detail)`` of the automatic chart of ``tag`` of callback ``name`` (``None``: not its tag).

    ``analysis/<name>/[detail/]<quantity>/<layer>`` gives the chart of ``<quantity>`` over all layers; a tag with no
    layer part (``analysis/<name>/lyapunov``) gives a chart of its own.

    Example::

        >>> quantity_chart("analysis/pde_fit/detail/alpha/blocks.0", "pde_fit")
        ('alpha', '^analysis/pde_fit/detail/alpha/[^/]+$', True)
    """
    prefix = f"analysis/{name}/"
    if not tag.startswith(prefix):
        return None
    rest = tag[len(prefix) :].split("/")
    detail = rest[0] == DETAIL and len(rest) > 1
    parts = rest[1:] if detail else rest
    head = prefix + (f"{DETAIL}/" if detail else "")
    if len(parts) == 1:
        return parts[0], "^" + re.escape(head + parts[0]) + "$", detail
    quantity = "/".join(parts[:-1])
    return quantity, "^" + re.escape(head + quantity) + "/[^/]+$", detail


def build_layout(
    proposed: Mapping[str, Mapping[str, Sequence[str]]], tags: Iterable[str]
) -> dict[str, dict[str, list[object]]]:
    """The Custom Scalars layout of the ``tags`` logged so far (``SummaryWriter.add_custom_scalars`` format).

    Args:
        proposed: ``{callback name: {chart title: [tag regex, ...]}}``, the charts each callback suggests.
        tags: every scalar tag logged so far.

    Returns:
        ``{category: {chart title: ["Multiline", [regex, ...]]}}`` in which every regex matches at least one of
        ``tags`` (categories ``analysis/<callback>`` and ``analysis/<callback>/detail``; empty ones are left out).
    """
    tags = sorted(set(tags))
    layout: dict[str, dict[str, list[object]]] = {}
    for name, charts in proposed.items():
        mine = [t for t in tags if t.startswith(f"analysis/{name}/")]
        if not mine:
            continue
        head: dict[str, list[str]] = {}
        detail: dict[str, list[str]] = {}
        covered: set[str] = set()
        for title, regexes in charts.items():
            kept = [r for r in regexes if any(re.search(r, t) for t in mine)]
            if not kept:
                continue
            matched = {t for t in mine if any(re.search(r, t) for r in kept)}
            covered |= matched
            into = detail if all(f"analysis/{name}/{DETAIL}/" in t for t in matched) else head
            into[title] = kept
        for tag in mine:
            if tag in covered:
                continue
            auto = quantity_chart(tag, name)
            assert auto is not None
            title, regex, is_secondary = auto
            into = detail if is_secondary else head
            if regex not in into.setdefault(title, []):
                into[title].append(regex)
        for category, charts_in in ((f"analysis/{name}", head), (f"analysis/{name}/{DETAIL}", detail)):
            if charts_in:
                layout[category] = {title: ["Multiline", regexes] for title, regexes in charts_in.items()}
    return layout


def finite_only(
    metrics: Mapping[str, float | Tensor], said: set[str], who: str, reasons: Mapping[str, str]
) -> dict[str, float]:
    """The finite values of ``metrics``; an undefined (non-finite) value is left out, and said once per quantity.

    Args:
        metrics: ``{tag: value}``.
        said: quantities already reported (updated).
        who: the callback's class name, for the message.
        reasons: ``{quantity: why it can be undefined}`` (the callback's :attr:`ProbeCallback.undefined`).
    """
    values = {k: float(v) for k, v in metrics.items()}
    kept = {k: v for k, v in values.items() if math.isfinite(v)}
    new: dict[str, list[str]] = {}
    for tag in sorted(set(values) - set(kept)):
        parts = tag.split("/")
        quantity = parts[-2] if len(parts) > 3 and parts[-2] != DETAIL else parts[-1]
        if quantity not in said:
            new.setdefault(quantity, []).append(tag)
    for quantity, tags in new.items():
        said.add(quantity)
        why = reasons.get(quantity, "non-finite (see the Logged metrics of its docstring)")
        rank_zero_info(
            f"{who}: {quantity} is undefined ({len(tags)} tag(s), e.g. {tags[0]}) and not logged while it is: {why}"
        )
    return kept
