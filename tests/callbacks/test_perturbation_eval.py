"""PerturbationEval on our models, a stock encoder and an MLP (its math: tests/analysis/test_perturbation.py)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.perturbation_eval import PerturbationEval, resolve_mode
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning.task import ClassificationTask
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events

K = "analysis/perturbation_eval"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and much faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- fixtures ----------------------------------------------------------------------------------------------------
class Scale(nn.Module):
    """A layer that multiplies its input by ``k`` (``k = 1``: identity)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, u: Tensor) -> Tensor:
        return self.k * u


class ToyModule(StockEncoderModule):
    """Rows of an image -> ``embed`` (Linear) -> ``layers.i`` (Scale) -> mean -> head."""

    def __init__(self, scales: tuple[float, ...] = (1.0,), image_size: int = 8, d: int = 8) -> None:
        L.LightningModule.__init__(self)
        self.embed = nn.Linear(image_size, d)
        self.layers = nn.ModuleList(Scale(k) for k in scales)
        self.head = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        u = self.embed(x)
        for layer in self.layers:
            u = layer(u)
        return self.head(u.mean(1))


class LinearModule(MLPModule):
    """``logits = W x + b`` on flattened images."""

    def __init__(self, image_size: int = 8) -> None:
        L.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 4))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=5e-2)


def token_loaders(n: int = 48, max_len: int = 12, vocab: int = 20, seed: int = 0, pad_to: int | None = None):
    """A tiny token task padded with 0 at the end: the class is the parity of ``(first id, length)``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (n,), generator=g)
    x = torch.zeros(n, pad_to or max_len, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        x[i, :length] = torch.randint(1, vocab, (length,), generator=g)
    y = (x[:, 0] % 2) * 2 + lengths % 2
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16, shuffle=True), DataLoader(ds, batch_size=16)


def token_task(kind: str, max_len: int = 16) -> ClassificationTask:
    """Our tiny Transformer/PDE model on token ids (picklable, for ``ddp_spawn``)."""
    cls = TransformerClassifier if kind == "transformer" else PDEClassifier
    model = cls(
        num_classes=4,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=32,
        input_kind="tokens",
        vocab_size=20,
        max_len=max_len,
        bottleneck_dim=None,
    )
    return ClassificationTask(model, num_classes=4, optimizer=partial(torch.optim.Adam, lr=1e-2))


def trainer(tmp_path: Path | None = None, **kw) -> L.Trainer:
    args = dict(
        max_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path) if tmp_path is not None else False,
    )
    args.update(kw)
    return L.Trainer(**args)


def probe_once(module: L.LightningModule, loaders, tmp_path: Path | None = None, **kw) -> PerturbationEval:
    """Run one probe before the first training step (the model as built) and return the callback."""
    cb = PerturbationEval(every_n_epochs=None, probe_at_start=True, probe_size=kw.pop("probe_size", 32), **kw)
    trainer(tmp_path, callbacks=[cb]).fit(module, *loaders)
    return cb


def test_resolve_mode() -> None:
    ids, img = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 8, 8)
    assert resolve_mode("auto", img) == "input" and resolve_mode("auto", ids) == "embedding"
    assert resolve_mode("embedding", img) == "embedding" and resolve_mode("input", img) == "input"
    with pytest.raises(ValueError, match="mode='embedding'"):
        resolve_mode("input", ids)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(epsilons=[]), "epsilons is empty"),
        (dict(epsilons=[1e-3, 0.0]), "positive and finite"),
        (dict(epsilons=[1e-3, float("nan")]), "positive and finite"),
        (dict(epsilons=[1e-3, 1.0000000001e-3]), "repeated metric keys"),
        (dict(mode="tokens"), r"mode='tokens' is not one of \('auto', 'input', 'embedding'\)"),
        (dict(critical_factor=1.0), "critical_factor=1.0 must be"),
        (dict(amplification_eps=0.0), "amplification_eps=0.0 must be"),
        (dict(probe_size=0), "probe_size=0 must be positive"),
    ],
)
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PerturbationEval(**kw)


# ---- the callback: known answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["input", "embedding"])
def test_amplification_of_identity_and_doubling_layers(mode: str) -> None:
    torch.manual_seed(0)
    cb = probe_once(
        ToyModule(scales=(1.0, 2.0, 2.0)),
        image_loaders(n=32),
        mode=mode,
        layers="layers.*",
        embedding="embed",
        epsilons=[1e-12, 1e-1],
    )
    m = cb.last_metrics
    assert m[f"{K}/amplification/layers.0"] == pytest.approx(1.0, rel=1e-6)
    assert m[f"{K}/amplification/layers.1"] == pytest.approx(2.0, rel=1e-6)
    assert m[f"{K}/amplification/layers.2"] == pytest.approx(4.0, rel=1e-6)
    assert abs(m[f"{K}/loss/eps_0.000000000001"] - m[f"{K}/loss_clean"]) < 1e-6  # ε -> 0 gives the clean loss
    assert m[f"{K}/acc/eps_0.000000000001"] == m[f"{K}/acc_clean"]
    assert m[f"{K}/loss/eps_0.1"] != m[f"{K}/loss_clean"]


def test_noise_is_deterministic_across_runs_and_batch_sizes() -> None:
    loaders = image_loaders(n=40)
    torch.manual_seed(0)
    module = our_task("pde")
    a = probe_once(module, loaders, probe_batch_size=32, epsilons=[1e-2, 1e-1], fgsm=True)
    torch.manual_seed(0)
    b = probe_once(our_task("pde"), loaders, probe_batch_size=32, epsilons=[1e-2, 1e-1], fgsm=True)
    torch.manual_seed(0)
    c = probe_once(our_task("pde"), loaders, probe_batch_size=5, epsilons=[1e-2, 1e-1], fgsm=True)
    assert b.last_metrics == pytest.approx(a.last_metrics, rel=0, abs=0, nan_ok=True)  # bit-identical
    assert a.last_metrics.keys() == c.last_metrics.keys()
    for k, v in a.last_metrics.items():
        assert c.last_metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), k


def test_fgsm_beats_random_noise_on_a_trained_linear_model_and_leaves_parameter_grads_alone() -> None:
    torch.manual_seed(0)
    module = LinearModule()
    train, val = image_loaders(n=96)
    L.Trainer(
        max_epochs=8, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    ).fit(module, train)
    for p in module.parameters():
        p.grad = None
    cb = PerturbationEval(budget=None, probe_size=64, epsilons=[1e-2, 1e-1, 1.0], fgsm=True)  # step 0 only
    t = trainer(callbacks=[cb])
    consume = cb.consume

    def consume_and_check(pb) -> None:
        before = [None if p.grad is None else p.grad.clone() for p in pb.session.pl_module.parameters()]
        consume(pb)
        after = [p.grad for p in pb.session.pl_module.parameters()]
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after, before, strict=True))

    cb.consume = consume_and_check  # type: ignore[method-assign]
    t.fit(module, train, val)
    m = cb.last_metrics
    assert m[f"{K}/acc_clean"] > 0.9
    for e in ("0.01", "0.1", "1"):
        assert m[f"{K}/fgsm_loss/eps_{e}"] > m[f"{K}/loss/eps_{e}"] > m[f"{K}/loss_clean"] * 0.99
    assert m[f"{K}/fgsm_acc/eps_1"] < m[f"{K}/acc/eps_1"]
    assert m[f"{K}/fgsm_loss/eps_0.1"] < m[f"{K}/fgsm_loss/eps_1"]
    assert not any(k.startswith(f"{K}/amplification") for k in m)  # no layers: amplification skipped


# ---- token inputs ----------------------------------------------------------------------------------------------
def test_token_model_in_input_mode_raises_a_clear_error() -> None:
    cb = PerturbationEval(mode="input")
    with pytest.raises(ValueError, match=r"mode='input'.*token ids.*use mode='embedding'"):
        trainer(callbacks=[cb]).fit(token_task("transformer"), *token_loaders())
    assert cb._hub is None  # raised at setup, before the callback joined the trainer's probes


@pytest.mark.parametrize("kind", ["transformer", "pde"])
def test_token_models_auto_switch_to_embedding_noise(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cb = probe_once(token_task(kind), token_loaders(), tmp_path, fgsm=True)
    assert cb._mode == "embedding"
    m = cb.last_metrics
    assert set(m) >= {f"{K}/amplification/blocks.0", f"{K}/amplification/blocks.1", f"{K}/fgsm_loss/eps_00.01"}
    assert all(math.isfinite(v) for k, v in m.items() if not k.endswith("critical_eps"))
    assert abs(m[f"{K}/loss/eps_00.0001"] - m[f"{K}/loss_clean"]) < 1e-3
    assert m[f"{K}/loss/eps_01"] != m[f"{K}/loss_clean"]
    assert m[f"{K}/fgsm_loss/eps_00.1"] > m[f"{K}/loss_clean"]


def test_padding_gets_no_noise() -> None:
    """With padding masked out, the same posts padded to 12 or to 16 tokens give the same perturbed losses."""
    results = []
    for pad_to in (12, 16):
        torch.manual_seed(0)
        cb = probe_once(token_task("transformer"), token_loaders(pad_to=pad_to), epsilons=[1e-1, 1.0], fgsm=True)
        results.append(cb.last_metrics)
    for k, v in results[0].items():
        assert results[1][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), k


# ---- end to end with TensorBoard --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["transformer", "pde"])
def test_our_models_log_every_documented_key(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cb = PerturbationEval(probe_size=24, probe_batch_size=16, epsilons=[1e-3, 1e-1, 1.0], fgsm=True)
    train, val = image_loaders(n=48)
    trainer(tmp_path, max_steps=-1, max_epochs=1, limit_val_batches=None, callbacks=[cb]).fit(
        our_task(kind), train, val
    )
    events = read_events(tmp_path)
    tags = set(events.Tags()["scalars"])
    expected = {f"{K}/loss_clean", f"{K}/acc_clean"}  # critical_eps: only once some ε departs (never NaN)
    for e in ("0.001", "0.1", "1"):
        expected |= {f"{K}/{q}/eps_{e}" for q in ("loss", "acc", "fgsm_loss", "fgsm_acc")}
    expected |= {f"{K}/amplification/blocks.{i}" for i in range(2)}
    assert expected <= tags
    for tag in expected:
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), tag  # step 0 and end of epoch 1
    assert f"{K}/loss_vs_eps" in events.Tags()["images"]
    crits = [e.value for e in events.Scalars(f"{K}/critical_eps")] if f"{K}/critical_eps" in tags else []
    assert all(c in {pytest.approx(e) for e in (1e-3, 1e-1, 1.0)} for c in crits)  # absent while undefined
    assert cb.layout()["amplification per layer"] == [rf"^{K}/amplification/[^/]+$"]


@pytest.mark.parametrize("mode", ["auto", "embedding"])
def test_stock_encoder_via_globs(mode: str) -> None:
    torch.manual_seed(0)
    cb = probe_once(
        StockEncoderModule(),
        image_loaders(n=32),
        mode=mode,
        layers="encoder.layers.*",
        embedding="proj",
        epsilons=[1e-12, 1e-2],
    )
    m = cb.last_metrics
    assert cb._mode == ("input" if mode == "auto" else "embedding")
    assert {f"{K}/amplification/encoder.layers.0", f"{K}/amplification/encoder.layers.1"} <= set(m)
    assert all(math.isfinite(v) for k, v in m.items() if not k.endswith("critical_eps"))
    assert abs(m[f"{K}/loss/eps_0.000000000001"] - m[f"{K}/loss_clean"]) < 1e-6


def test_stock_encoder_embedding_mode_without_an_embedding_glob_perturbs_the_first_layer_input() -> None:
    torch.manual_seed(0)
    cb = probe_once(StockEncoderModule(), image_loaders(n=32), mode="embedding", epsilons=[1e-12, 1e-2])
    m = cb.last_metrics
    assert abs(m[f"{K}/loss/eps_0.000000000001"] - m[f"{K}/loss_clean"]) < 1e-6
    assert {f"{K}/amplification/encoder.layers.0", f"{K}/amplification/encoder.layers.1"} <= set(m)
    # u_0 is the first layer's input, so the first layer's own amplification is that layer's gain (finite, > 0)
    assert 0 < m[f"{K}/amplification/encoder.layers.0"] < 100


def test_mlp_in_input_mode_skips_amplification(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cb = probe_once(MLPModule(), image_loaders(n=32), tmp_path, epsilons=[1e-12, 1e-1])
    m = cb.last_metrics
    assert cb._mode == "input"
    assert set(m) == {
        f"{K}/loss_clean",
        f"{K}/acc_clean",
        f"{K}/critical_eps",
        f"{K}/detail/departure_ratio",
        f"{K}/detail/threshold_fraction",
        f"{K}/loss/eps_0.000000000001",
        f"{K}/acc/eps_0.000000000001",
        f"{K}/loss/eps_0.1",
        f"{K}/acc/eps_0.1",
    }
    assert abs(m[f"{K}/loss/eps_0.000000000001"] - m[f"{K}/loss_clean"]) < 1e-6
    assert {f"{K}/loss_clean", f"{K}/loss/eps_0.1"} <= set(read_events(tmp_path).Tags()["scalars"])


def test_mlp_in_embedding_mode_is_a_clear_error() -> None:
    with pytest.raises(TargetNotFoundError, match="needs the input embedding of MLPModule"):
        probe_once(MLPModule(), image_loaders(n=32), mode="embedding")


# ---- DDP ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_log_what_one_process_logs(tmp_path: Path) -> None:
    def run(devices: int, log_dir: Path) -> dict[str, float]:
        torch.manual_seed(0)
        module = token_task("pde")
        cb = PerturbationEval(every_n_epochs=None, probe_size=30, probe_batch_size=4, epsilons=[1e-2, 1.0], fgsm=True)
        strategy = "ddp_spawn" if devices > 1 else "auto"
        trainer(log_dir, callbacks=[cb], accelerator="cpu", devices=devices, strategy=strategy).fit(
            module, *token_loaders()
        )
        ev = read_events(log_dir)
        return {t: ev.Scalars(t)[0].value for t in ev.Tags()["scalars"] if t.startswith(K)}

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 10
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-5, abs=1e-7, nan_ok=True), k
