"""Bad input through the real command line: each case exits with the right status, says what was wrong and what
is valid (or which file and what to do) on the last line, and leaves nothing half-written behind.

Most cases run ``pdelightning.cli.main`` in-process (its ``SystemExit`` carries the exit status the console
script would return); a few run the console script itself.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pdelightning.cli import EXIT_BAD_INPUT, main
from pdelightning.plugin import ENV_VAR
from tests.helpers.configs import CONFIGS
from tests.test_cli import fake_mnist, fake_newsgroups

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(CONFIGS / "quickstart.yaml")


@dataclass
class Case:
    """``args(tmp)`` are appended to ``fit -c quickstart.yaml`` (unless ``own_config``); ``expect`` are regexes
    the last line must match (the bad value, the valid choices or the file and the fix)."""

    args: Callable[[Path], list[str]]
    expect: list[str]
    code: int = EXIT_BAD_INPUT
    own_config: bool = False
    env: Callable[[Path], dict[str, str]] | None = None
    skip_if_gpu: bool = False


def _yaml(name: str, text: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["-c", str(_write(tmp / name, text))]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mnist(tmp: Path, damage: Callable[[Path], None] | None = None) -> list[str]:
    root = fake_mnist(tmp / "mnist")
    if damage is not None:
        damage(root / "MNIST" / "raw")
    return ["-c", str(CONFIGS / "mnist_pde.yaml"), f"--data.init_args.data_dir={root}"]


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _news(tmp: Path, *extra: str, damage: bool = False) -> list[str]:
    root = fake_newsgroups(tmp / "news")
    if damage:
        _truncate(root / "20news-bydate.tar.gz")
    return ["-c", str(CONFIGS / "newsgroups_transformer.yaml"), f"--data.init_args.data_dir={root}",
            "--data.init_args.max_len=16", "--data.init_args.vocab_size=64", *extra]  # fmt: skip


CB_YAML = "trainer:\n  callbacks+:\n    - class_path: pdelightning.callbacks.{cls}\n{init}"


def _cb(cls: str, init: str) -> Callable[[Path], list[str]]:
    """A ``-c`` bundle adding ``cls`` with ``init_args: {init}``."""
    return _yaml("cb.yaml", CB_YAML.format(cls=cls, init=f"      init_args: {{{init}}}\n"))


def _plugin(text: str) -> Callable[[Path], dict[str, str]]:
    """``PDELIGHTNING_CALLBACKS`` naming a YAML file with ``text`` (or ``text`` itself when it has no newline)."""
    return lambda tmp: {ENV_VAR: str(_write(tmp / "plugin.yaml", text)) if "\n" in text else text}


CASES: dict[str, Case] = {
    # ---- class names (difflib suggestions) -------------------------------------------------------------------
    "model-class-typo": Case(
        lambda t: ["--model.model=TransformerClassifer"],
        ["'TransformerClassifer'", "did you mean TransformerClassifier", "PDEClassifier"],
    ),
    "data-class-typo": Case(
        lambda t: ["--data=DigitsDataModul"], ["'DigitsDataModul'", "DigitsDataModule", "MNISTDataModule"]
    ),
    "data-class-path-typo": Case(
        lambda t: ["--data=pdelightning.data.MNISTDataModul"], ["MNISTDataModul'", "pdelightning.data.MNISTDataModule"]
    ),
    "callback-class-typo": Case(
        lambda t: ["--trainer.callbacks+=GradientFlw"],
        ["'GradientFlw'", "did you mean GradientFlow", "StabilityMonitor"],
    ),
    "callback-class-typo-yaml": Case(
        _yaml("cb.yaml", CB_YAML.format(cls="StabiltyMonitor", init="")),
        ["StabiltyMonitor'", "pdelightning.callbacks.StabilityMonitor"],
    ),
    "optimizer-typo": Case(
        lambda t: ["--model.optimizer=torch.optim.Adamm"], ["'torch.optim.Adamm'", "torch.optim.Adam", "AdamW", "SGD"]
    ),
    "scheduler-typo": Case(
        lambda t: ["--model.lr_scheduler=StepLRR"], ["'StepLRR'", "did you mean StepLR", "CosineAnnealingLR"]
    ),
    "logger-typo": Case(
        lambda t: ["--trainer.logger=TensorBoardLoger"], ["'TensorBoardLoger'", "TensorBoardLogger", "CSVLogger"]
    ),
    "subcommand-typo": Case(lambda t: [], ["'fitt'", "'fit', 'validate', 'test', 'predict'"]),
    # ---- argument names ----------------------------------------------------------------------------------------
    "model-arg-typo": Case(
        lambda t: ["--model.model.init_args.n_layer=2"], ["'n_layer'", "did you mean 'n_layers'", "d_model"]
    ),
    "data-arg-typo": Case(lambda t: ["--data.init_args.batch_siz=3"], ["'batch_siz'", "'batch_size'", "val_fraction"]),
    "callback-arg-typo": Case(
        _yaml("cb.yaml", CB_YAML.format(cls="GradientFlow", init="      init_args: {every_n_step: 3}\n")),
        ["'every_n_step'", "'every_n_steps'"],
    ),
    "trainer-option-typo": Case(
        lambda t: ["--trainer.max_epochz=3"],
        ["unknown option --trainer.max_epochz", "did you mean --trainer.max_epochs"],
    ),
    "section-typo": Case(
        _yaml("top.yaml", "trainr:\n  max_epochs: 2\n"), ["'trainr.max_epochs'", "did you mean 'trainer'"]
    ),
    # ---- values ------------------------------------------------------------------------------------------------
    "norm-choice": Case(
        lambda t: ["--model.model.init_args.norm=sideways"], ["norm='sideways'", r"\['pre', 'post', 'none'\]"]
    ),
    "callback-choice-yaml": Case(
        _yaml("cb.yaml", CB_YAML.format(cls="StabilityMonitor", init="      init_args: {action: halt}\n")),
        [r"StabilityMonitor\)", "action='halt'", r"\['warn', 'stop'\]"],
    ),
    "newsgroups-source-choice": Case(
        lambda t: _news(t, "--data.init_args.source=tarbal"),
        ["'tarbal'", "'auto', 'tarball', 'sklearn'"],
        own_config=True,
    ),
    "newsgroups-category": Case(
        lambda t: _news(t, "--data.init_args.categories=[sci.spaec]"), ["'sci.spaec'", "'sci.space'"], own_config=True
    ),
    "d_model-type": Case(lambda t: ["--model.model.init_args.d_model=abc"], ["d_model='abc'", "an integer"]),
    "max_epochs-type": Case(lambda t: ["--trainer.max_epochs=abc"], ["max_epochs='abc'", "an integer or null"]),
    "seed-type": Case(lambda t: ["--seed_everything=abc"], ["seed_everything='abc'", "true or false or an integer"]),
    "precision": Case(lambda t: ["--trainer.precision=17"], ["precision='17'", "bf16-mixed"]),
    "accelerator": Case(lambda t: ["--trainer.accelerator=gpux"], ["'gpux'", "cpu", "cuda"]),
    "n_layers-negative": Case(
        lambda t: ["--model.model.init_args.n_layers=-1"], ["TransformerClassifier", "n_layers=-1 must be positive"]
    ),
    "d_ff-zero": Case(lambda t: ["--model.model.init_args.d_ff=0"], ["d_ff=0 must be positive"]),
    "n_heads-divisor": Case(
        lambda t: ["--model.model.init_args.n_heads=3"], ["n_heads=3", r"valid n_heads .*\[1, 2, 4, 8"]
    ),
    "beta-negative": Case(lambda t: ["--model.beta=-1"], ["beta=-1.0 must be >= 0"]),
    "lr-negative": Case(
        lambda t: ["--model.optimizer.init_args.lr=-1"], ["model.optimizer", "Invalid learning rate: -1.0"]
    ),
    "batch_size-zero": Case(lambda t: ["--data.init_args.batch_size=0"], ["batch_size=0 must be a positive integer"]),
    "val_fraction": Case(
        lambda t: ["--data.init_args.val_fraction=1.5"], ["val_fraction=1.5", "strictly between 0 and 1"]
    ),
    "num_classes-override": Case(
        lambda t: ["--model.model.init_args.num_classes=5"],
        ["num_classes=5", "DigitsDataModule has num_classes=10", "remove model.model.init_args.num_classes"],
    ),
    "image_size-override": Case(lambda t: ["--model.model.init_args.image_size=12"], ["image_size=12", "image_size=8"]),
    # ---- callback arguments inside a -c bundle: the callback's own message, not jsonargparse's dump -------------
    "cb-probe_size-zero": Case(
        _cb("InformationFlow", "probe_size: 0"), [r"InformationFlow", "probe_size=0 must be positive"]
    ),
    "cb-budget-negative": Case(_cb("GradientFlow", "budget: -1"), ["budget=-1.0", r"fraction in \(0, 1\)", "'auto'"]),
    "cb-budget-two": Case(_cb("GradientFlow", "budget: 2"), ["budget=2.0", r"fraction in \(0, 1\)"]),
    "cb-every_n_steps-zero": Case(_cb("GradientFlow", "every_n_steps: 0"), ["every_n_steps=0 must be a positive"]),
    "cb-threshold-zero": Case(_cb("StabilityMonitor", "threshold: 0"), ["threshold=0.0 must be positive"]),
    "cb-figure_every-zero": Case(
        _cb("InformationFlow", "figure_every_n_probes: 0"), ["figure_every_n_probes=0 must be positive or None"]
    ),
    "cb-lmi-probe_size-one": Case(
        _cb("LayerMutualInformation", "probe_size: 1"), ["probe_size=1 is too small", "at least 4"]
    ),
    "cb-layers-glob-nothing": Case(
        lambda t: ["--trainer.callbacks+=GradientFlow", "--trainer.callbacks.layers=nothing.*"],
        [r"layers='nothing\.\*' matched no module", "Modules seen: model"],
    ),
    # ---- the plugin (PDELIGHTNING_CALLBACKS): suggestions as on the command line --------------------------------
    "plugin-name-typo": Case(
        lambda t: [], ["'gradient_flw'", "did you mean 'GradientFlow'"], env=_plugin("gradient_flw")
    ),
    "plugin-class-typo": Case(
        lambda t: [],
        ["'pdelightning.callbacks.GradientFlw'", "did you mean pdelightning.callbacks.GradientFlow"],
        env=_plugin("- class_path: pdelightning.callbacks.GradientFlw\n"),
    ),
    "plugin-arg-typo": Case(
        lambda t: [],
        ["GradientFlow has no argument 'every_n_step'", "did you mean 'every_n_steps'"],
        env=_plugin("- class_path: pdelightning.callbacks.GradientFlow\n  init_args: {every_n_step: 3}\n"),
    ),
    "plugin-out-of-range": Case(
        lambda t: [],
        ["probe_size=0 must be positive"],
        env=_plugin("- class_path: InformationFlow\n  init_args: {probe_size: 0}\n"),
    ),
    # ---- trainer values Lightning refuses raw, or accepts and then fails on ------------------------------------
    "accelerator-no-gpu": Case(
        lambda t: ["--trainer.accelerator=gpu"],
        ["accelerator='gpu' needs a GPU", "--trainer.accelerator cpu"],
        skip_if_gpu=True,
    ),
    "devices-zero": Case(lambda t: ["--trainer.devices=0"], ["devices='0' is not valid", "positive count"]),
    "val_check_interval-zero": Case(
        lambda t: ["--trainer.val_check_interval=0"], ["val_check_interval=0 must be > 0", r"\(0, 1\]"]
    ),
    "gradient_clip_val-negative": Case(
        lambda t: ["--trainer.gradient_clip_val=-1"], ["gradient_clip_val=-1", "must be >= 0", "0 or null"]
    ),
    # ---- config files ------------------------------------------------------------------------------------------
    "config-empty": Case(_yaml("empty.yaml", "# nothing yet\n"), ["empty.yaml is empty", "trainer, model, data"]),
    "config-missing": Case(lambda t: ["-c", str(t / "nope.yaml")], ["nope.yaml", "no such file", "quickstart"]),
    "config-yaml-syntax": Case(
        _yaml("bad.yaml", "trainer:\n  max_epochs: 3\n  callbacks: [\n model: {"),
        ["YAML syntax error in .*bad.yaml, line 4, column 10"],
    ),
    "config-yaml-tab": Case(
        _yaml("tab.yaml", "trainer:\n\tmax_epochs: 3\n"), ["YAML syntax error in .*tab.yaml, line 2"]
    ),
    "config-not-mapping": Case(
        _yaml("list.yaml", "- a\n- b\n"), ["list.yaml holds a list, not a mapping", "trainer, model, data"]
    ),
    # ---- data files --------------------------------------------------------------------------------------------
    "mnist-missing": Case(
        lambda t: ["-c", str(CONFIGS / "mnist_pde.yaml"), f"--data.init_args.data_dir={t / 'nowhere'}"],
        ["nowhere/MNIST/raw", "download: true"],
        own_config=True,
    ),
    "mnist-truncated-gz": Case(
        lambda t: _mnist(t, lambda raw: _truncate(raw / "train-images-idx3-ubyte.gz")),
        ["train-images-idx3-ubyte.gz is corrupt or truncated", "replace it with an intact copy", "440fcabf"],
        own_config=True,
    ),
    "mnist-bad-plain-no-gz": Case(
        lambda t: _mnist(t, lambda raw: _plain_only_and_cut(raw)),
        ["t10k-labels-idx1-ubyte has 20 bytes but its IDX header implies 40", "replace it"],
        own_config=True,
    ),
    "newsgroups-truncated": Case(
        lambda t: _news(t, damage=True),
        ["20news-bydate.tar.gz is not a readable 20 Newsgroups tarball", "replace it with an intact copy"],
        own_config=True,
    ),
    # ---- checkpoints -------------------------------------------------------------------------------------------
    "ckpt-missing": Case(lambda t: [f"--ckpt_path={t / 'none.ckpt'}"], ["none.ckpt does not exist"]),
    "ckpt-directory": Case(lambda t: [f"--ckpt_path={t}"], ["is a directory; give a checkpoint file"]),
    "ckpt-empty": Case(
        lambda t: [f"--ckpt_path={_bad_ckpt(t, b'')}"], ["last.ckpt is empty", "no other readable checkpoint"]
    ),
    "ckpt-truncated": Case(
        lambda t: [f"--ckpt_path={_bad_ckpt(t, None, sibling=True)}"],
        ["last.ckpt is truncated or corrupt", "resume with --ckpt_path .*epoch=0-step=1.ckpt"],
    ),
    "ckpt-garbage": Case(
        lambda t: [f"--ckpt_path={_bad_ckpt(t, b'not a checkpoint' * 10)}"], ["last.ckpt is truncated or corrupt"]
    ),
    "ckpt-other-n_layers": Case(
        lambda t: [f"--ckpt_path={_good_ckpt(t)}", "--model.model.init_args.n_layers=2"],
        [
            "holds a TransformerClassifier\\(n_layers=4\\)",
            "builds a TransformerClassifier\\(n_layers=2\\)",
            "pdelightning fit -c .*version_0/config.yaml --ckpt_path",
        ],
    ),
    "ckpt-other-d_model": Case(
        lambda t: [
            f"--ckpt_path={_good_ckpt(t)}",
            "--model.model.init_args.d_model=32",
            "--model.model.init_args.n_heads=2",
        ],
        ["d_model=64", "d_model=32"],
    ),
    "ckpt-other-class": Case(
        lambda t: [f"--ckpt_path={_good_ckpt(t)}", "--model.model=PDEClassifier"],
        ["TransformerClassifier \\(pdelightning.models.TransformerClassifier\\)", "PDEClassifier", "config.yaml"],
    ),
    "ckpt-no-config": Case(
        lambda t: [f"--ckpt_path={_good_ckpt(t, drop_config=True)}", "--model.model.init_args.residual=false"],
        ["residual=True", "--model.model.init_args.residual=true"],
    ),
}


def _plain_only_and_cut(raw: Path) -> None:
    import gzip

    for gz in raw.glob("*.gz"):
        with gzip.open(gz, "rb") as f:
            gz.with_suffix("").write_bytes(f.read())
        gz.unlink()
    _truncate(raw / "t10k-labels-idx1-ubyte", 0.5)


_GOOD: dict[str, Path] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickstart run of one step: ``logs/quickstart/version_0`` with config.yaml and checkpoints."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", QUICK, "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=1",
              "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}"])  # fmt: skip
        sys.exit(0)
    assert done.value.code in (0, None)
    version = out / "quickstart" / "version_0"
    assert (version / "checkpoints" / "last.ckpt").is_file() and (version / "config.yaml").is_file()
    _GOOD["version"] = version
    return version


def _good_ckpt(tmp: Path, drop_config: bool = False) -> Path:
    import shutil

    target = tmp / "prev" / "version_0"
    shutil.copytree(_GOOD["version"], target)
    if drop_config:
        (target / "config.yaml").unlink()
    return target / "checkpoints" / "last.ckpt"


def _bad_ckpt(tmp: Path, content: bytes | None, sibling: bool = False) -> Path:
    folder = tmp / "ckpts"
    folder.mkdir()
    good = (_GOOD["version"] / "checkpoints" / "last.ckpt").read_bytes()
    if sibling:
        (folder / "epoch=0-step=1.ckpt").write_bytes(good)
    path = folder / "last.ckpt"
    path.write_bytes(good[: len(good) // 3] if content is None else content)
    return path


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main(args)`` in-process: (exit status, last non-empty output line)."""
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


# Variants of a case already in the default run: run with `-m slow`.
SLOW = {
    "data-class-path-typo", "callback-class-typo-yaml", "logger-typo", "config-yaml-tab", "precision", "seed-type",
    "ckpt-garbage", "ckpt-other-d_model", "image_size-override", "beta-negative", "newsgroups-source-choice",
}  # fmt: skip


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_bad_input(
    name: str, tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    if case.skip_if_gpu and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for key, value in (case.env(tmp_path) if case.env else {}).items():
        monkeypatch.setenv(key, value)
    logs = tmp_path / "logs"
    base = [] if case.own_config else ["-c", QUICK]
    sub = "fitt" if name == "subcommand-typo" else "fit"
    args = [sub, *base, *case.args(tmp_path), "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={logs}"]  # fmt: skip
    code, last = run_main(args, capsys)
    assert code == case.code, f"exit {code}: {last}"
    assert last.startswith("error:"), last
    for pattern in case.expect:
        assert re.search(pattern, last), f"{pattern!r} not in the last line: {last}"
    assert "Given value" not in last and "Namespace(" not in last
    leftovers = [p for p in logs.rglob("*")] if logs.exists() else []
    assert leftovers == [], f"a failed run left {leftovers}"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".tmp")]


def test_failing_run_removes_the_version_folder_it_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a probe callback whose layer glob matches nothing fails at setup, after config.yaml was written
    logs = tmp_path / "logs"
    earlier = logs / "quickstart" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "keep.txt").write_text("earlier run")
    glob = ["--trainer.callbacks+=GradientFlow", "--trainer.callbacks.layers=nothing.*"]
    code, last = run_main(
        ["fit", "-c", QUICK, "--trainer.max_steps=1", *glob, f"--trainer.logger.init_args.save_dir={logs}"], capsys
    )
    assert code == EXIT_BAD_INPUT and re.search(r"nothing\.\*", last), last
    assert sorted(p.name for p in (logs / "quickstart").iterdir()) == ["version_0"]  # version_1 removed
    assert (earlier / "keep.txt").read_text() == "earlier run"  # earlier content untouched


def test_limit_val_batches_zero_with_probes_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"limit_val_batches=0 .*StabilityMonitor.* training data"):
        main(["fit", "-c", QUICK, "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
              "--trainer.callbacks+=StabilityMonitor", "--trainer.enable_progress_bar=false",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "code", "expect"),
    [
        (["fit", "-c", "nope.yaml"], 2, "nope.yaml"),
        (["fit", "-c", QUICK, "--model.model=TransformerClassifer"], 2, "did you mean TransformerClassifier"),
    ],
    ids=["missing-config", "class-typo"],
)
def test_console_script_exit_status_and_last_line(args: list[str], code: int, expect: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pdelightning", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == code
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error:") and expect in last
    assert not (tmp_path / "logs").exists()


def test_checkpoint_load_error_keeps_the_file(tmp_path: Path, trained: Path) -> None:
    path = _bad_ckpt(tmp_path, b"")
    with pytest.raises(SystemExit):
        main(["fit", "-c", QUICK, f"--ckpt_path={path}"])
    assert path.read_bytes() == b""  # reported, not deleted or rewritten
    assert torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


# Messages as jsonargparse 4.53 writes them (captured), and what the user gets instead.
RAW_MESSAGES = [
    (
        'Parser key "trainer.callbacks":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [list[...]]\n  Errors:\n"
        "    - Problem with given class_path 'pdelightning.callbacks.StabilityMonitor':\n"
        "        action='halt' is not one of ['warn', 'stop']\n    - Not a valid subclass of Callback\n"
        "      Subclass types expect one of:\n      - a class path (str)\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'list'>\n"
        "  Given value: [{'class_path': 'pdelightning.callbacks.StabilityMonitor'}]",
        "trainer.callbacks (StabilityMonitor): action='halt' is not one of ['warn', 'stop']",
    ),
    (
        "Parser key \"model.model\":\n  Problem with given class_path 'pdelightning.models.TransformerClassifier':\n"
        "    Parser key \"d_model\":\n      Expected a <class 'int'>. Got value: abc",
        "model.model (TransformerClassifier): d_model='abc' is not valid: expected an integer",
    ),
    (
        "Subcommand 'fit' does not accept option 'trainr.max_epochs'",
        "'fit' does not accept the key 'trainr.max_epochs'; did you mean 'trainer'? the sections are: "
        "seed_everything, trainer, model, data, ckpt_path, optimizer, lr_scheduler, config",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), RAW_MESSAGES, ids=["nested-literal", "nested-type", "section"])
def test_clarify_parse_error_known_messages(raw: str, expected: str) -> None:
    from pdelightning.cli_errors import clarify_parse_error

    assert clarify_parse_error(raw) == expected


def test_class_suggestions_rank_the_closest_first() -> None:
    from pdelightning.cli_errors import class_choices, suggest_class
    from pdelightning.data import ClassificationDataModule

    choices = class_choices([ClassificationDataModule])
    assert suggest_class("DigitsDataModul", choices)[0] == "DigitsDataModule"
    assert suggest_class("pdelightning.data.MNISTDataModul", choices)[0] == "pdelightning.data.MNISTDataModule"
    assert suggest_class("mnistdatamodule", choices)[0] == "MNISTDataModule"  # case-insensitive
