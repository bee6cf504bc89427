"""What a person sees in TensorBoard: a layout built only from logged tags, no NaN, detail/ for secondary numbers,
ε tags in numeric order, real hp_metric, and a quickstart whose every analysis curve has >= 15 points.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as L
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.plugins.custom_scalar import layout_pb2

from pdelightning._hparams import final_metrics, log_final_hparams
from pdelightning.analysis.perturbation import eps_tags
from pdelightning.callbacks import (
    AttentionRollout,
    AttentionSimilarity,
    GradientFlow,
    InformationFlow,
    JacobianStability,
    LayerMutualInformation,
    PDEFit,
    PerturbationEval,
    StabilityMonitor,
)
from pdelightning.callbacks._layout import build_layout, finite_only, quantity_chart
from pdelightning.callbacks.base import ProbeCallback
from pdelightning.cli import build_cli
from tests.helpers.configs import CONFIGS
from tests.helpers.models import image_loaders, our_task
from tests.helpers.tb import read_events

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"every_n_steps": 2, "probe_size": 16, "probe_batch_size": 8}


# ---- the layout, pure ---------------------------------------------------------------------------------------------
def test_layout_keeps_only_charts_and_regexes_that_match_logged_tags() -> None:
    proposed = {
        "stability_monitor": {
            "eq. (21)": [r"^analysis/stability_monitor/eq21/[^/]+$"],  # a non-PDE model logs no eq21
            "drift": [r"^analysis/stability_monitor/drift/[^/]+$", r"^analysis/stability_monitor/nothing$"],
        }
    }
    sm = "analysis/stability_monitor"
    tags = [f"{sm}/drift/blocks.0", f"{sm}/drift/blocks.1", f"{sm}/detail/rms/blocks.0", f"{sm}/lyap", "train/loss"]
    layout = build_layout(proposed, tags)
    assert layout == {
        "analysis/stability_monitor": {
            "drift": ["Multiline", [r"^analysis/stability_monitor/drift/[^/]+$"]],
            "lyap": ["Multiline", [r"^analysis/stability_monitor/lyap$"]],  # not proposed: charted on its own
        },
        "analysis/stability_monitor/detail": {"rms": ["Multiline", [r"^analysis/stability_monitor/detail/rms/[^/]+$"]]},
    }
    assert build_layout(proposed, ["train/loss"]) == {}
    assert quantity_chart("analysis/x/loss/eps_0.1", "x") == ("loss", r"^analysis/x/loss/[^/]+$", False)


def test_undefined_values_are_left_out_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    said: set[str] = set()
    metrics = {"analysis/a/cos/blocks.0": 0.5, "analysis/a/skill/blocks.0": math.nan, "analysis/a/skill/mean": math.inf}
    with caplog.at_level("INFO"):
        assert finite_only(metrics, said, "A", {"skill": "the null leaves no room"}) == {"analysis/a/cos/blocks.0": 0.5}
        finite_only(metrics, said, "A", {})
    lines = [r.getMessage() for r in caplog.records if "undefined" in r.getMessage()]
    assert lines == [
        "A: skill is undefined (2 tag(s), e.g. analysis/a/skill/blocks.0) and not logged while it is: "
        "the null leaves no room"
    ]


def test_eps_tags_sort_as_numbers() -> None:
    grid = [10 ** (k / 2) for k in range(-8, 3)]  # 1e-4 ... 10, half a decade apart (the default grid)
    tags = eps_tags(grid)
    assert sorted(tags) == tags and len(set(tags)) == len(tags)
    assert tags[0] == "eps_00.0001" and tags[-2:] == ["eps_03.16", "eps_10"]
    assert [float(t[4:]) for t in tags] == pytest.approx(grid, rel=2e-3)  # each reads back as its ε (3 digits)


def test_hp_metric_is_the_final_val_accuracy(tmp_path: Path) -> None:
    assert final_metrics({"train/loss": 0.3}) == {}
    assert final_metrics({"val/loss": 0.4})["hp_metric"] == 0.4  # no accuracy: the loss

    class Stub:
        is_global_zero, global_step = True, 7
        callback_metrics: ClassVar[dict[str, float]] = {"val/acc": 0.9, "val/loss": 0.25}

    logger = TensorBoardLogger(str(tmp_path), default_hp_metric=False)
    logger.log_hyperparams({"lr": 0.01})  # what Lightning does at the start: nothing written without a metric
    Stub.loggers = [logger]  # type: ignore[attr-defined]
    log_final_hparams(Stub())
    events = read_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("hp_metric")] == [(7, pytest.approx(0.9))]


# ---- a run of all nine -----------------------------------------------------------------------------------------
def _nine() -> list[L.Callback]:
    return [
        AttentionSimilarity(**SMALL, max_samples=8),
        InformationFlow(**SMALL),
        LayerMutualInformation(**SMALL),
        GradientFlow(every_n_steps=2),
        PerturbationEval(**SMALL, max_samples=8),
        StabilityMonitor(**SMALL),
        PDEFit(**SMALL),
        JacobianStability(**SMALL, n_iter=2),
        AttentionRollout(**SMALL),
    ]


@pytest.fixture(scope="module")
def nine_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log_dir = tmp_path_factory.mktemp("nine")
    trainer = L.Trainer(
        max_steps=4,
        logger=TensorBoardLogger(str(log_dir)),
        callbacks=_nine(),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(our_task("transformer"), *image_loaders(n=32))
    return log_dir


def test_every_layout_regex_matches_a_logged_tag(nine_run: Path) -> None:
    events = read_events(nine_run)
    tags = events.Tags()["scalars"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = [(c.title, ch.title, list(ch.multiline.tag)) for c in layout.category for ch in c.chart]
    assert len(charts) > 20
    for category, title, regexes in charts:
        for regex in regexes:
            assert any(re.search(regex, t) for t in tags), (category, title, regex)
    # on this non-PDE model nothing of eq. (21) is logged, so no chart asks for it
    assert not any("eq21" in r and "fitted" not in r for *_, regexes in charts for r in regexes)
    # every analysis tag of the callbacks is on some chart
    analysis = [t for t in tags if t.startswith("analysis/") and not t.startswith("analysis/overhead/")]
    assert all(any(re.search(r, t) for *_, rs in charts for r in rs) for t in analysis)
    # secondary quantities live in their own categories
    detail = {c.title for c in layout.category if c.title.endswith("/detail")}
    assert "analysis/attention_similarity/detail" in detail and "analysis/pde_fit/detail" in detail


def test_no_nan_scalar_in_a_run_of_all_nine(nine_run: Path) -> None:
    events = read_events(nine_run)
    tags = events.Tags()["scalars"]
    assert sum(t.startswith("analysis/") for t in tags) > 100
    bad = [t for t in tags if not all(math.isfinite(e.value) for e in events.Scalars(t))]
    assert bad == []


def test_headline_first_secondary_under_detail(nine_run: Path) -> None:
    tags = set(read_events(nine_run).Tags()["scalars"])
    a = "analysis/attention_similarity"
    assert f"{a}/cosine/blocks.0" in tags and f"{a}/detail/cosine_null_uniform/blocks.0" in tags
    assert not any(t.startswith(f"{a}/cosine_null") or t.startswith(f"{a}/cosine_margin") for t in tags)
    # PDEFit on a Transformer: the sub-model R² up front, the trivially exact full fit under detail/
    assert "analysis/pde_fit/r2_attention/blocks.0" in tags and "analysis/pde_fit/detail/r2/blocks.0" in tags
    assert "analysis/pde_fit/r2/blocks.0" not in tags
    assert {"analysis/perturbation_eval/loss/eps_00.0001", "analysis/perturbation_eval/loss/eps_10"} <= tags


# ---- the quickstart's cadence ------------------------------------------------------------------------------------
def test_quickstart_gives_every_analysis_curve_at_least_15_points() -> None:
    cli = build_cli(["-c", str(CONFIGS / "quickstart.yaml"), "--trainer.logger=false"], run=False)
    trainer, dm = cli.trainer, cli.datamodule
    dm.setup("fit")
    total = trainer.max_epochs * len(dm.train_dataloader())
    assert total == 315  # the README's number
    probes = [c for c in trainer.callbacks if isinstance(c, ProbeCallback)]
    reads = [c for c in trainer.callbacks if isinstance(c, GradientFlow)]
    assert len(probes) == 8 and len(reads) == 1  # the nine
    for c in probes:
        assert c.budget is None and c.every_n_steps  # an explicit demo cadence, no budget
        points = int(c.probe_at_start) + total // c.every_n_steps
        assert points >= 15, (type(c).__name__, points)
    g = reads[0]
    assert g.budget is None and len(range(0, total, g.every_n_steps)) >= 15  # reads at steps 0, n, 2n, ... < total


def test_figure_axes_have_no_offset_notation() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pdelightning.plots.draw import plain_ticks

    def offset_text(plain: bool) -> str:
        fig = Figure()
        ax = fig.subplots()
        ax.plot([0, 1, 2], [1 - 3e-12, 1 - 1e-12, 1.0])  # R² of an exact fit: 1 up to rounding
        if plain:
            plain_ticks(fig)
        FigureCanvasAgg(fig).draw()
        return ax.yaxis.get_offset_text().get_text()

    assert offset_text(plain=False) != ""  # matplotlib's default: "+1" / "1e-12+1" above the axis
    assert offset_text(plain=True) == ""


def test_a_later_run_in_the_same_process_gets_only_its_own_charts(tmp_path: Path) -> None:
    from pdelightning.callbacks._scalars import write_layout

    def run(directory: Path, name: str) -> list[str]:
        logger = TensorBoardLogger(str(directory))

        class Stub:
            is_global_zero, loggers = True, [logger]

        write_layout(Stub(), name, {"q": [rf"^analysis/{name}/q/[^/]+$"]}, [f"analysis/{name}/q/blocks.0"])
        logger.experiment.flush()
        layout = layout_pb2.Layout()
        layout.ParseFromString(
            read_events(directory).Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
        )
        return [c.title for c in layout.category]

    assert run(tmp_path / "one", "a") == ["analysis/a"]
    assert run(tmp_path / "two", "b") == ["analysis/b"]  # nothing of the first run's writer carried over
