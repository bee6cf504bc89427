"""``pdelightning report`` on hand-made TensorBoard logs with a known pattern of values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from pdelightning.reproduce import paper
from pdelightning.reproduce.report import MAX_FIGURE_BYTES, SETTINGS, main, parse_eps_label, write_report

IF = "analysis/information_flow"
AS = "analysis/attention_similarity"
MI = "analysis/layer_mutual_information"
GF = "analysis/gradient_flow"
PE = "analysis/perturbation_eval"
SM = "analysis/stability_monitor"
END = 100  # the last logged step of every run


def write_run(
    root: Path, setting: str, seed: int, scalars: dict, completed: bool | None = True, device: str = "cpu"
) -> Path:
    """``scalars``: ``{tag: value at the end}`` (also logged at step 0 as ``init``) or ``{tag: [(step, v), ...]}``."""
    run_dir = root / setting / f"seed{seed}"
    writer = SummaryWriter(log_dir=str(run_dir))
    for tag, value in scalars.items():
        points = value if isinstance(value, list) else [(0, 0.5), (END, value)]
        for step, v in points:
            writer.add_scalar(tag, v, step)
    writer.close()
    if completed is not None:
        meta = {
            "setting": setting,
            "seed": seed,
            "config": f"configs/{setting}.yaml",
            "overrides": ["--trainer.max_epochs=2"],
            "device": device,
            "wall_s": 12.5,
            "completed": completed,
            "global_step": END,
            "max_epochs": 2,
            "train_subset": 1000,
            "data": "synthetic",
            "notes": f"{setting}: 2 epochs instead of the paper's",
        }
        (run_dir / "run.json").write_text(json.dumps(meta))
    return run_dir


def write_image(run_dir: Path, tag: str, image: np.ndarray, step: int) -> None:
    writer = SummaryWriter(log_dir=str(run_dir))
    writer.add_image(tag, image, step)
    writer.close()


def f32(x: float) -> float:
    """The value as TensorBoard stores it (float32)."""
    return float(np.float32(x))


def mean_std(values: list[float]) -> str:
    v = np.asarray([f32(x) for x in values])
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f} (n={v.size})"


def row(md: str, claim: str) -> list[str]:
    """Cells of the first claim-table row whose claim starts with ``claim``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[0].startswith(claim) and len(cells) == 6:
            return cells
    raise AssertionError(f"no row for {claim!r}")


# ---- the MNIST tree: 2 settings x 3 seeds, mnist_pde seed 2 missing, mnist_transformer seed 1 incomplete ----------
def transformer_scalars(seed: int) -> dict:
    # Table 2 pairs: the paper's values ± 0.01 -> must hold.
    s = {f"{IF}/consecutive_corr/blocks.{i}": paper.TABLE2_TRANSFORMER[i - 1] + 0.01 * (seed - 1) for i in range(1, 10)}
    for i in range(1, 10):
        s[f"{IF}/cka_consecutive/blocks.{i}"] = 0.5 + 0.04 * i + 0.01 * seed
    s["val/acc"] = 0.9 + 0.01 * seed
    s["train/loss"] = 0.3
    return s


def pde_scalars(seed: int) -> dict:
    # Table 2 pairs decreasing and far from the paper -> must not hold.
    s = {f"{IF}/consecutive_corr/blocks.{i}": 0.9 - 0.03 * i + 0.01 * seed for i in range(1, 10)}
    for j in range(10):
        s[f"{IF}/pearson_vs_reference/blocks.{j}"] = 1.0 - 0.12 * j + 0.005 * seed  # 1.0 -> -0.08: holds
        s[f"{IF}/spearman_vs_reference/blocks.{j}"] = 0.9 - 0.002 * seed  # flat: does not hold
        s[f"{IF}/cka_vs_reference/blocks.{j}"] = 0.8 - 0.05 * j + 0.01 * seed
        # attention: high cosine, but the shuffled null is nearly as high -> skill 1/3
        s[f"{AS}/cosine/blocks.{j}"] = 0.99
        s[f"{AS}/cosine_null_uniform/blocks.{j}"] = 0.5
        s[f"{AS}/cosine_null_shuffled/blocks.{j}"] = 0.985
        s[f"{AS}/cosine_null_random_init/blocks.{j}"] = 0.6
        s[f"{AS}/cosine_skill/blocks.{j}"] = (0.99 - 0.985) / (1 - 0.985)
        s[f"{AS}/kl/blocks.{j}"] = 0.01 + 0.002 * seed
        s[f"{AS}/kl_null_shuffled/blocks.{j}"] = 0.012
        s[f"{AS}/kl_skill/blocks.{j}"] = 0.1
    s[f"{AS}/cosine/mean"] = 0.99
    s[f"{AS}/cosine_skill/mean"] = (0.99 - 0.985) / (1 - 0.985)
    s["val/acc"] = 0.8
    return s


@pytest.fixture(scope="module")
def mnist_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1, 2):
        write_run(root, "mnist_transformer", seed, transformer_scalars(seed), completed=seed != 1)
    for seed in (0, 1):
        write_run(root, "mnist_pde", seed, pde_scalars(seed))
    return root


@pytest.fixture(scope="module")
def mnist_report(mnist_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    assert main([str(mnist_tree), "--out", str(out)]) == 0
    md = (out / "REPRODUCTION.md").read_text()
    return out, md


def test_paper_numbers_next_to_our_mean_std(mnist_report: tuple[Path, str]) -> None:
    _, md = mnist_report
    for i in range(1, 10):
        # complete Transformer seeds are 0 and 2 (seed 1 is incomplete); PDE seeds 0 and 1 (seed 2 missing)
        ours_t = mean_std([paper.TABLE2_TRANSFORMER[i - 1] + 0.01 * (s - 1) for s in (0, 2)])
        ours_p = mean_std([0.9 - 0.03 * i + 0.01 * s for s in (0, 1)])
        assert f"| {paper.TABLE2_TRANSFORMER[i - 1]:.4f} | {ours_t} | {paper.TABLE2_PDE[i - 1]:.4f} | {ours_p} |" in md
    for j in range(10):
        ours = mean_std([1.0 - 0.12 * j + 0.005 * s for s in (0, 1)])
        assert f"| {paper.TABLE3_PEARSON[j]:.4f} | {ours} |" in md
    assert f"{paper.ATTENTION_COSINE:.4f}" in md and f"{paper.ATTENTION_KL:.4f}" in md


def test_cka_beside_the_correlations_without_a_verdict(mnist_report: tuple[Path, str]) -> None:
    _, md = mnist_report
    assert "the paper reports no CKA, so there is no verdict" in md
    for i in range(1, 10):
        ours_t = mean_std([0.5 + 0.04 * i + 0.01 * s for s in (0, 2)])  # complete Transformer seeds
        assert f"| {paper.TABLE2_PAIRS[i - 1]} | blocks.{i - 1}→blocks.{i} | {ours_t} | — |" in md
    for j in range(10):
        ours = mean_std([0.8 - 0.05 * j + 0.01 * s for s in (0, 1)])
        assert f"| {ours} |\n" in md.split(f"| {paper.TABLE3_LAYERS[j]} | blocks.{j} |", 1)[1].split("\n", 1)[0] + "\n"


def test_heatmap_image_from_the_event_file(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run_dir = write_run(root, "mnist_pde", 0, pde_scalars(0))
    rng = np.random.default_rng(0)
    for step in (10, END):  # the last one is taken; noise so it does not compress below the size cap
        write_image(run_dir, f"{IF}/heatmaps", rng.random((3, 700, 900)).astype(np.float32), step)
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPRODUCTION.md").read_text()
    assert f"(mnist_pde/seed0, step {END})" in md
    png = tmp_path / "out" / "figures" / "mnist_heatmaps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size <= 200_000


def test_absent_heatmap_image_is_named(mnist_report: tuple[Path, str]) -> None:
    _, md = mnist_report
    assert "*Figure `mnist_heatmaps` skipped: no complete `mnist_pde` run logged the image" in md


def test_verdicts(mnist_report: tuple[Path, str]) -> None:
    _, md = mnist_report
    assert row(md, "Transformer inter-layer correlation")[4] == "holds"
    assert row(md, "PDE inter-layer correlation")[4] == "does not hold"
    assert row(md, "Pearson correlation falls")[4] == "holds"
    assert row(md, "Spearman correlation falls")[4] == "does not hold"
    attention = row(md, "PDE attention matches")
    assert attention[4] == "does not hold"
    assert "no better than the null" in attention[5] and "shuffled" in attention[5]
    assert "Rule: holds if" in attention[5]  # the rule's text is in the why column
    # the 20 Newsgroups and ablation runs are absent: said, not skipped
    for claim in ("Transformer: I(T;Y) declines", "PDE gradients mostly in", "PDE degrades faster", "No LayerNorm"):
        assert row(md, claim)[4].startswith("not comparable: runs missing"), claim


def test_missing_and_incomplete_runs_are_named(mnist_report: tuple[Path, str]) -> None:
    _, md = mnist_report
    runs = md.split("## Runs", 1)[1].split("\n## ", 1)[0]
    missing, incomplete = runs.split("**Incomplete**", 1)
    assert "`mnist_pde` seed 2" in missing
    assert "`mnist_transformer` seed 1" not in missing
    for seed in (0, 1, 2):
        assert f"`newsgroups_pde` seed {seed}" in missing
    assert "`mnist_transformer` seed 1: run.json says completed=false" in incomplete
    assert "| mnist_transformer | 1 | incomplete |" in runs
    assert "| mnist_pde | 2 | missing |" in runs
    assert "mnist_pde: 2 epochs instead of the paper's" in md  # deviations from run.json


def test_compute_line_counts_devices_and_names_gpu_runs(mnist_report: tuple[Path, str], tmp_path: Path) -> None:
    _, md = mnist_report
    assert "**Compute:** 5 run(s) on `cpu`. No run used a GPU." in md
    root = tmp_path / "runs"
    write_run(root, "mnist_transformer", 0, transformer_scalars(0), device="cuda: NVIDIA H100")
    write_run(root, "mnist_pde", 0, pde_scalars(0))
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "REPRODUCTION.md").read_text()
    compute = md.split("**Compute:**", 1)[1].split("\n", 1)[0]
    assert "1 run(s) on `cuda: NVIDIA H100`" in compute and "1 run(s) on `cpu`" in compute
    assert "GPU runs: `cuda: NVIDIA H100`: mnist_transformer/seed0." in md


def test_figures_exist_and_are_small(mnist_report: tuple[Path, str]) -> None:
    out, md = mnist_report
    made = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert made == [
        "ablation_dynamics.png",  # the loss curves of mnist_transformer and mnist_pde
        "attention_cosine_by_layer.png",
        "table2_interlayer_correlation.png",
        "table3_same_layer_correlation.png",
    ]
    for name in made:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) <= MAX_FIGURE_BYTES
        assert f"(figures/{name})" in md
    for skipped in ("information_plane", "gradient_magnitude", "loss_vs_eps", "ablation_drift"):
        assert f"Figure `{skipped}` skipped" in md


def test_single_run_dir(mnist_tree: Path, tmp_path: Path) -> None:
    md = write_report([mnist_tree / "mnist_pde" / "seed0"], tmp_path).read_text()
    assert "| mnist_pde | 0 | complete |" in md
    assert "`mnist_pde` seed 1" in md.split("**Incomplete**")[0]  # not given, so missing
    assert row(md, "Pearson correlation falls")[2].endswith("(n=1)")


# ---- every setting present: each section computes a verdict --------------------------------------------------------
def full_scalars(setting: str, seed: int) -> dict:
    s: dict = {"val/acc": 0.9, "train/loss": [(k, 1.0 / (k + 1)) for k in range(0, END + 1, 10)]}
    steps = range(0, END + 1, 10)
    if setting.startswith("mnist"):
        for j in range(10):
            s[f"{SM}/drift/blocks.{j}"] = (5.0 if "no_residual" in setting else 1.0) * (j + 1) / 10
        grad = 1e3 if setting == "mnist_transformer_no_layernorm" else 1.0
        for j in range(10):
            s[f"{GF}/grad_norm/blocks.{j}"] = [(k, grad * (1 + 0.1 * seed)) for k in steps]
        if setting == "mnist_transformer_no_layernorm":
            s["train/loss"] = [(0, 2.0), (10, float("nan"))]
    if setting.startswith("newsgroups"):
        pde = setting == "newsgroups_pde"
        for j in range(4):
            lo = 3e-3 if pde else 3e-4
            level = lo * (4.0 if pde and j == 0 else 1.0)
            s[f"{GF}/grad_abs_mean/blocks.{j}"] = [(k, level * (1 + 0.01 * seed)) for k in steps]
            peak = 3.0 if pde and j == 0 else 2.0
            end = 0.5 if pde else 1.5
            s[f"{MI}/I_TY/blocks.{j}"] = [(0, 2.0), (50, peak), (END, end)]
            s[f"{MI}/I_XT/blocks.{j}"] = [(0, 6.0), (50, 5.0), (END, 4.0)]
        s[f"{MI}/H_Y"] = 4.3
        s[f"{MI}/log2_N"] = 8.0
        for e in np.logspace(-4, 0, 9):
            label = f"{e:.0e}" if math.isclose(float(f"{e:.0e}"), e) else f"{e:.2e}"
            rise = 1.0 + (50 * e if pde else 2 * e)
            s[f"{PE}/loss/eps={label}"] = 0.5 * rise
        s[f"{PE}/loss_clean"] = 0.5
        s[f"{PE}/critical_eps"] = 1e-2 if pde else float("nan")
    return s


def test_full_tree_every_section(tmp_path: Path) -> None:
    for setting in SETTINGS:
        for seed in (0, 1):
            base = transformer_scalars(seed) if setting == "mnist_transformer" else {}
            base = pde_scalars(seed) if setting == "mnist_pde" else base
            run_dir = write_run(tmp_path / "runs", setting, seed, {**base, **full_scalars(setting, seed)})
            if setting == "mnist_pde":
                write_image(run_dir, f"{IF}/heatmaps", np.full((3, 40, 60), 0.5, dtype=np.float32), END)
    md = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert len(figures) == 9 and "skipped" not in md
    assert all(p.stat().st_size <= MAX_FIGURE_BYTES for p in (tmp_path / "out" / "figures").glob("*.png"))
    expected = {
        "No residual": "holds",  # drift 5x the baseline's
        "No LayerNorm": "holds",  # a non-finite loss and 1000x the gradient norm
        "PDE without stabilizers": "does not hold",  # same gradient norms as the stabilized PDE
        "PDE gradients mostly in": "holds",
        "Transformer gradients mostly in": "holds",
        "PDE gradients higher": "holds",
        "PDE first layer markedly higher": "holds",
        "Transformer: I(T;Y) declines": "holds",
        "PDE: I(T;Y) declines": "holds",
        "PDE I(T;Y) lower": "holds",
        "PDE layer 1 has the sharpest drop": "holds",
        "Both models similar below": "holds",
        "PDE degrades faster": "holds",
        "Divergence near": "holds",
    }
    for claim, verdict in expected.items():
        assert row(md, claim)[4] == verdict, (claim, row(md, claim))
    ib_rows = [line for line in md.splitlines() if line.startswith("| PDE | blocks.")]
    assert len(ib_rows) == 4 and all(line.endswith("| 8.0000 |") for line in ib_rows)  # the I(X;T) ceiling
    assert "I(X;T) over every layer, probe and seed lies in [4.0000, 6.0000] bits" in md
    assert "2.0000 bits under the lowest ceiling log2 N = 8.0000" in md and "cannot show compression" not in md
    why = row(md, "No residual")[5]
    assert "Not part of the rule: final val/acc 0.9000" in why and "(`mnist_transformer_no_residual`) vs" in why
    assert "**Incomplete**: none." in md
    assert "`mnist_pde` seed 2" in md and "`mnist_pde` seed 1" not in md  # seeds 0, 1, 2 are always expected


@pytest.mark.parametrize(
    ("label", "eps"),
    [
        ("1e-04", 1e-4),
        ("eps=3.16e-04", 3.16e-4),
        ("analysis/perturbation_eval/loss/eps=1e+00", 1.0),
        ("analysis/perturbation_eval/acc/eps=2.5e-02", 2.5e-2),
    ],
)
def test_parse_eps_label(label: str, eps: float) -> None:
    assert parse_eps_label(label) == pytest.approx(eps)


def test_parse_eps_label_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="cannot read an epsilon"):
        parse_eps_label("analysis/perturbation_eval/loss_clean")


def test_main_rejects_absent_log_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), "--out", str(tmp_path / "out")])


def test_perturbation_not_comparable_when_neither_model_departs_on_the_grid(tmp_path: Path) -> None:
    for setting in ("newsgroups_transformer", "newsgroups_pde"):
        for seed in (0, 1):
            s = full_scalars(setting, seed)
            s[f"{PE}/critical_eps"] = float("nan")
            write_run(tmp_path / "runs", setting, seed, s)
    md = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    faster = row(md, "PDE degrades faster")
    assert faster[4].startswith("not comparable: neither model's loss departs") and "ε ≤ 1" in faster[4]
    # context: the relative increases at ε = 1 (PDE 50x, Transformer 2x in full_scalars)
    assert "relative loss increase at ε = 1: PDE 50.0000, Transformer 2.0000" in faster[5]
    near = row(md, "Divergence near")
    assert near[4] == "does not hold"
    assert "Relative loss increase at ε = 0.01: PDE 0.5000, Transformer 0.0200" in near[5]


def test_static_ixt_is_called_out(tmp_path: Path) -> None:
    for setting in ("newsgroups_transformer", "newsgroups_pde"):
        s = full_scalars(setting, 0)
        for j in range(4):
            s[f"{MI}/I_XT/blocks.{j}"] = [(0, 7.9), (50, 7.91), (END, 7.92)]
        write_run(tmp_path / "runs", setting, 0, s)
    md = write_report([tmp_path / "runs"], tmp_path / "out").read_text()
    assert "the largest change of one layer's curve over training is 0.0200 bits" in md
    assert "cannot show compression" in md
