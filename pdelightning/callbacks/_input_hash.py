"""A per-sample fingerprint of the probe inputs, for the entropy of the distinct inputs (LayerMutualInformation)."""

from __future__ import annotations

import torch
from torch import Tensor

from pdelightning.probing.batch import primary_input
from pdelightning.probing.hub import ProbeBatch


def input_hash(pb: ProbeBatch) -> Tensor:
    """One float64 per probe sample that differs between distinct inputs (a fixed random projection of the main
    input), so the entropy of the distinct inputs can be computed after the gather without gathering the inputs.
    """
    x = primary_input(pb.batch)
    n = pb.logits.shape[0]
    if x is None:
        return torch.arange(n, dtype=torch.float64, device=pb.logits.device)
    flat = x.reshape(n, -1).double()
    g = torch.Generator().manual_seed(12345)
    proj = torch.randn(flat.shape[1], generator=g, dtype=torch.float64).to(flat.device)
    return flat @ proj
