"""The example scripts a new user would write run with every callback attached: in the script, and through the
plugin (``PDELIGHTNING_CALLBACKS=all`` on the unchanged script). Slow: each starts its own Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tb import read_events

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["hf_bert", "hf_vit", "hf_gpt2", "timm_vit", "transformer_lens_model", "stock_encoder_padding"]
LENS_AND_PAPER = (
    "attention_similarity", "information_flow", "layer_mutual_information", "gradient_flow", "perturbation_eval",
    "stability_monitor", "pde_fit", "jacobian_stability", "attention_rollout",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["in_script", "plugin"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_every_callback(name: str, mode: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'examples'}", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--max-steps=4"]
    if mode == "plugin":
        env["PDELIGHTNING_CALLBACKS"] = "all"
        args.append("--bare")
    else:
        env.pop("PDELIGHTNING_CALLBACKS", None)
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "switched off" not in proc.stderr, proc.stderr[-3000:]
    tags = set(read_events(tmp_path / "lightning_logs").Tags()["scalars"])
    for callback in LENS_AND_PAPER:
        assert any(t.startswith(f"analysis/{callback}/") for t in tags), callback
