"""Runs trained elsewhere: bring their final weights into a runs root and rebuild what did not travel.

A GPU call may bring back only the final weights of its runs (``ckpt/final.pt``) and their records. The analysis
also needs each run's initialisation (the step-0 checkpoint: Table 2's null, the attention null "re-initialised
reference", eq. (21) at initialisation). Initialisation is a deterministic function of the config and the seed
(``seed_everything`` before the model is built), so :func:`regenerate_init` rebuilds it on the CPU exactly as
``train`` built it; :func:`import_run` copies the final weights, writes the step-0 checkpoint and a ``run.json``
that says what was imported and what was regenerated. The check that the regenerated initialisation is the GPU
run's own is an analysis one: its step-0 numbers must equal those the GPU analysed (``docs/reproduction/``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pdelightning_reproduce.recorder import CKPT_DIR, FINAL, read_payload, save_model, step_name
from pdelightning_reproduce.settings import RunSpec
from pdelightning_reproduce.summary import unit_files


def regenerate_init(spec: RunSpec, out: Path, data_dir: Path, budget_name: str = "full", quick: bool = False) -> Path:
    """Write ``<run>/ckpt/step000000.pt``: the run's initial weights, rebuilt from its config and seed.

    The model is built by the same command line as :func:`~pdelightning_reproduce.train.train_run` (same config,
    seed and overrides, ``quick`` as it trained; the data module is built too, in the same order), on the CPU.

    Returns:
        The checkpoint's path.
    """
    from pdelightning.cli import build_cli
    from pdelightning_reproduce.train import _model_spec, fit_args

    args = fit_args(spec, out, data_dir, quick, ["--trainer.accelerator=cpu"], budget_name=budget_name)
    cli = build_cli(args, run=False)
    model_class, init_args = _model_spec(cli)
    path = spec.path(out) / CKPT_DIR / step_name(0)
    save_model(path, cli.model.model, 0, 0, model_class, init_args)
    return path


def import_run(
    spec: RunSpec, final_weights: Path, record: dict[str, Any], out: Path, data_dir: Path, note: str
) -> dict[str, Any]:
    """Copy a run's final weights under ``out``, regenerate its step-0 checkpoint and write its ``run.json``.

    Args:
        spec: the run.
        final_weights: its ``final.pt`` (as :class:`~pdelightning_reproduce.recorder.RunRecorder` saved it).
        record: its ``run.json`` as the training machine wrote it (or what is known of it).
        out: the runs root receiving it.
        data_dir: where the data is on this machine.
        note: how the record was obtained, kept in ``run.json`` as ``imported``.

    Returns:
        The written ``run.json`` content.
    """
    rdir = spec.path(out)
    (rdir / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copy2(final_weights, rdir / CKPT_DIR / FINAL)
    regenerate_init(spec, out, data_dir, record.get("budget") or "full")
    meta = dict(record)
    meta.update(data_dir=str(data_dir), imported=note, init_regenerated=True, budget=record.get("budget") or "full")
    meta.setdefault("cuts", "none (the design's config)")
    (rdir / "run.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


_PROGRESS_LINE = re.compile(
    r"trained (?P<setting>\w+)/seed(?P<seed>\d+): (?P<status>\w+) in (?P<wall>[\d.]+) s, step (?P<step>\d+), "
    r"val/acc (?P<acc>[\d.]+)"
)


def record_from_progress(line: str, final_payload: dict[str, Any], device: str, max_epochs: int) -> dict[str, Any]:
    """A run's record rebuilt from its ``progress.log`` line and its final checkpoint, when ``run.json`` was lost.

    What the line and the checkpoint do not say stays ``None``; the stop reason is inferred from the final epoch
    (``max_epochs`` when training ran all of them, else unknown).

    Raises:
        ValueError: when ``line`` is not a ``trained <setting>/seed<k>: ...`` progress line.
    """
    m = _PROGRESS_LINE.search(line)
    if m is None:
        raise ValueError(f"not a 'trained <setting>/seed<k>: <status> in <s> s, step <n>, val/acc <a>' line: {line!r}")
    epochs = int(final_payload["epoch"])
    return {
        "setting": m["setting"],
        "cell": "",
        "seed": int(m["seed"]),
        "status": m["status"],
        "device": device,
        "gpu": device.startswith("cuda"),
        "wall_s": float(m["wall"]),
        "final_step": int(m["step"]),
        "val_acc": float(m["acc"]),
        "best_val_acc": None,
        "epochs": epochs,
        "stop_reason": "max_epochs" if epochs >= max_epochs else None,
        "plateau_met": None,
        "plateau_epoch": None,
        "diverged": False,
        "divergence_step": None,
        "first_nonfinite_step": None,
        "quick": False,
        "model_class": final_payload["model_class"],
        "init_args": final_payload["init_args"],
        "n_layers": final_payload["init_args"].get("n_layers"),
        "dt": final_payload["init_args"].get("dt"),
        "record": "rebuilt from the progress.log line and the final checkpoint (run.json was not brought back)",
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pdelightning_reproduce.imported``: import every ``<weights>/<setting>/seed<k>/ckpt/final.pt``."""
    import argparse

    import yaml

    from pdelightning_reproduce.settings import setting
    from pdelightning_reproduce.train import config_record

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--weights", type=Path, required=True, help="root of <setting>/seed<k>/ckpt/final.pt")
    p.add_argument("--units", type=Path, required=True, help="published units/ of the GPU call (run.json per run)")
    p.add_argument("--out", type=Path, required=True, help="runs root receiving the runs")
    p.add_argument("--mnist-dir", type=Path, required=True)
    p.add_argument("--newsgroups-dir", type=Path, default=None)
    args = p.parse_args(argv)
    progress = (args.units.parent / "progress.log").read_text().splitlines()
    for final in sorted(args.weights.glob("*/seed*/ckpt/final.pt")):
        name, seed = final.parents[2].name, int(final.parents[1].name[4:])
        spec = RunSpec(name, "", seed)
        if (spec.path(args.out) / "run.json").is_file():
            print(f"[import] {spec.id}: already there")
            continue
        s = setting(name)
        data_dir = args.mnist_dir if s.data == "mnist" else args.newsgroups_dir
        rec_path = args.units / spec.id / "run.json"
        if rec_path.is_file():
            record, note = json.loads(rec_path.read_text()), "GPU run: run.json and final weights from the GPU call"
        else:
            line = next(ln for ln in reversed(progress) if f"trained {spec.id}:" in ln)
            payload = read_payload(final)
            cfg = yaml.safe_load(s.config_path.read_text())
            device = next((json.loads(r.read_text())["device"] for r in unit_files(args.units, "run.json")), "cuda")
            record = record_from_progress(line, payload, device, int(cfg["trainer"]["max_epochs"]))
            record.update(config=config_record(s.config), role=s.role, data=s.data)
            note = "GPU run: final weights from the GPU call; record rebuilt from its progress.log line"
        meta = import_run(spec, final, record, args.out, Path(data_dir), note)
        print(f"[import] {spec.id}: step {meta.get('final_step')}, val/acc {meta.get('val_acc')}; step 0 regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
