"""FSDP2 (``fully_shard``) on a 2-process gloo mesh: the callbacks' values equal DDP's, with no hang, and whole
weights are gathered only on probe steps, once per probe.

The same tiny model and data are trained twice by :mod:`tests.scale._sharded_run`: with ``strategy="ddp"`` and with
Lightning's ``ModelParallelStrategy`` (which runs on a CPU with gloo; the model shards each block, then itself, in
``configure_model``). Tolerance: 1e-5 relative (float32 rounding of the differently ordered sums of the shards'
gradient norms; the probe-side values come out bit-identical here). Skipped under sharding, by design and said
once: JacobianStability's per-layer Jacobian norms and Lyapunov exponent (:mod:`pdelightning.probing.sharding`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pdelightning.analysis.gradients import grouped_norms
from pdelightning.probing.sharding import is_sharded, local_part, sharded_sums
from tests.scale._sharded_run import EVERY, STEPS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_sharded_run.py")
FAMILIES = (
    "stability_monitor/W_O_spectral/",
    "stability_monitor/W_VO_spectral/",
    "gradient_flow/grad_norm/",
    "gradient_flow/update_ratio/",
    "attention_similarity/",
    "pde_fit/",
    "information_flow/",
)
"""Quantities that must be among those compared (full weights, sharded gradients, the sharded reference copy)."""
JACOBIAN_NORMS = ("jacobian_stability/spectral_norm/", "jacobian_stability/rate/", "jacobian_stability/lyapunov")


def _run(mode: str, out: Path) -> tuple[list[dict], str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(2)], proc.stderr


@pytest.mark.ddp
def test_fsdp2_values_equal_ddp(tmp_path: Path) -> None:
    (ddp, _), (fsdp, err) = _run("ddp", tmp_path), _run("fsdp", tmp_path)
    assert ddp[0]["off"] == fsdp[0]["off"] == {}  # every callback took part in both runs
    # the reference (the model at the start) and the re-initialised null hold shards, not whole copies, under FSDP
    assert [r["copies_sharded"] for r in fsdp] == [[True, True]] * 2 and ddp[0]["copies_sharded"] == [False, False]
    dv, fv = ddp[0]["values"], fsdp[0]["values"]
    skipped = {k for k in dv if any(j in k for j in JACOBIAN_NORMS)}
    assert skipped and not skipped & set(fv)  # skipped under sharding ...
    assert err.count("cannot be computed under sharding") == 1  # ... and said once
    compared = {k for k in dv if "overhead/" not in k} - skipped
    assert compared <= set(fv)
    for family in FAMILIES:
        assert any(family in k for k in compared), family
    bad = {
        k: (fv[k], dv[k])
        for k in compared
        if not (math.isnan(dv[k]) and math.isnan(fv[k])) and not math.isclose(fv[k], dv[k], rel_tol=1e-5, abs_tol=1e-7)
    }
    assert not bad
    # whole weights: gathered on probe steps only, once per probe for every callback (2 layers x W_O, W_V)
    probe_steps = {str(s) for s in range(EVERY, STEPS + 1, EVERY)}
    for rank in fsdp:
        assert rank["gathers"] == dict.fromkeys(probe_steps, 4)
    assert ddp[0]["gathers"] == {}


def _shards(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        whole = [torch.randn(5, 3), torch.randn(4), torch.randn(2, 2), torch.randn(3)]  # the same on every rank
        mesh = init_device_mesh("cpu", (world,))
        parts = [
            distribute_tensor(whole[0], mesh, [Shard(0)]),  # uneven: 3 + 2 rows
            distribute_tensor(whole[1], mesh, [Shard(0)]),
            distribute_tensor(whole[2], mesh, [Replicate()]),  # each rank holds it whole: counted once
            whole[3],  # a plain tensor, replicated on every rank
        ]
        groups = torch.tensor([0, 1, 1, 0])
        sums = sharded_sums(parts, groups, 2, torch.device("cpu"))
        norm = torch.linalg.vector_norm(parts[0])  # DTensor's own norm: a pending (partial) reduction
        result = {
            "sums": sums.tolist(),
            "dtensor_norm": norm.full_tensor().item(),
            "local_rows": local_part(parts[0])[0].shape[0],
            "sharded": is_sharded(torch.nn.Linear(2, 2)),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither rank tears its group down while the other is still in a collective (seen: SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_shard_sums_equal_the_whole_tensors(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_shards, args=(2, 29000 + os.getpid() % 1000, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    whole = [torch.randn(5, 3), torch.randn(4), torch.randn(2, 2), torch.randn(3)]
    groups = torch.tensor([0, 1, 1, 0])
    l2 = grouped_norms(whole, groups, 2)
    l1 = grouped_norms(whole, groups, 2, ord=1)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert torch.allclose(torch.tensor(got["sums"][0]).sqrt().float(), l2, rtol=1e-6)
        assert torch.allclose(torch.tensor(got["sums"][1]).float(), l1, rtol=1e-6)
        # torch's own DTensor norm agrees: sum of squares over the shards, then the square root
        assert math.isclose(got["dtensor_norm"], float(whole[0].norm()), rel_tol=1e-6)
        assert got["local_rows"] == (3, 2)[r] and got["sharded"] is False
