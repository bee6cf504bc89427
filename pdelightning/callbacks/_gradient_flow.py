"""What :class:`~pdelightning.callbacks.GradientFlow` does beside its hooks: argument checks and sharded norms.

Under FSDP2 / DTensor each rank holds a shard of every gradient: the norms are sums of squares (or of absolute
values) over every rank's shards, reduced in one ``all_reduce`` (:func:`~pdelightning.probing.sharding.sharded_sums`),
then square-rooted; the unsharded path is :func:`~pdelightning.analysis.gradients.gradient_norms`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from pdelightning.adapters.registry import TargetNotFoundError, clean_name, resolve
from pdelightning.analysis.gradients import param_group_members
from pdelightning.callbacks._outputs import log_histogram
from pdelightning.probing.planner import DEFAULT_BUDGET
from pdelightning.probing.sharding import sharded_sums

SHARDED_NO_HISTOGRAMS = (
    "GradientFlow: the parameters are sharded (DTensor); gradient histograms need whole gradients and "
    "are not written (norms, update ratios and flags are reduced from the shards)"
)


def check_arguments(
    every_n_steps: int | None,
    budget: float | str | None,
    histogram_every_n_steps: int | None,
    vanishing_threshold: float,
    exploding_threshold: float,
) -> float | None:
    """Check GradientFlow's cadence and thresholds (``ValueError`` naming the value); returns the budget to use."""
    if every_n_steps is not None and (
        isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0
    ):
        raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer or None")
    if budget == "auto":
        budget = DEFAULT_BUDGET if every_n_steps is None else None
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < float(budget) < 1):
        raise ValueError(f"budget={budget!r} must be a fraction in (0, 1) (e.g. 0.03), 'auto' or None")
    if budget is None and every_n_steps is None:
        raise ValueError("give every_n_steps or a budget: GradientFlow would never read the gradients")
    if histogram_every_n_steps is not None and (
        not isinstance(histogram_every_n_steps, int) or histogram_every_n_steps <= 0
    ):
        raise ValueError(
            f"histogram_every_n_steps={histogram_every_n_steps!r} must be a positive integer, or None for no histograms"
        )
    if not 0 <= vanishing_threshold < exploding_threshold:
        raise ValueError(
            f"vanishing_threshold={vanishing_threshold} and exploding_threshold={exploding_threshold} must "
            "satisfy 0 <= vanishing_threshold < exploding_threshold"
        )
    return None if budget is None else float(budget)


def sharded_gradient_norms(
    grads: list[Tensor],
    groups: Tensor,
    num_groups: int,
    members: Tensor,
    member_groups: Tensor,
    num_members: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~pdelightning.analysis.gradients.gradient_norms` over every rank's shards (a collective)."""
    member_grads = [grads[i] for i in members.tolist()]
    index = torch.cat([groups, member_groups + num_groups])
    sums = sharded_sums(grads + member_grads, index, num_groups + num_members, device)
    return sums[0, :num_groups].sqrt(), sums[1, :num_groups], sums[0, num_groups:].sqrt()


def sharded_update_ratio(
    before: list[Tensor], after: list[Tensor], groups: Tensor, num_groups: int, device: torch.device
) -> Tensor:
    """:func:`~pdelightning.analysis.gradients.update_ratio` over every rank's shards (a collective)."""
    delta = [a - b for a, b in zip(after, before, strict=True)]
    sums = sharded_sums(delta + before, torch.cat([groups, groups + num_groups]), 2 * num_groups, device)[0]
    return sums[:num_groups].sqrt() / sums[num_groups:].sqrt().clamp_min(1e-30)


def find_layers(
    pl_module: nn.Module, patterns: dict[str, str | None]
) -> tuple[list[tuple[str, nn.Module]], nn.Module | None, str]:
    """The layers whose parameters form groups, the embedding module, and the model family (for error messages).

    The layers found by the adapters (or the ``layers`` glob); a model in which none are found and no glob is given
    falls back to the modules that directly own parameters (said once).

    Raises:
        TargetNotFoundError: when a ``layers``/``embedding`` glob matches nothing.
    """
    try:
        adapter, targets = resolve(pl_module, need=("layers",), **patterns)
    except TargetNotFoundError:
        if patterns["layers"] is not None or patterns["embedding"] is not None:
            raise
        owners = [
            (clean_name(n), m)
            for n, m in pl_module.named_modules()
            if next(m.parameters(recurse=False), None) is not None
        ]
        rank_zero_info(
            f"GradientFlow: no layers found in {type(pl_module).__name__}; grouping gradients by the modules "
            f"that own parameters: {[n for n, _ in owners]} (give `layers` to choose)"
        )
        return owners, None, ""
    family = "" if adapter is None else f"model family {adapter.family!r}"
    embedding = targets.embedding if not targets.embedding_is_input else None
    return [(t.name, t.block or t.module) for t in targets.layers], embedding, family


def param_groups(
    optimizers: Sequence[Optimizer], optimizer: Optimizer, params: list[nn.Parameter]
) -> tuple[list[str], Tensor, Tensor]:
    """Key names of the param groups of ``optimizer`` that hold any of ``params`` (``<j>.<i>`` for optimizer ``j`` when
    there are several), with their members (:func:`~pdelightning.analysis.gradients.param_group_members`).
    """
    groups, members, index = param_group_members(optimizer.param_groups, params)
    position = next((j for j, o in enumerate(optimizers) if o is optimizer), 0)
    prefix = f"{position}." if len(optimizers) > 1 else ""
    return [f"{prefix}{i}" for i in groups], members, index


def write_histograms(
    trainer: L.Trainer, keys: dict[int, str], grads: list[Tensor], groups: list[int], step: int
) -> None:
    """One histogram of all gradient entries of each group ``g`` in ``keys``, under ``keys[g]``."""
    for g, key in keys.items():
        values = [gr.detach().flatten().float() for gr, s in zip(grads, groups, strict=True) if s == g]
        log_histogram(trainer, key, torch.cat(values), step)
