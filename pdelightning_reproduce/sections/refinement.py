"""Depth refinement of the trained PDE model (the continuum claim)."""

from __future__ import annotations

from pdelightning_reproduce.rules import BY_ID
from pdelightning_reproduce.sections.common import Section, cell, est
from pdelightning_reproduce.summary import Results
from pdelightning_reproduce.verdicts import claim_result


def refinement(results: Results) -> Section:
    """The trained L-step PDE vs the same weights run as 2L steps of Δt/2."""
    sec = Section("refinement", "Depth refinement: is the trained PDE model a discretised continuum?")
    sec.intro = (
        "The PDE model is an explicit Euler discretisation (eq. 20) of a continuous-depth system. If the trained model "
        "is one, the same weights run as 2L steps of Δt/2 (each step's weights used twice) follow nearly the same "
        "trajectory; if training exploited the step size, they do not (Sander et al. 2022 ask the same of ResNets). "
        "`mnist_pde` at its final checkpoint, full MNIST test split."
    )
    dist = est(results.values("mnist_pde", "refine_logit_distance"))
    change = est(results.values("mnist_pde", "refine_acc_change"))
    acc_l, acc_2l = est(results.values("mnist_pde", "refine_acc_L")), est(results.values("mnist_pde", "refine_acc_2L"))
    sec.claims.append(
        claim_result(
            BY_ID["cont.refinement"],
            {("refine_logit_distance", ""): dist, ("refine_acc_change", ""): change},
            ours=f"relative logit distance {cell(dist)}; accuracy change {cell(change)}",
            accuracy=f"test accuracy: L steps {cell(acc_l)}, 2L steps {cell(acc_2l)}",
            estimates={"distance": dist, "change": change},
        )
    )
    return sec
