"""Synthetic data for the examples (a planted label in the first token, or in the image brightness)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


class Dicts(Dataset):
    """Samples as dicts, as HuggingFace datasets yield them."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def token_loaders(n: int = 256, vocab: int = 100, length: int = 16, classes: int = 3, pad: int = 0, dicts: bool = True):
    """Padded token sequences whose class is planted in the first token; HF-style dicts or ``(ids, mask, y)``."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    ids = torch.randint(classes + 1, vocab, (n, length), generator=g)
    ids[:, 0] = y + 1
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    data = Dicts(input_ids=ids, attention_mask=mask, labels=y) if dicts else list(zip(ids, mask == 0, y, strict=True))
    return DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=64)


def image_loaders(n: int = 256, size: int = 32, classes: int = 3, dicts: bool = True):
    """Noisy images whose class sets their brightness; HF-style ``pixel_values`` dicts or ``(x, y)`` tuples."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g) + y.float()[:, None, None, None]
    data = Dicts(pixel_values=x, labels=y) if dicts else list(zip(x, y, strict=True))
    return DataLoader(data, batch_size=32, shuffle=True), DataLoader(data, batch_size=64)


def every_callback() -> list:
    """Every analysis callback, constructed with no arguments (what a new user writes)."""
    from pdelightning.callbacks import (
        AttentionRollout,
        AttentionSimilarity,
        GradientFlow,
        InformationFlow,
        JacobianStability,
        LayerMutualInformation,
        PDEFit,
        PerturbationEval,
        StabilityMonitor,
    )

    return [
        AttentionSimilarity(), InformationFlow(), LayerMutualInformation(), GradientFlow(), PerturbationEval(),
        StabilityMonitor(), PDEFit(), JacobianStability(), AttentionRollout(),
    ]  # fmt: skip


def trainer(argv: list[str], **kw) -> L.Trainer:  # noqa: F821
    """A plain Trainer; the callbacks are attached unless ``--bare`` (then use ``PDELIGHTNING_CALLBACKS=all``)."""
    import lightning.pytorch as L

    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--max-steps=")), -1)
    callbacks = [] if "--bare" in argv else every_callback()
    return L.Trainer(max_epochs=2, max_steps=steps, callbacks=callbacks, log_every_n_steps=4, **kw)
