"""Which training strategies the analysis callbacks are verified on, and one warning for the others.

The callbacks are tested on one device and under DDP (``ddp``, ``ddp_spawn``, ``ddp_find_unused_parameters_*``; gloo
and NCCL): every rank holds the whole model, the probes gather per-sample values and give the one-process numbers.
Parameters sharded by FSDP2 (``fully_shard``, e.g. Lightning's ``ModelParallelStrategy`` with data parallelism only)
are handled (:mod:`pdelightning.probing.sharding`; tests/scale: equal to DDP's values), but the strategy itself can
also split tensors across ranks (tensor parallelism), which nothing here checks. Those strategies, FSDP1's flat
parameters, DeepSpeed and XLA devices get one warning per trainer at setup (:func:`warn_unverified_strategy`), and
training goes on.
"""

from __future__ import annotations

from typing import Any

from pdelightning.utils import warn_once

VERIFIED = ("SingleDeviceStrategy", "DDPStrategy")
"""The Lightning strategy classes the callbacks are verified on (a user's subclass of one counts as it)."""


def strategy_family(strategy: Any) -> str:
    """The name of the first Lightning class in ``type(strategy)``'s MRO (a user's subclass: the class it extends).

    Example::

        >>> from lightning.pytorch.strategies import DDPStrategy
        >>> class MyDDP(DDPStrategy): ...
        >>> strategy_family(MyDDP())
        'DDPStrategy'
    """
    for cls in type(strategy).__mro__:
        if cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning"):
            return cls.__name__
    return type(strategy).__name__


def unverified_strategy_message(strategy: Any, callbacks: list[str]) -> str | None:
    """The warning for ``strategy`` (``None`` when the callbacks are verified on it)."""
    family = strategy_family(strategy)
    if family in VERIFIED:
        return None
    name = type(strategy).__name__ + (f" (a {family})" if family != type(strategy).__name__ else "")
    return (
        f"pdelightning: {', '.join(callbacks)} {'is' if len(callbacks) == 1 else 'are'} verified on one device and "
        f"under DDP (ddp, ddp_spawn, ddp_find_unused_parameters_*), not on {name}: with sharded, offloaded or split "
        "parameters (FSDP, DeepSpeed, tensor parallelism) the probes may read partial weights, give wrong values or "
        "wait in collectives the strategy does not run (FSDP2 data-parallel sharding is handled and tested equal to "
        "DDP). Check a probe against a single-device run before trusting it."
    )


def warn_unverified_strategy(trainer: Any) -> None:
    """Warn once per trainer (rank zero) when its strategy is not one the analysis callbacks are verified on."""
    if getattr(trainer, "strategy", None) is None:
        return
    ours = [c for c in trainer.callbacks if type(c).__module__.startswith("pdelightning.callbacks.")]
    names = sorted({type(c).__name__ for c in ours})
    message = unverified_strategy_message(trainer.strategy, names or ["the analysis callbacks"])
    if message is not None:
        warn_once(trainer, "unverified strategy", message)
