"""InformationFlow: the CKA / correlation math against known answers, and the callback end to end."""

from __future__ import annotations

import itertools
import math

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.loggers import TensorBoardLogger
from scipy import stats
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.analysis.cka import cka_matrix, gram_linear, hsic_biased, hsic_unbiased, linear_cka
from pdelightning.analysis.representation import padding_mask_from_inputs, pool_tokens
from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.information_flow import InformationFlow, consecutive_correlations, layer_correlation
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning.task import ClassificationTask
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events

PREFIX = "analysis/information_flow"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- CKA and HSIC ----------------------------------------------------------------------------------------
def _hsic_u_statistic(K: Tensor, L: Tensor) -> float:
    """Song et al. (2012) HSIC_1 by its definition: the U-statistic over ordered distinct 4-tuples."""
    K, L = K.double().tolist(), L.double().tolist()
    n = len(K)
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += K[i][j] * L[i][j] + K[i][j] * L[q][r] - 2 * K[i][j] * L[i][q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def _hsic_closed_form_loops(K: Tensor, L: Tensor) -> float:
    """The closed form of Song et al. (2012, eq. 5), written with plain loops over entries."""
    K, L = K.double().tolist(), L.double().tolist()
    n = len(K)
    Kt = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    Lt = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    trace = sum(Kt[i][j] * Lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, Kt))
    sum_l = sum(map(sum, Lt))
    one_kl_one = sum(Kt[i][j] * Lt[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * one_kl_one) / (n * (n - 3))


def test_hsic_unbiased_matches_u_statistic_and_loop_formula():
    g = _gen(1)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 5, generator=g)
    y = y + x[:, :1]  # dependent, so the value is not ≈ 0
    K, L_ = gram_linear(x), gram_linear(y)
    got = float(hsic_unbiased(K, L_))
    assert got == pytest.approx(_hsic_u_statistic(K, L_), rel=1e-10)
    assert got == pytest.approx(_hsic_closed_form_loops(K, L_), rel=1e-10)
    # a non-linear (RBF) kernel too: the estimator is kernel-agnostic
    rbf = torch.exp(-(torch.cdist(x.double(), x.double()) ** 2))
    assert float(hsic_unbiased(rbf, L_)) == pytest.approx(_hsic_u_statistic(rbf, L_), rel=1e-10)


def test_hsic_biased_matches_centering_matrix():
    g = _gen(2)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64)
    K, L_ = x @ x.T, y @ y.T
    H = torch.eye(9, dtype=torch.float64) - 1.0 / 9
    assert float(hsic_biased(K, L_)) == pytest.approx(float(torch.trace(K @ H @ L_ @ H)) / 64, rel=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_identity_orthogonal_and_scaling_invariance(unbiased: bool):
    g = _gen(3)
    x = torch.randn(50, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert float(linear_cka(x, x, unbiased)) == pytest.approx(1.0, abs=1e-6)
    assert float(linear_cka(x, x @ q, unbiased)) == pytest.approx(1.0, abs=1e-5)
    assert float(linear_cka(x, -3.7 * x, unbiased)) == pytest.approx(1.0, abs=1e-6)
    y = torch.randn(50, 6, generator=g)
    base = float(linear_cka(x, y, unbiased))
    assert float(
        linear_cka(2.5 * x @ q, y @ torch.linalg.qr(torch.randn(6, 6, generator=g))[0], unbiased)
    ) == pytest.approx(base, abs=1e-5)
    # not invariant to a general (non-orthogonal) linear map: CKA is not just a rank test
    skew = torch.diag(torch.logspace(0, 3, 12))
    assert float(linear_cka(x, x @ skew, unbiased)) < 0.99


def test_cka_of_independent_representations_unbiased_near_zero_biased_not():
    g = _gen(4)
    unb, bia = [], []
    for _ in range(5):
        x, y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
        unb.append(float(linear_cka(x, y)))
        bia.append(float(linear_cka(x, y, unbiased=False)))
    assert max(abs(v) for v in unb) < 0.06
    assert min(bia) > 0.5  # the biased estimator's known inflation when features outnumber samples


def test_cka_matrix_matches_pairwise_and_dtype():
    g = _gen(5)
    xs = [torch.randn(20, p, generator=g) for p in (5, 7, 3)]
    xs.append(xs[0] @ torch.randn(5, 5, generator=g))
    for unbiased in (True, False):
        m = cka_matrix(xs, unbiased=unbiased)
        ref = torch.tensor([[float(linear_cka(a, b, unbiased)) for b in xs] for a in xs])
        torch.testing.assert_close(m, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(m.diagonal(), torch.ones(4), atol=1e-6, rtol=0)
        torch.testing.assert_close(m, m.T)
        rect = cka_matrix(xs[:2], xs[1:], unbiased=unbiased)
        assert rect.shape == (2, 3)
        torch.testing.assert_close(rect, ref[:2, 1:], atol=1e-6, rtol=0)
    assert m.dtype == torch.float32
    assert linear_cka(xs[0].double(), xs[1].double()).dtype == torch.float64


def test_cka_errors_and_constant_representation():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(x, x)
    assert float(linear_cka(x, x, unbiased=False)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="same n samples"):
        cka_matrix([torch.randn(5, 2), torch.randn(6, 2)])
    with pytest.raises(ValueError, match="at least one"):
        cka_matrix([])
    assert math.isnan(float(linear_cka(torch.ones(8, 3), torch.randn(8, 3))))


# ---- pooling and correlations ----------------------------------------------------------------------------
def test_padding_mask_and_masked_mean_pooling():
    x = torch.tensor([[4, 2, 7, 0, 0], [1, 0, 0, 0, 0]])
    mask = padding_mask_from_inputs(x)
    assert mask.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert padding_mask_from_inputs(x, pad_id=7)[0].tolist() == [False, False, True, False, False]
    assert padding_mask_from_inputs(torch.rand(2, 5)) is None
    h = torch.randn(2, 5, 3)
    pooled = pool_tokens(h, mask)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], h[1, 0])
    flat = pool_tokens(h, mask, "flatten")
    assert flat.shape == (2, 15)
    torch.testing.assert_close(flat[0, :9], h[0, :3].flatten())
    assert flat[0, 9:].abs().sum() == 0
    torch.testing.assert_close(pool_tokens(h, None), h.mean(1))
    torch.testing.assert_close(
        pool_tokens(h, torch.zeros(2, 4, dtype=torch.bool)), h.mean(1)
    )  # shape mismatch: ignored
    with pytest.raises(ValueError, match="pooling='max' is not one of"):
        pool_tokens(h, None, "max")  # type: ignore[arg-type]


def test_correlations_known_answers():
    g = _gen(6)
    a = torch.randn(10, 6, generator=g)
    assert float(layer_correlation(a, a)) == pytest.approx(1.0)
    assert [float(c) for c in consecutive_correlations([a, a, a])] == pytest.approx([1.0, 1.0])
    assert consecutive_correlations([a, torch.randn(10, 4)]) == [None]
    # against scipy, flattened
    b = a + 0.5 * torch.randn(10, 6, generator=g)
    assert float(layer_correlation(a, b)) == pytest.approx(stats.pearsonr(a.flatten(), b.flatten())[0], abs=1e-6)
    assert float(layer_correlation(a, b, "spearman")) == pytest.approx(
        stats.spearmanr(a.flatten(), b.flatten())[0], abs=1e-6
    )
    # per sample: mean over rows of the correlation across features
    per_row = np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(10)])
    assert float(layer_correlation(a, b, mode="per_sample")) == pytest.approx(per_row, abs=1e-6)
    # a monotone non-linear map: Spearman is 1, Pearson is not
    e = torch.exp(3 * a)
    assert float(layer_correlation(a, e, "spearman")) == pytest.approx(1.0, abs=1e-6)
    assert float(layer_correlation(a, e, "pearson")) < 0.9
    with pytest.raises(ValueError, match="same shape"):
        layer_correlation(a, a[:, :3])
    with pytest.raises(ValueError, match="mode='rows' is not one of"):
        layer_correlation(a, a, mode="rows")  # type: ignore[arg-type]


# ---- the callback: arguments --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pooling": "max"}, r"pooling='max' is not one of \('mean', 'flatten'\)"),
        ({"correlation": "rows"}, r"correlation='rows' is not one of \('flattened', 'per_sample'\)"),
        ({"reference": torch.nn.Linear(2, 2), "reference_checkpoint": "x.ckpt"}, "not both"),
        ({"reference": "model"}, "must be an nn.Module"),
        ({"reference_class": "pdelightning.task.ClassificationTask"}, "only used with reference_checkpoint"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "pdelightning.task.Nope"}, "cannot be imported"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "torch.nn.Linear"}, "not a LightningModule"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "Task"}, "dotted path"),
        ({"heatmap_samples": 0}, "heatmap_samples=0 must be at least 1"),
        ({"probe_size": 3}, "unbiased CKA needs at least 4"),
        ({"every_n_epochs": 0}, "every_n_epochs=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InformationFlow(**kwargs)


def test_layout_groups_per_layer_curves():
    charts = InformationFlow().layout()
    assert charts["consecutive-layer correlation"] == [rf"{PREFIX}/consecutive_corr/.*"]
    assert "CKA vs reference" not in charts
    assert "Spearman vs reference" in InformationFlow(reference=torch.nn.Linear(2, 2)).layout()


# ---- the callback end to end ----------------------------------------------------------------------------
def _fit(module, callback, tmp_path, loaders=None, **trainer_kw):
    train, val = loaders or image_loaders(n=48, batch_size=16)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **trainer_kw,
    )
    trainer.fit(module, train, val)
    return trainer, read_events(tmp_path)


def test_missing_reference_checkpoint_is_named(tmp_path):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=r"reference_checkpoint='.*missing\.ckpt' does not exist"):
        _fit(our_task("transformer"), InformationFlow(reference_checkpoint=str(missing), probe_size=16), tmp_path)


def _values(acc, tag: str) -> list[float]:
    return [e.value for e in acc.Scalars(tag)]


def _assert_keys(acc, quantities: list[str], layers: list[str]) -> None:
    tags = set(acc.Tags()["scalars"])
    for q in quantities:
        for layer in layers:
            tag = f"{PREFIX}/{q}/{layer}"
            assert tag in tags, f"{tag} missing; have {sorted(t for t in tags if t.startswith(PREFIX))}"
            values = _values(acc, tag)
            assert len(values) == 2 and all(math.isfinite(v) for v in values)  # probe at start + epoch end


@pytest.mark.parametrize(("kind", "ref_kind", "figures"), [("transformer", "pde", True), ("pde", "transformer", False)])
def test_end_to_end_against_the_other_model(tmp_path, kind, ref_kind, figures):
    callback = InformationFlow(
        reference=our_task(ref_kind, n_layers=2), probe_size=32, probe_batch_size=12, figures=figures
    )
    _, acc = _fit(our_task(kind, n_layers=2), callback, tmp_path)
    _assert_keys(acc, ["consecutive_corr", "cka_consecutive"], ["blocks.0", "blocks.1"])
    _assert_keys(
        acc,
        ["pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"],
        ["embedding", "blocks.0", "blocks.1"],
    )
    assert not any("consecutive" in t and t.endswith("/embedding") for t in acc.Tags()["scalars"])
    images = {f"{PREFIX}/heatmaps", f"{PREFIX}/cka_matrix"} if figures else set()
    assert set(acc.Tags()["images"]) == images
    for tag in ("cka_consecutive", "consecutive_corr"):
        assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in _values(acc, f"{PREFIX}/{tag}/blocks.1"))


def test_model_against_itself_is_perfectly_correlated(tmp_path):
    task = our_task("pde", n_layers=2)
    callback = InformationFlow(
        reference=task, correlation="per_sample", probe_size=24, probe_batch_size=24, figures=False
    )
    _, acc = _fit(task, callback, tmp_path)
    for q in ("pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"):
        for layer in ("embedding", "blocks.0", "blocks.1"):
            assert _values(acc, f"{PREFIX}/{q}/{layer}") == pytest.approx([1.0, 1.0], abs=1e-5)
    assert acc.Tags()["images"] == []


def test_stock_encoder_with_globs_and_flatten_pooling(tmp_path):
    callback = InformationFlow(
        reference=our_task("transformer", n_layers=3),
        layers="encoder.layers.*",
        embedding="proj",
        pooling="flatten",
        probe_size=16,
        figures=False,
    )
    _, acc = _fit(StockEncoderModule(n_layers=2), callback, tmp_path)
    layers = ["encoder.layers.0", "encoder.layers.1"]
    _assert_keys(acc, ["consecutive_corr", "cka_consecutive"], layers)
    _assert_keys(acc, ["pearson_vs_reference", "spearman_vs_reference", "cka_vs_reference"], ["embedding", *layers])
    assert not any("/blocks.2" in t for t in acc.Tags()["scalars"])  # i < min(L, L_ref)


def test_model_without_layers_gives_a_clear_error(tmp_path):
    with pytest.raises(TargetNotFoundError, match="MLPModule has no Transformer layers to analyse"):
        _fit(MLPModule(), InformationFlow(probe_size=8), tmp_path)
    with pytest.raises(TargetNotFoundError, match="reference model: MLPModule has no Transformer layers"):
        _fit(our_task("transformer"), InformationFlow(reference=MLPModule(), probe_size=8), tmp_path)


def test_token_inputs_pool_over_valid_tokens_only(tmp_path):
    g = _gen(7)
    n, T = 32, 10
    x = torch.randint(1, 20, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    x[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # padding at the end
    y = torch.arange(n) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    task = our_task("transformer", n_layers=2, input_kind="tokens", vocab_size=20, max_len=T, norm="none")
    callback = InformationFlow(probe_size=n, figures=False)
    _fit(task, callback, tmp_path, loaders=(loader, loader))
    pooled = {}
    task.model.hook_pooled.register_forward_hook(lambda m, a, out: pooled.setdefault("h", out))
    task.eval()
    with torch.no_grad():
        task(x)
    # with norm="none" the model's own pooling (masked mean, padding excluded) is the last layer's pooled state
    torch.testing.assert_close(callback.last_reps["blocks.1"], pooled["h"], atol=1e-5, rtol=1e-5)


def _cli_style_checkpoint(tmp_path) -> tuple[str, ClassificationTask]:
    """A checkpoint as ``pdelightning fit`` writes it: the model's class_path config is in the hparams."""
    init = {"num_classes": 4, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "image_size": 8}
    hparams = {"model": {"class_path": "pdelightning.models.PDEClassifier", "init_args": init}, "num_classes": 4}
    with _given_hyperparameters_context(hparams, "lightning.pytorch.cli.instantiate_module"):
        task = ClassificationTask(PDEClassifier(**init), num_classes=4)
    path = tmp_path / "ref.ckpt"
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    torch.save(checkpoint | {"pytorch-lightning_version": L.__version__}, path)
    return str(path), task


def test_reference_from_checkpoint(tmp_path):
    path, saved = _cli_style_checkpoint(tmp_path)
    callback = InformationFlow(
        reference_checkpoint=path, reference_class="pdelightning.task.ClassificationTask", probe_size=16, figures=False
    )
    _, acc = _fit(our_task("transformer", n_layers=2), callback, tmp_path / "run")
    assert isinstance(callback.reference, ClassificationTask)
    assert isinstance(callback.reference.model, PDEClassifier)
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(callback.reference.state_dict()[name], value)  # the reference was not trained
    _assert_keys(acc, ["pearson_vs_reference", "cka_vs_reference"], ["embedding", "blocks.0", "blocks.1"])


def _picklable_task(cls: type) -> ClassificationTask:  # our_task's optimizer lambda cannot cross ddp_spawn
    return ClassificationTask(
        cls(num_classes=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, image_size=8, bottleneck_dim=None), num_classes=4
    )


def _ddp_run(tmp_path, strategy_kw):
    torch.manual_seed(0)
    task, ref = _picklable_task(TransformerClassifier), _picklable_task(PDEClassifier)
    callback = InformationFlow(reference=ref, probe_size=30, probe_batch_size=8, figures=False)
    _, acc = _fit(task, callback, tmp_path, accelerator="cpu", **strategy_kw)
    return {t: acc.Scalars(t)[0].value for t in acc.Tags()["scalars"] if t.startswith(PREFIX)}


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_gives_the_one_process_values(tmp_path):
    one = _ddp_run(tmp_path / "one", {"devices": 1})
    two = _ddp_run(tmp_path / "two", {"devices": 2, "strategy": "ddp_spawn"})
    assert one.keys() == two.keys() and one
    for k in one:  # step 0 (before any training step): same weights, same probe set
        assert two[k] == pytest.approx(one[k], abs=1e-5), k


def test_measure_keys_and_too_few_samples_for_cka():
    g = _gen(8)
    x = torch.randn(12, 4, generator=g)
    reps = {"embedding": x, "blocks.0": 2 * x, "reference/embedding": x, "reference/blocks.0": torch.exp(x)}
    scalars, matrix, cross = InformationFlow().measure(reps)
    assert float(scalars[f"{PREFIX}/consecutive_corr/blocks.0"]) == pytest.approx(1.0)
    assert float(scalars[f"{PREFIX}/cka_consecutive/blocks.0"]) == pytest.approx(1.0, abs=1e-6)
    assert float(scalars[f"{PREFIX}/spearman_vs_reference/blocks.0"]) == pytest.approx(1.0, abs=1e-6)
    assert float(scalars[f"{PREFIX}/pearson_vs_reference/blocks.0"]) < 0.95
    assert matrix.shape == (2, 2) and cross.shape == (2, 2)
    few = {k: v[:3] for k, v in reps.items()}  # a probe set smaller than 4: correlations only
    scalars, matrix, cross = InformationFlow().measure(few)
    assert matrix is None and cross is None
    assert not any("cka" in k for k in scalars) and f"{PREFIX}/pearson_vs_reference/blocks.0" in scalars
