"""The sweep table tells a v3 run's divergence (training's, judged afterwards, the run not stopped) from v2's stop
at its bound, and gives the step each diverged."""

from __future__ import annotations

from pdelightning_reproduce.sections.ablations import divergence_steps, stopped_v2
from tests.reproduce.planted import Planter


def test_a_v3_divergence_is_not_a_stop_at_v2s_bound_and_gives_its_step() -> None:
    p = Planter()
    # v3: judged afterwards from the loss series (loss > 3 x the first at step 77); the run trained on
    p.run(
        "sweep_no_layernorm",
        "L6-lr1e-02",
        seeds=(0,),
        budget="v3",
        status="diverged",
        diverged=True,
        training_divergence="diverged",
        divergence_at=77,
        stop_reason="max_steps",
    )
    # v3: the loss became non-finite, which stops any run
    p.run(
        "sweep_no_layernorm",
        "L6-lr1e-02",
        seeds=(1,),
        budget="v3",
        status="diverged",
        diverged=True,
        training_divergence="diverged",
        divergence_at=31,
        stop_reason="diverged",
    )
    p.run(
        "sweep_no_layernorm",
        "L6-lr1e-02",
        seeds=(2,),
        budget="v3",
        training_divergence="trained",
        stop_reason="max_steps",
    )
    # v2: stopped at 10 ln C, no loss series, so no training verdict
    p.run(
        "sweep_no_layernorm",
        "L6-lr1e-02",
        seeds=(3,),
        budget="cpu",
        status="diverged",
        diverged=True,
        divergence_step=2,
    )
    r = p.results()
    assert stopped_v2(r, "sweep_no_layernorm", "L6-lr1e-02") == {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0}
    assert sorted(divergence_steps(r, "sweep_no_layernorm", "L6-lr1e-02")) == [2.0, 31.0, 77.0]
