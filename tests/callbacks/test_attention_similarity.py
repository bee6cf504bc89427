"""AttentionSimilarity: the math against known answers, then the callback end to end on our models, a stock
encoder, an MLP, references from checkpoints and configs, and a checkpoint round trip of its state."""

from __future__ import annotations

import copy
import doctest
import math
from functools import partial
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader

import pdelightning.callbacks.attention_similarity as asim
from pdelightning.callbacks._layout import is_detail
from pdelightning.callbacks._reference import linked_values
from pdelightning.callbacks._targets import TargetNotFoundError
from pdelightning.callbacks.attention_similarity import NULLS, AttentionSimilarity
from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning.task import ClassificationTask
from tests.helpers.models import MLPModule, StockEncoderModule, image_loaders, our_task
from tests.helpers.tb import read_events

K = "analysis/attention_similarity"
QUANTITIES = (
    ["cosine", "kl", "js", "cosine_unmatched", "entropy", "entropy_reference"]
    + [f"{m}_null_{n}" for n in NULLS for m in ("cosine", "kl", "js")]
    + ["cosine_skill", "kl_skill", "js_skill", "cosine_margin", "kl_margin", "js_margin"]
)
SKILLS = ("cosine_skill", "kl_skill", "js_skill")


def tag(q: str, layer: str) -> str:
    """The logged tag of quantity ``q`` (secondary quantities under ``detail/``)."""
    return f"{K}/detail/{q}/{layer}" if is_detail(q, AttentionSimilarity.detail) else f"{K}/{q}/{layer}"


STOCK_GLOBS = {"layers": "encoder.layers.*", "attention": "encoder.layers.*.self_attn"}
SMALL = {"probe_size": 12, "probe_batch_size": 8, "log_figures": False}


# ---- math ------------------------------------------------------------------------------------------------------
def test_doctests() -> None:
    assert doctest.testmod(asim, raise_on_error=True).failed == 0


# ---- arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference": torch.nn.Linear(2, 2), "reference_checkpoint": "x.ckpt"}, "either as a module"),
        ({"reference_class": "a.B"}, "needs reference_checkpoint or reference_config"),
        ({"reference_checkpoint": "x.ckpt", "reference_class": "NoDots"}, "dotted path"),
        ({"match_by": "kl"}, r"match_by='kl' is not one of \('cosine', 'js'\)"),
        ({"nulls": ["uniform", "gaussian"]}, r"unknown baselines \['gaussian'\]; choose from"),
        ({"eps": 0.0}, r"eps=0.0 must lie in \(0, 1\)"),
        ({"layer_map": {0: -1}}, "layer_map"),
        ({"layer_map": {}}, "at least one pair"),
        ({"probe_size": 0}, "probe_size=0 must be positive"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionSimilarity(**kwargs)


# ---- end to end --------------------------------------------------------------------------------------------------
def fit(module, cb: AttentionSimilarity, log_dir: Path | None, loaders=None, callbacks=None, ckpt_path=None, **kw):
    torch.manual_seed(0)
    trainer = L.Trainer(
        **{"max_epochs": 1, "enable_checkpointing": False, **kw},
        callbacks=callbacks or [cb],
        logger=TensorBoardLogger(str(log_dir)) if log_dir is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, *(loaders or image_loaders(n=32)), ckpt_path=ckpt_path)
    return trainer


def logged(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ev = read_events(log_dir)
    return {t: [(e.step, e.value) for e in ev.Scalars(t)] for t in ev.Tags()["scalars"] if t.startswith(K)}


def assert_documented_keys(tags: dict, layers: list[str]) -> None:
    expected = {tag(q, layer) for q in QUANTITIES for layer in [*layers, "mean"]}
    # a skill is undefined, and not logged, where the strongest null leaves less room than skill_min_room
    missing = {t for t in expected - set(tags) if any(f"/{s}/" in t for s in SKILLS)}
    assert set(tags) == expected - missing, sorted(set(tags) ^ (expected - missing))
    for q in QUANTITIES:
        assert f"``{q}``" in AttentionSimilarity.__doc__, q
    for t, values in tags.items():
        assert all(math.isfinite(v) for _, v in values), t  # nothing is logged as NaN


def test_reference_equal_to_the_model_agrees_at_step_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the model's initialisation must not depend on what earlier tests drew
    task = our_task("transformer")
    cb = AttentionSimilarity(reference=copy.deepcopy(task), **{**SMALL, "log_figures": True})
    fit(task, cb, tmp_path)
    tags = logged(tmp_path)
    assert_documented_keys(tags, ["blocks.0", "blocks.1"])
    at = {t: dict(v) for t, v in tags.items()}
    for layer in ("blocks.0", "blocks.1", "mean"):
        assert at[f"{K}/cosine/{layer}"][0] == pytest.approx(1.0, abs=1e-5)
        assert at[f"{K}/kl/{layer}"][0] == pytest.approx(0.0, abs=1e-5)
        assert at[f"{K}/js/{layer}"][0] == pytest.approx(0.0, abs=1e-5)
        if layer == "mean":  # the mean over layers of each layer's margin (the strongest null may differ by layer)
            layers_margin = [at[tag("cosine_margin", name)][0] for name in ("blocks.0", "blocks.1")]
            assert at[tag("cosine_margin", layer)][0] == pytest.approx(sum(layers_margin) / 2, abs=1e-5)
            continue
        strongest = max(at[tag(f"cosine_null_{n}", layer)][0] for n in NULLS)
        assert at[tag("cosine_margin", layer)][0] == pytest.approx(1.0 - strongest, abs=1e-5)
        # perfect agreement: skill 1 where the null leaves room; absent (read the margin) where it leaves < 0.05
        if 1.0 - strongest >= 0.05:
            assert at[f"{K}/cosine_skill/{layer}"][0] == pytest.approx(1.0, abs=1e-3)
        else:
            assert 0 not in at.get(f"{K}/cosine_skill/{layer}", {})
        assert at[f"{K}/entropy/{layer}"][0] == pytest.approx(at[tag("entropy_reference", layer)][0], abs=1e-5)
    end = max(at[f"{K}/cosine/mean"])
    assert end > 0 and at[f"{K}/cosine/mean"][end] < 1.0 - 1e-6  # training moved the model away from its copy
    images = read_events(tmp_path).Tags()["images"]
    assert {f"{K}/attention_maps", f"{K}/by_layer"} <= set(images)


def test_transformer_against_a_pde_reference_with_fewer_layers(tmp_path: Path) -> None:
    reference = our_task("pde", n_layers=3).model  # model has 2 layers: layers 0, 1 compared
    cb = AttentionSimilarity(reference=reference, **SMALL)
    fit(our_task("transformer"), cb, tmp_path)
    assert_documented_keys(logged(tmp_path), ["blocks.0", "blocks.1"])
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    res = cb.last_results["blocks.0"]
    assert 0.0 < res["cosine"] <= 1.0 and 0.0 <= res["js"] <= math.log(2)
    assert res["cosine"] >= res["cosine_unmatched"] - 1e-9  # the matching can only help


def test_layer_map_and_out_of_range(tmp_path: Path) -> None:
    cb = AttentionSimilarity(reference=our_task("pde", n_layers=3).model, layer_map={1: 2}, nulls=["uniform"], **SMALL)
    fit(our_task("transformer"), cb, None)
    assert list(cb.last_results) == ["blocks.1"] and "cosine_null_shuffled" not in cb.last_results["blocks.1"]
    bad = AttentionSimilarity(reference=our_task("pde", n_layers=1).model, layer_map={0: 1}, **SMALL)
    with pytest.raises(ValueError, match=r"layer_map entries \{0: 1\} are out of range"):
        fit(our_task("transformer"), bad, None)


def test_stock_encoder_with_globs_on_both_sides(tmp_path: Path) -> None:
    cb = AttentionSimilarity(
        reference=StockEncoderModule(),
        reference_layers="encoder.layers.*",
        reference_attention="encoder.layers.*.self_attn",
        **STOCK_GLOBS,
        **SMALL,
    )
    fit(StockEncoderModule(), cb, tmp_path)
    assert_documented_keys(logged(tmp_path), ["encoder.layers.0", "encoder.layers.1"])
    # a stock model against our Transformer: the reference is found through its protocol
    mixed = AttentionSimilarity(reference=our_task("transformer").model, nulls=[], **STOCK_GLOBS, **SMALL)
    fit(StockEncoderModule(), mixed, None)
    assert set(mixed.last_results) == {"encoder.layers.0", "encoder.layers.1"}


def test_models_without_attention_fail_at_setup() -> None:
    with pytest.raises(TargetNotFoundError, match="MLPModule has no Transformer layers to analyse"):
        fit(MLPModule(), AttentionSimilarity(reference=our_task().model, **SMALL), None)
    with pytest.raises(TargetNotFoundError, match="MLPModule has no Transformer layers to analyse"):
        fit(our_task(), AttentionSimilarity(reference=MLPModule(), **SMALL), None)
    with pytest.raises(TargetNotFoundError, match="no attention module found"):  # layers with no attention inside
        fit(StockEncoderModule(), AttentionSimilarity(layers="encoder.layers.*.linear1", **SMALL), None)
    # a layers glob alone: the attention module inside each layer is found by type
    cb = AttentionSimilarity(layers="encoder.layers.*", nulls=["uniform"], **SMALL)
    fit(StockEncoderModule(), cb, None)
    assert set(cb.last_results) == {"encoder.layers.0", "encoder.layers.1"}


# ---- token inputs with padding -------------------------------------------------------------------------------------
def pad_collate(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Pad with 0 to the longest sequence of the batch: lengths differ between batches."""
    t = max(len(s) for s, _ in batch)
    x = torch.stack([torch.nn.functional.pad(s, (0, t - len(s))) for s, _ in batch])
    return x, torch.tensor([y for _, y in batch])


def token_loaders(n: int = 24, max_len: int = 10, vocab: int = 12) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, max_len + 1, (n,), generator=g)
    data = [(torch.randint(1, vocab, (int(t),), generator=g), i % 4) for i, t in enumerate(lengths)]
    return (
        DataLoader(data, batch_size=8, shuffle=True, collate_fn=pad_collate),
        DataLoader(data, batch_size=8, collate_fn=pad_collate),
    )


def test_token_inputs_count_only_valid_query_rows(tmp_path: Path) -> None:
    task = our_task("pde", input_kind="tokens", vocab_size=12, max_len=10)
    cb = AttentionSimilarity(
        probe_size=24, probe_batch_size=5, log_figures=False
    )  # no reference: the model at the start
    loaders = token_loaders()
    fit(task, cb, tmp_path, loaders)
    valid_tokens = sum(int((x != 0).sum()) for x, _ in loaders[1])
    for res in cb.last_results.values():
        assert res["rows"] == valid_tokens
        assert all(math.isfinite(v) or k.endswith("_skill") for k, v in res.items() if isinstance(v, float))
    at0 = {t: dict(v)[0] for t, v in logged(tmp_path).items()}
    assert at0[f"{K}/cosine/mean"] == pytest.approx(1.0, abs=1e-5)
    assert at0[tag("cosine_null_shuffled", "mean")] < 1.0


# ---- references from files ---------------------------------------------------------------------------------------
ARCH = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}


def write_yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fit_checkpoint(module: L.LightningModule, tmp_path: Path) -> str:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[ckpt], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, *image_loaders(n=32))
    return ckpt.last_model_path


def test_reference_from_a_python_fit_checkpoint_needs_a_config(tmp_path: Path) -> None:
    path = fit_checkpoint(our_task("transformer"), tmp_path)
    with pytest.raises(TypeError, match="also give reference_config"):
        fit(our_task("pde"), AttentionSimilarity(reference_checkpoint=path, **SMALL), None)
    # the config gives the architecture (num_classes and image_size are copied from the trained model)
    config = write_yaml(
        tmp_path / "ref.yaml",
        {"model": {"model": {"class_path": "pdelightning.models.TransformerClassifier", "init_args": ARCH}}},
    )
    cb = AttentionSimilarity(reference_checkpoint=path, reference_config=config, **SMALL)
    fit(our_task("pde"), cb, tmp_path / "tb")
    weights = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    loaded = cb._reference.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert_documented_keys(logged(tmp_path / "tb"), ["blocks.0", "blocks.1"])
    with pytest.warns(UserWarning, match="freshly initialised"):
        fit(our_task("pde"), AttentionSimilarity(reference_config=config, nulls=[], **SMALL), None)
    with pytest.raises(FileNotFoundError, match=r"reference_checkpoint='missing\.ckpt' does not exist"):
        fit(our_task("pde"), AttentionSimilarity(reference_checkpoint="missing.ckpt"), None)


def test_reference_from_a_cli_checkpoint_and_another_lightning_module(tmp_path: Path) -> None:
    from pdelightning.cli import build_cli

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 2,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "cli"),
        },
        "model": {"model": {"class_path": "pdelightning.models.TransformerClassifier", "init_args": ARCH}},
        "data": {
            "class_path": "pdelightning.data.SyntheticImageDataModule",
            "init_args": {"image_size": 8, "num_train": 32, "num_val": 16, "num_test": 8, "batch_size": 16},
        },
    }
    build_cli(["fit", "--config", write_yaml(tmp_path / "cli.yaml", config)])
    (path,) = (tmp_path / "cli").rglob("*.ckpt")
    cb = AttentionSimilarity(reference_checkpoint=str(path), nulls=["uniform"], **SMALL)
    fit(our_task("pde"), cb, None)
    assert isinstance(cb._reference, ClassificationTask) and not cb._reference.training
    # a CLI-built model's data-linked arguments are read from its hparams, for a reference_config to copy
    linked = linked_values(cb._reference)
    assert linked == {"num_classes": 4, "input_kind": "image", "image_size": 8, "vocab_size": 0, "max_len": 0}
    assert set(cb.last_results) == {"blocks.0", "blocks.1"}
    # any LightningModule class that rebuilds from its checkpoint
    stock = fit_checkpoint(StockEncoderModule(), tmp_path / "stock")
    cb = AttentionSimilarity(
        reference_checkpoint=stock,
        reference_class="tests.helpers.models.StockEncoderModule",
        reference_layers="encoder.layers.*",
        reference_attention="encoder.layers.*.self_attn",
        nulls=[],
        **SMALL,
    )
    fit(our_task("transformer"), cb, None)
    assert isinstance(cb._reference, StockEncoderModule) and set(cb.last_results) == {"blocks.0", "blocks.1"}


# ---- state -----------------------------------------------------------------------------------------------------------
def test_initial_reference_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    task = our_task("pde")
    initial = copy.deepcopy(task.state_dict())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = AttentionSimilarity(nulls=["uniform"], **SMALL)
    fit(task, cb, None, callbacks=[cb, ckpt], enable_checkpointing=True)
    assert all(torch.equal(cb._reference.state_dict()[k], v) for k, v in initial.items())
    trained = {k: v.clone() for k, v in task.state_dict().items()}
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)

    resumed = AttentionSimilarity(nulls=["uniform"], **SMALL)
    assert resumed.state_key == cb.state_key
    task2 = our_task("pde")
    torch.manual_seed(0)
    fit(task2, resumed, None, max_epochs=2, ckpt_path=ckpt.last_model_path)
    ref = resumed._reference.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in initial.items())  # the initial weights, not the resumed ones
    assert resumed.last_results["blocks.0"]["cosine"] < 1.0


# ---- DDP ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_log_what_one_process_logs(tmp_path: Path) -> None:
    def run(devices: int, log_dir: Path) -> dict[str, float]:
        torch.manual_seed(0)
        kw = {"num_classes": 4, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "input_kind": "tokens"}
        model = TransformerClassifier(**kw, vocab_size=12, max_len=10)
        task = ClassificationTask(model, num_classes=4, optimizer=partial(torch.optim.Adam, lr=1e-2))  # picklable
        reference = PDEClassifier(**kw, vocab_size=12, max_len=10)
        cb = AttentionSimilarity(reference=reference, every_n_epochs=None, probe_size=21, probe_batch_size=4)
        L.Trainer(
            max_steps=1,
            callbacks=[cb],
            logger=TensorBoardLogger(str(log_dir)),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            accelerator="cpu",
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
        ).fit(task, *token_loaders())
        return {t: v[0][1] for t, v in logged(log_dir).items()}

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 20
    for k, v in one.items():  # a skill with too little room above its null is NaN by design: NaN in both
        assert two[k] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), k
    assert sum(v == v for v in one.values()) > 20
