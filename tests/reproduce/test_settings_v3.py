"""The v3 design: the paper's PDE variants beside ours, Δt cells around the main model's, lr-matched ablations,
5 seeds in every cell, and 20 Newsgroups main runs stopped by a plateau criterion.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from pdelightning.cli import build_cli
from pdelightning.models import DiffusionPDEClassifier, LinearPDEClassifier, PDEClassifier
from pdelightning_reproduce.budget import CPU, V3, budget
from pdelightning_reproduce.settings import (
    DT_GRID,
    MAIN_PDE_DT,
    SETTINGS,
    Plan,
    RunSpec,
    cells_by_lr,
    setting,
    settings_for,
)
from pdelightning_reproduce.train import fit_args
from tests.test_cli import fake_mnist, fake_newsgroups

VARIANTS = {
    "mnist_pde_diffusion": (DiffusionPDEClassifier, {}),
    "newsgroups_pde_linear_relu": (LinearPDEClassifier, {"activation": "relu"}),
    "newsgroups_pde_linear": (LinearPDEClassifier, {"activation": "none"}),
}


def _config(name: str) -> dict:
    return yaml.safe_load(setting(name).config_path.read_text())


def test_each_experiment_compares_the_papers_variant_and_our_full_pde() -> None:
    for section, variant in (
        ("table2", "§3.1"),
        ("table3", "§3.1"),
        ("attention", "§3.1"),
        ("bottleneck", "§3.3"),
        ("gradients", "§3.4"),
    ):
        rows = settings_for(section)
        assert variant in {s.paper_variant for s in rows}, section
        assert any(s.label.startswith("full PDE") and not s.paper_variant for s in rows), section
        assert any(s.name.endswith("transformer") for s in rows), section
    assert {s.name for s in SETTINGS if s.paper_variant} == set(VARIANTS)


def test_main_pde_dt_is_the_configs_and_the_dt_cells_set_it() -> None:
    dt = _config("mnist_pde")["model"]["model"]["init_args"]["dt"]
    assert dt == MAIN_PDE_DT and MAIN_PDE_DT in DT_GRID and max(DT_GRID) == 1.0
    for name in ("sweep_pde", "sweep_pde_stabilized"):
        cells = setting(name).cells
        assert [c.dt for c in cells] == list(DT_GRID) and all(c.eq21_target is None for c in cells)
        spec = RunSpec(name, "dt0.1", 0)
        args = fit_args(spec, Path("o"), Path("d"), False, [])
        assert "--model.model.init_args.dt=0.1" in args and spec.get_cell().dt == 0.1


def test_baseline_and_no_layernorm_are_matched_lr_by_lr() -> None:
    base, ablated = cells_by_lr("sweep_transformer"), cells_by_lr("sweep_no_layernorm")
    assert list(base) == [1e-3, 3e-3, 1e-2] and base.keys() == ablated.keys()
    for lr in base:
        assert [(c.depth, c.lr, c.name) for c in base[lr]] == [(c.depth, c.lr, c.name) for c in ablated[lr]]
    with pytest.raises(KeyError, match="no learning-rate cells"):
        cells_by_lr("sweep_pde")


@pytest.mark.parametrize("b", ["full", "v3"])
def test_five_seeds_in_every_cell(b: str) -> None:
    bud = budget(b)
    plan = Plan(seeds=bud.main_seeds, sweep_seeds=bud.sweep_seeds, cells=dict(bud.cells), budget=b)
    count = Counter((r.setting, r.cell) for r in plan.runs())
    assert set(count) == {(s.name, c.name) for s in SETTINGS for c in s.cells}
    assert min(count.values()) >= 5
    assert {p.pair for p in plan.pairs()} >= {"pde_diffusion_vs_transformer"}


def test_v3_budget_cuts_only_the_sweeps() -> None:
    assert all(V3.cut_for(s.name) for s in SETTINGS) and all(CPU.cut_for(s.name) for s in SETTINGS)
    for s in SETTINGS:
        args = fit_args(RunSpec(s.name, s.cells[0].name, 0), Path("o"), Path("d"), False, [], budget_name="v3")
        assert ("--trainer.max_steps=100" in args) == (s.role == "sweep")
        assert not any("subset" in a or "max_len" in a for a in args)


def test_newsgroups_main_runs_stop_at_a_plateau_of_the_validation_loss() -> None:
    for s in SETTINGS:
        if s.role != "main":
            continue
        cfg = _config(s.name)
        stops = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
        assert len(stops) == 1, s.name  # the recorder's plateau_met reads it
        if s.data == "newsgroups":
            args = stops[0]["init_args"]
            assert (args["monitor"], args["mode"], args["patience"], args["min_delta"]) == ("val/loss", "min", 2, 0.01)
            assert cfg["trainer"]["max_epochs"] == 30 and "train_subset" not in cfg["data"]["init_args"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_configs_build_and_fit_with_lightning_cli(name: str, tmp_path: Path) -> None:
    cls, expected = VARIANTS[name]
    args = [
        "fit",
        "-c",
        str(setting(name).config_path),
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    if setting(name).data == "mnist":
        args.append(f"--data.init_args.data_dir={fake_mnist(tmp_path / 'mnist')}")
    else:
        args += [
            f"--data.init_args.data_dir={fake_newsgroups(tmp_path / 'news')}",
            "--data.init_args.max_len=24",
            "--data.init_args.vocab_size=64",
        ]
    cli = build_cli(args)
    assert cli.trainer.state.finished
    model = cli.model.model
    assert type(model) is cls and not isinstance(model, PDEClassifier)
    assert model.num_classes == cli.datamodule.num_classes and len(model.blocks) == (
        10 if cls is DiffusionPDEClassifier else 4
    )
    for key, value in expected.items():
        assert getattr(model.blocks[0], key) == value


def test_variants_train_and_analyse_through_the_pipeline(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from pdelightning_reproduce.analyze import analyze_run
    from pdelightning_reproduce.divergence import divergence_of_record
    from pdelightning_reproduce.pairs import analyze_pair
    from pdelightning_reproduce.settings import PairSpec
    from pdelightning_reproduce.train import train_run

    mnist, out = fake_mnist(tmp_path / "mnist", n_train=64, n_test=16), tmp_path / "runs"
    for name in ("mnist_pde_diffusion", "mnist_transformer"):
        meta = train_run(RunSpec(name, "", 0 if name == "mnist_pde_diffusion" else 1), out, mnist, quick=True)
        assert meta["status"] == "complete", meta.get("error")
    record = json.loads((RunSpec("mnist_pde_diffusion", "", 0).path(out) / "run.json").read_text())
    assert len(record["losses"]) == record["final_step"] == record["loss_steps"][-1]
    assert divergence_of_record(record).status == "trained"
    assert analyze_run(RunSpec("mnist_pde_diffusion", "", 0), out) > 0
    rows = pd.read_csv(RunSpec("mnist_pde_diffusion", "", 0).path(out) / "summary.csv")
    assert not rows["quantity"].str.startswith("analysis_error").any()
    assert {"consecutive_corr", "probe_acc", "test_acc"} <= set(rows["quantity"])
    assert analyze_pair(PairSpec("pde_diffusion_vs_transformer", 0, 1), out) > 0


@pytest.mark.slow
def test_newsgroups_variant_trains_and_analyses(tmp_path: Path) -> None:
    import pandas as pd

    from pdelightning_reproduce.analyze import analyze_run
    from pdelightning_reproduce.train import train_run

    spec, out = RunSpec("newsgroups_pde_linear_relu", "", 0), tmp_path / "runs"
    meta = train_run(spec, out, fake_newsgroups(tmp_path / "news", per_group=12), quick=True)
    assert meta["status"] == "complete" and meta["model_class"].endswith("LinearPDEClassifier"), meta.get("error")
    assert analyze_run(spec, out) > 0
    rows = pd.read_csv(spec.path(out) / "summary.csv")
    assert not rows["quantity"].str.startswith("analysis_error").any()
    assert {"I_TY", "grad_norm", "loss"} <= set(rows["quantity"])
    # (repro-integrate) the IB rules' bounds (pdelightning_reproduce.ib) and training's divergence verdict
    assert {"I_TY_lower", "I_TY_lower_lcb", "I_TY_lower_ucb", "I_TY_head", "I_TY_head_calibrated"} <= set(
        rows["quantity"]
    )
    assert meta["training_divergence"] in ("trained", "undecided") and "under_trained" in meta


def test_the_v3_cut_of_a_main_setting_names_its_configs_epoch_cap() -> None:
    """The sentence each run records (``cuts``) and the report prints says the cap the config trains under (it said
    10 epochs for the MNIST mains after their configs moved to 30): the budget's sentence, and every v3 main run in the
    committed run table."""
    import pandas as pd

    caps = {s.name: _config(s.name)["trainer"]["max_epochs"] for s in SETTINGS if s.role == "main"}
    for name, cap in caps.items():
        assert V3.cut_for(name).endswith(f", {cap} epochs at most)"), name
    runs = pd.read_csv(Path(__file__).resolve().parents[2] / "docs" / "reproduction" / "runs.csv")
    v3_mains = runs[(runs["budget"] == "v3") & runs["setting"].isin(list(caps))]
    assert len(v3_mains) >= 20
    for row in v3_mains.itertuples():
        assert row.cuts.endswith(f", {caps[row.setting]} epochs at most)"), (row.setting, row.seed, row.cuts)
