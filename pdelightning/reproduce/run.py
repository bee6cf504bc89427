"""``pdelightning reproduce``: run every experiment of arXiv 2408.09523 (configs/paper/), then the report.

Each setting x seed is one ``pdelightning fit`` in its own process, logging to
``<out>/<setting>/seed<k>/`` (TensorBoard events, checkpoints, and a ``run.json`` describing the run),
in an order that trains each reference model before the runs that compare against it. Afterwards
:func:`pdelightning.reproduce.report.write_report` writes ``REPRODUCTION.md`` and its figures.

    pdelightning reproduce --mnist-dir ../shared/data --newsgroups-dir ../shared/data/20newsgroups --out runs/paper
    pdelightning reproduce ... --quick      # a few steps per run: checks the pipeline end to end, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "paper"


@dataclass(frozen=True)
class Setting:
    """One trained configuration of the reproduction.

    Attributes:
        name: directory and report name.
        config: file in ``configs/paper/``.
        data: ``"mnist"`` or ``"newsgroups"``.
        reference: the setting whose checkpoint (same seed) is the reference of this run's
            ``InformationFlow`` and ``AttentionSimilarity``, or ``None``.
        experiments: the paper's experiments this setting serves.
    """

    name: str
    config: str
    data: str
    reference: str | None = None
    experiments: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("mnist_transformer", "mnist_transformer.yaml", "mnist", experiments="1, 2, 6"),
    Setting("mnist_pde", "mnist_pde.yaml", "mnist", reference="mnist_transformer", experiments="1, 2, 6"),
    Setting("mnist_transformer_no_residual", "mnist_transformer_no_residual.yaml", "mnist", experiments="6"),
    Setting("mnist_transformer_no_layernorm", "mnist_transformer_no_layernorm.yaml", "mnist", experiments="6"),
    Setting("mnist_pde_stabilized", "mnist_pde_stabilized.yaml", "mnist", experiments="6"),
    Setting("newsgroups_transformer", "newsgroups_transformer.yaml", "newsgroups", experiments="3, 4, 5"),
    Setting("newsgroups_pde", "newsgroups_pde.yaml", "newsgroups", experiments="3, 4, 5"),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)

# Overrides of --quick: a handful of steps and small probe sets, to exercise configs -> runs -> report.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--data.init_args.batch_size=16",
]


def run_dir(out: Path, setting: str, seed: int) -> Path:
    """Where one run writes: ``<out>/<setting>/seed<k>``."""
    return out / setting / f"seed{seed}"


_PAPER = {"mnist": {"train": 60000, "epochs": "not stated"}, "newsgroups": {"train": 11314, "epochs": 5}}


def _deviations(config: dict, data_kind: str, quick: bool) -> str:
    trainer, data = config.get("trainer", {}), config.get("data", {}).get("init_args", {})
    paper = _PAPER[data_kind]
    notes = []
    if quick:
        notes.append("QUICK pipeline check: 3 training batches, numbers are not results")
    if data.get("train_subset"):
        notes.append(f"train_subset={data['train_subset']} of {paper['train']} training examples")
    if data.get("max_len"):
        notes.append(f"max_len={data['max_len']} tokens")
    notes.append(f"max_epochs={trainer.get('max_epochs')} (paper: {paper['epochs']})")
    return "; ".join(notes)


def command(setting: Setting, seed: int, out: Path, data_dir: Path, quick: bool, extra: list[str]) -> list[str]:
    """The ``pdelightning fit`` command line of one run."""
    cmd = [
        sys.executable, "-m", "pdelightning", "fit", "-c", str(CONFIG_DIR / setting.config),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={setting.name}",
        f"--trainer.logger.init_args.version=seed{seed}",
        f"--trainer.default_root_dir={run_dir(out, setting.name, seed)}",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.data_dir={data_dir}",
    ]  # fmt: skip
    if setting.reference is not None:
        ckpt = run_dir(out, setting.reference, seed) / "checkpoints" / "last.ckpt"
        for cls in ("InformationFlow", "AttentionSimilarity"):
            cmd += [
                f"--trainer.callbacks+=pdelightning.callbacks.{cls}",
                f"--trainer.callbacks.reference_checkpoint={ckpt}",
            ]
    return cmd + (QUICK if quick else []) + extra


def run_one(setting: Setting, seed: int, out: Path, data_dir: Path, quick: bool, extra: list[str]) -> dict:
    """Train one setting x seed in a fresh process; write and return its ``run.json``."""
    rdir = run_dir(out, setting.name, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((CONFIG_DIR / setting.config).read_text())
    cmd = command(setting, seed, out, data_dir, quick, extra)
    meta = {
        "setting": setting.name, "seed": seed, "config": f"configs/paper/{setting.config}",
        "overrides": cmd[cmd.index(str(CONFIG_DIR / setting.config)) + 1 :], "experiments": setting.experiments,
        "data": setting.data, "data_dir": str(data_dir), "device": _device(), "completed": False,
        "max_epochs": 1 if quick else config["trainer"].get("max_epochs"),
        "train_subset": config["data"]["init_args"].get("train_subset"),
        "notes": _deviations(config, setting.data, quick),
    }  # fmt: skip
    if setting.reference is not None and not (run_dir(out, setting.reference, seed) / "checkpoints/last.ckpt").exists():
        meta["notes"] += f"; not run: the reference {setting.reference} seed {seed} has no checkpoint"
        (rdir / "run.json").write_text(json.dumps(meta, indent=2))
        return meta
    start = time.perf_counter()
    with open(rdir / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["returncode"] = proc.returncode
    meta["completed"] = proc.returncode == 0 and (rdir / "checkpoints" / "last.ckpt").exists()
    meta["global_step"] = _global_step(rdir / "checkpoints" / "last.ckpt")
    (rdir / "run.json").write_text(json.dumps(meta, indent=2))
    return meta


def _global_step(ckpt: Path) -> int | None:
    if not ckpt.exists():
        return None
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", 0))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    """Run the settings x seeds, then write the report. Returns 0 when every run completed."""
    p = argparse.ArgumentParser(prog="pdelightning reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("runs/paper"), help="root of the run directories")
    p.add_argument("--report", type=Path, default=None, help="where REPRODUCTION.md goes (default: <out>/report)")
    p.add_argument("--mnist-dir", type=Path, default=Path("data"), help="folder holding MNIST/raw/")
    p.add_argument("--newsgroups-dir", type=Path, default=Path("data"), help="20news-bydate.tar.gz or its folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTING_NAMES), choices=SETTING_NAMES, metavar="SETTING",
                   help=f"subset of {', '.join(SETTING_NAMES)}")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few steps per run (pipeline check only)")
    p.add_argument("--skip-existing", action="store_true", help="keep runs whose run.json says completed")
    p.add_argument("extra", nargs="*", help="extra arguments for every `pdelightning fit` (after --)")
    args = p.parse_args(argv)
    data_dirs = {"mnist": args.mnist_dir, "newsgroups": args.newsgroups_dir}
    failed = []
    # Seed-major order: every setting gets seed 0 before any gets seed 1 (references stay first within a seed).
    for seed in args.seeds:
        for setting in (s for s in SETTINGS if s.name in args.settings):
            done = run_dir(args.out, setting.name, seed) / "run.json"
            if args.skip_existing and done.exists() and json.loads(done.read_text()).get("completed"):
                continue
            meta = run_one(setting, seed, args.out, data_dirs[setting.data], args.quick, args.extra)
            status = "ok" if meta["completed"] else "FAILED"
            print(f"[reproduce] {setting.name} seed {seed}: {status} ({meta.get('wall_s', 0)} s)", flush=True)
            if not meta["completed"]:
                failed.append(f"{setting.name}/seed{seed}")
    from pdelightning.reproduce.report import write_report

    path = write_report([args.out], args.report or args.out / "report")
    print(f"[reproduce] report: {path}")
    if failed:
        print(f"[reproduce] runs that did not complete (named in the report): {', '.join(failed)}")
    return 1 if failed else 0
