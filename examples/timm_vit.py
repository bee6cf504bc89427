"""A timm Vision Transformer trained with Lightning on ``(x, y)`` batches, with every analysis callback attached with
no arguments.

    python examples/timm_vit.py          # or, without touching the script: PDELIGHTNING_CALLBACKS=all ... --bare
"""

import sys

import lightning.pytorch as L
import timm
import torch
import torch.nn.functional as F
from _data import image_loaders, trainer


class TimmModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=4,
            num_heads=4,
            num_classes=3,
        )

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


if __name__ == "__main__":
    trainer(sys.argv).fit(TimmModule(), *image_loaders(dicts=False))
