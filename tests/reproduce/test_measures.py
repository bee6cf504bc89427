"""Model-level measurements (effective rank, eq. 21, depth refinement), the recorder, and the summary tables."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pdelightning.analysis.stability import eq21_number
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning_reproduce.measures import effective_rank, eq21_coefficient, eq21_per_step, refined
from pdelightning_reproduce.recorder import RunRecorder, load_model, save_model
from pdelightning_reproduce.summary import Results, Row, merge, read_summary, rows_from, write_rows


def test_effective_rank_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 12, 6, generator=g)
    h[1] = torch.randn(12, 1, generator=g) * torch.randn(1, 6, generator=g)  # rank one: all tokens on a line
    got = effective_rank(h)
    for i in range(3):
        x = h[i].double().numpy()
        s = np.linalg.svd(x - x.mean(0), compute_uv=False)
        s = s[s > 1e-12 * s.max()]
        p = s / s.sum()
        assert float(got[i]) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert float(got[1]) == pytest.approx(1.0, abs=1e-6)
    pad = torch.tensor([[False] * 10 + [True] * 2])
    assert float(effective_rank(h[:1], pad)[0]) == pytest.approx(float(effective_rank(h[:1, :10])[0]))
    assert float(effective_rank(torch.ones(1, 5, 4))[0]) == 0.0  # every token equal


def test_effective_rank_of_padded_batches_equals_each_sample_alone() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 9, 5, generator=g, dtype=torch.float64)
    lengths = [9, 7, 2, 1, 0, 5]
    pad = torch.arange(9)[None, :] >= torch.tensor(lengths)[:, None]
    h[pad] = 1e3  # padded rows hold garbage: it must not matter
    got = effective_rank(h, pad)
    for i, n in enumerate(lengths):
        want = float(effective_rank(h[i : i + 1, :n])[0]) if n >= 2 else 0.0
        assert float(got[i]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="padding_mask"):
        effective_rank(h, pad[:, :4])


def test_eq21_per_step_uses_the_exact_spectral_norm() -> None:
    torch.manual_seed(0)
    model = PDEClassifier(num_classes=3, d_model=16, n_layers=2, n_heads=2, d_ff=8, image_size=8, dt=0.3)
    got = eq21_per_step(model)
    for i, blk in enumerate(model.blocks):
        w = float(torch.linalg.matrix_norm(blk.attn.out_proj.weight.detach(), 2))
        ref = eq21_number(blk.diffusion_coefficients().detach(), float(blk.alpha.detach()), 0.3, 1.0, w)
        assert got[f"blocks.{i}"] == pytest.approx(ref, rel=1e-5)
    assert eq21_coefficient(model) * 0.3 == pytest.approx(max(got.values()), rel=1e-6)
    with pytest.raises(ValueError, match="PDEClassifier"):
        eq21_coefficient(TransformerClassifier(num_classes=3, d_model=16, n_layers=1, n_heads=2, image_size=8))


def test_refined_model_is_a_finer_euler_discretisation() -> None:
    torch.manual_seed(0)
    model = PDEClassifier(
        num_classes=4, d_model=16, n_layers=3, n_heads=2, d_ff=8, image_size=8, dt=0.05, bottleneck_dim=None
    ).eval()
    x = torch.rand(5, 8, 8)
    fine = refined(model, 2)
    assert len(fine.blocks) == 6 and all(b.dt == pytest.approx(0.025) for b in fine.blocks)
    assert torch.equal(fine.blocks[2].attn.in_proj.weight, model.blocks[1].attn.in_proj.weight)
    assert torch.allclose(refined(model, 1)(x), model(x))
    with torch.no_grad():
        z, z2, z4 = model(x), fine(x), refined(model, 4)(x)
    d2, d4 = float((z2 - z).norm() / z.norm()), float((z4 - z).norm() / z.norm())
    assert 0 < d2 < 0.05 and d4 > d2  # explicit Euler: a first-order change that grows toward the limit
    with pytest.raises(ValueError, match="no PDE steps"):
        refined(TransformerClassifier(num_classes=3, d_model=16, n_layers=1, n_heads=2, image_size=8))


def test_recorder_flags_the_first_divergent_step_and_stops(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path, (0,), "x.Y", {}, divergence_loss=23.0, check_every_n_steps=3)
    trainer = SimpleNamespace(should_stop=False)
    rec._buffer = [(1, torch.tensor(2.0)), (2, torch.tensor(30.0)), (3, torch.tensor(float("nan")))]
    rec._check(trainer)  # type: ignore[arg-type]
    assert rec.record["divergence_step"] == 2 and rec.record["first_nonfinite_step"] == 3
    assert rec.record["max_train_loss"] == 30.0 and trainer.should_stop and rec.record["stop_reason"] == "diverged"


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    args = {"num_classes": 3, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 8, "image_size": 8, "dt": 0.2}
    model = PDEClassifier(**args)
    save_model(tmp_path / "s.pt", model, 7, 1, "pdelightning.models.PDEClassifier", args)
    back, payload = load_model(tmp_path / "s.pt")
    x = torch.rand(2, 8, 8)
    assert payload["step"] == 7 and torch.equal(back(x), model.eval()(x))


def test_summary_round_trip_merge_and_results(tmp_path: Path) -> None:
    rows = rows_from("mnist_pde", "", 1, 100, "final", {"erank": {"blocks.0": 3.5, "embedding": 4.0}, "test_acc": 0.9})
    rows.append(Row("mnist_pde", "", 1, 0, "init", "erank", "blocks.0", float("nan")))
    write_rows(tmp_path / "a" / "summary.csv", rows)
    write_rows(tmp_path / "b" / "summary.csv", [Row("mnist_pde", "", 2, 90, "final", "test_acc", "", 0.8)])
    (tmp_path / "a" / "run.json").write_text('{"setting": "mnist_pde", "cell": "", "seed": 1, "status": "complete"}')
    n, n_runs = merge(tmp_path, tmp_path / "out")
    assert (n, n_runs) == (5, 1)
    df = read_summary(tmp_path / "out")
    assert len(df) == 5 and math.isnan(df[df["stage"] == "init"]["value"].iloc[0])
    res = Results.load(tmp_path / "out")
    assert res.per_seed("mnist_pde", "test_acc") == {1: 0.9, 2: 0.8}
    assert res.layers("mnist_pde", "erank") == ["embedding", "blocks.0"]
    assert list(res.run_rows("mnist_pde")["status"]) == ["complete"]
    assert isinstance(res.table("mnist_pde", "erank"), pd.DataFrame)
