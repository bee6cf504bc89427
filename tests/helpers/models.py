"""Small fixture models for the callback tests: ours, a stock ``nn.TransformerEncoder`` and one without attention."""

from __future__ import annotations

import functools

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pdelightning.models import PDEClassifier, TransformerClassifier
from pdelightning.task import ClassificationTask


def our_task(
    kind: str = "transformer", n_layers: int = 2, d_model: int = 16, image_size: int = 8, **kw
) -> ClassificationTask:
    """Our task around a tiny Transformer or PDE model on ``image_size`` x ``image_size`` images."""
    cls = TransformerClassifier if kind == "transformer" else PDEClassifier
    model = cls(num_classes=4, d_model=d_model, n_layers=n_layers, n_heads=2, d_ff=32, image_size=image_size, **kw)
    return ClassificationTask(model, num_classes=4, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))


class StockEncoderModule(L.LightningModule):
    """A user's model: ``nn.TransformerEncoder`` over image rows; no protocol, no hook names."""

    def __init__(self, image_size: int = 8, d_model: int = 16, n_layers: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(image_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.proj(x)).mean(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MLPModule(StockEncoderModule):
    """A model with no attention and no sequence layers: a plain MLP."""

    def __init__(self, image_size: int = 8, num_classes: int = 4) -> None:
        L.LightningModule.__init__(self)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(image_size * image_size, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def image_loaders(n: int = 96, image_size: int = 8, num_classes: int = 4, batch_size: int = 16, seed: int = 0):
    """Train/val loaders of a learnable synthetic image task (class templates plus noise)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, image_size, image_size, generator=g)
    y = torch.arange(n) % num_classes
    x = templates[y] + 0.3 * torch.randn(n, image_size, image_size, generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=True), DataLoader(ds, batch_size=batch_size)
