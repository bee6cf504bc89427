"""One module per claim section of the report; each returns a structured :class:`~.common.Section`.

:func:`build_sections` runs them all in report order. The PDE-lens section appears only when its quantities exist.
Every verdict that reads an under-trained main run is then made "not comparable: under-trained", and one that reads a
main setting with fewer seeds than the design is judged without it (:mod:`.training`).
"""

from __future__ import annotations

from pdelightning_reproduce.sections.ablations import ablations
from pdelightning_reproduce.sections.attention import attention
from pdelightning_reproduce.sections.bottleneck import bottleneck
from pdelightning_reproduce.sections.common import FigureSpec, Section, Table
from pdelightning_reproduce.sections.gradients import gradients
from pdelightning_reproduce.sections.information_flow import table2, table3
from pdelightning_reproduce.sections.lens import lens
from pdelightning_reproduce.sections.perturbation import perturbation
from pdelightning_reproduce.sections.refinement import refinement
from pdelightning_reproduce.sections.runs import runs
from pdelightning_reproduce.sections.training import guard_all, guard_under_trained, held_back
from pdelightning_reproduce.summary import Results

__all__ = ["FigureSpec", "Section", "Table", "build_sections"]

BUILDERS = (runs, table2, table3, attention, bottleneck, gradients, perturbation, ablations, refinement)


def build_sections(results: Results) -> list[Section]:
    """Every section, in report order (the PDE lens last, when present); verdicts on under-trained runs and on
    settings with too few seeds guarded.
    """
    sections = [build(results) for build in BUILDERS]
    partial = held_back(results)  # settings with fewer seeds than the design: claims judged without them too
    without = (  # each checked for under-trained runs among the runs it was judged on
        {c.rule.id: guard_under_trained(c, partial) for build in BUILDERS for c in build(partial).claims}
        if partial is not None
        else None
    )
    for sec in sections:
        sec.claims = guard_all(sec.claims, results, without)
    extra = lens(results)
    return sections + ([extra] if extra is not None else [])
